"""``analyze``: FARMS heavy-tail statistics of every weight matrix of a model.

Pipeline: discover layers -> plan each layer's windows (or the reason it is skipped) -> solve all
windows batched -> fit each pooled ESD -> metrics -> :class:`FARMSReport`.
"""

from __future__ import annotations

import dataclasses
import statistics
import warnings
from typing import Any, Callable, Collection, Union

import torch
from torch import nn

from farms_lightning.engine.baseline import random_baselines, with_baseline
from farms_lightning.engine.esd_metrics import ESD_METRIC_NAMES, esd_metrics
from farms_lightning.engine.layer_plans import MIN_WINDOW_SIDE, plan_layer
from farms_lightning.engine.layer_spectra import refine_all, solve_all, spectrum_certain
from farms_lightning.engine.matrix_metrics import MATRIX_METRIC_NAMES, conv_matrices, whole_matrix_metrics
from farms_lightning.engine.powerlaw import (
    PowerLawFit,
    fit_nonzero,
    flat_tolerance_for,
    nonzero_eigenvalues,
    validate_fit_args,
)
from farms_lightning.engine.report import FARMSReport, LayerStats
from farms_lightning.engine.spectra import DTypeLike, WindowSet, resolve_dtype
from farms_lightning.engine.threads import parallel_map, single_threaded_ops
from farms_lightning.engine.windows import validate_window_args
from farms_lightning.models.layers import LayerMatrix, LayerTypes, Patterns, discover_layers

#: Paper settings: image classification (``cv``) and LLM pruning (``llm``).
PRESETS: dict[str, dict[str, Any]] = {
    "cv": {"window": 100, "aspect_ratio": 1.0, "windows_per_dim": 9, "fit": "median"},
    "llm": {"window": 2000, "aspect_ratio": 1.0, "windows_per_dim": 10, "fit": "peak"},
}
ESD_KINDS = ("farms", "full")


def resolve_settings(
    preset: str = "cv",
    window: int | None = None,
    aspect_ratio: float | None = None,
    windows_per_dim: int | None = None,
    fit: str | None = None,
    esd: str = "farms",
    dtype: DTypeLike = None,
    min_eigenvalues: int = 10,
    peak_bound: str = "reference",
    random_baseline: bool = True,
    min_window_side: int = MIN_WINDOW_SIDE,
) -> dict[str, Any]:
    """The validated analysis settings: the preset's values overridden by explicit arguments.

    Raises:
        ValueError: an unknown preset, fit or ESD kind, or a value out of range (the message names
            the argument and the allowed values).
    """
    if preset not in PRESETS:
        raise ValueError(f"`preset` must be one of {tuple(PRESETS)}, got {preset!r}")
    if esd not in ESD_KINDS:
        raise ValueError(f"`esd` must be one of {ESD_KINDS}, got {esd!r}")
    given = {"window": window, "aspect_ratio": aspect_ratio, "windows_per_dim": windows_per_dim, "fit": fit}
    settings = {**PRESETS[preset], **{k: v for k, v in given.items() if v is not None}}
    validate_window_args(settings["window"], settings["aspect_ratio"], settings["windows_per_dim"])
    validate_fit_args(settings["fit"], min_eigenvalues, peak_bound)
    resolve_dtype(dtype)
    if not isinstance(random_baseline, bool):
        raise ValueError(f"`random_baseline` must be True or False, got {random_baseline!r}")
    if isinstance(min_window_side, bool) or not isinstance(min_window_side, int) or min_window_side < 2:
        raise ValueError(f"`min_window_side` must be an integer >= 2, got {min_window_side!r}")
    settings.update(preset=preset, esd=esd, dtype=dtype, min_eigenvalues=min_eigenvalues, peak_bound=peak_bound,
                    random_baseline=random_baseline, min_window_side=min_window_side)
    return settings


def analyze(
    model: nn.Module,
    preset: str = "cv",
    *,
    window: int | None = None,
    aspect_ratio: float | None = None,
    windows_per_dim: int | None = None,
    fit: str | None = None,
    esd: str = "farms",
    dtype: DTypeLike = None,
    include: Patterns = None,
    exclude: Patterns = None,
    layer_types: LayerTypes = None,
    min_eigenvalues: int = 10,
    peak_bound: str = "reference",
    random_baseline: bool = True,
    min_window_side: int = MIN_WINDOW_SIDE,
    keep_eigenvalues: bool = False,
    split_qkv: bool = True,
    lora: str = "merged",
) -> FARMSReport:
    """FARMS (or plain) ESD statistics of every analysable weight matrix of ``model``.

    Args:
        model: any ``nn.Module``; its weights are read, never modified or kept.
        preset: ``"cv"`` (m=100, Q=1, k=9, median fit) or ``"llm"`` (m=2000, Q=1, k=10, peak fit).
        window, aspect_ratio, windows_per_dim, fit: override the preset (docs/method.md).
        esd: ``"farms"`` (pooled windows) or ``"full"`` (the plain ESD of each matrix).
        dtype: ``None``/``torch.float64`` (eigenvalues equal a float64 SVD's). ``torch.float32``
            raises ``ValueError``: no float32 path was both as accurate as the published float32
            pipeline and faster than float64 on a CPU (see docs/method.md).
        include, exclude: ``fnmatch`` globs on layer names.
        layer_types: kinds to analyse (default: Linear, Conv1d/2d/3d, MultiheadAttention, Conv1D;
            add ``"Embedding"`` to include embeddings).
        min_eigenvalues: fewest non-zero eigenvalues a fit needs.
        peak_bound: ``"reference"`` or ``"corrected"`` lower candidate bound of the peak fit.
        random_baseline: also give every fitted layer ``alpha_random`` (the median alpha of 5
            i.i.d. Gaussian matrices of its shape under the same settings, cached per shape),
            ``alpha_random_spread`` and ``alpha_delta = alpha - alpha_random``. ``False`` skips it.
        min_window_side: layers whose windows (the whole matrix with ``esd="full"``) have fewer
            rows or columns are reported ``"too_small"`` with no alpha: random matrices of their
            shape spread too widely to judge (docs/reading-alpha.md). ``2`` judges every layer.
        keep_eigenvalues: keep each analysed layer's sorted ESDs in ``report.eigenvalues``
            (one tensor per conv block), e.g. for plots.
        split_qkv: split fused q/k/v projections (``qkv``, ``c_attn``, ``qkv_proj``, ``Wqkv`` with
            ``out == 3 * in``, ``query_key_value`` by head, ``nn.MultiheadAttention``'s
            ``in_proj_weight``) into ``<name>.q|k|v``; ``False`` analyses them whole.
        lora: for PEFT LoRA layers, ``"merged"`` analyses the effective weight ``W + scaling·B@A``
            of the active adapters, ``"delta"`` only the update ``scaling·B@A`` (its rank is the
            adapter's ``r``: below ``min_eigenvalues`` it cannot be fitted with ``esd="full"``).

    Returns:
        A :class:`FARMSReport`. Layers that cannot be analysed are reported with
        ``status="skipped"``, layers too small to judge with ``status="too_small"`` and layers
        without a fit with ``status="failed"``, each with a reason.

    Raises:
        ValueError: a bad argument (never bad weights).

    Example::

        >>> report = analyze(model, fit="median")
        >>> report["features.3"].alpha
        >>> report.to_rows()[0]["status"]
    """
    settings = resolve_settings(preset, window, aspect_ratio, windows_per_dim, fit, esd, dtype,
                                min_eigenvalues, peak_bound, random_baseline, min_window_side)
    layers = discover_layers(model, layer_types, include, exclude, split_qkv=split_qkv, lora=lora)
    stats, eigenvalues = analyze_layers(layers, settings, keep_eigenvalues=keep_eigenvalues)
    return FARMSReport(stats, settings, eigenvalues)  # type: ignore[arg-type]


def analyze_layers(
    layers: list[LayerMatrix],
    settings: dict[str, Any],
    assigned: Collection[int] | None = None,
    keep_eigenvalues: bool = False,
    frozen_cache: dict[tuple, LayerStats] | None = None,
    whole_matrix: bool = True,
    on_windows: Callable[[int, int, int], None] | None = None,
    warm_starts: dict[str, list[torch.Tensor]] | None = None,
) -> tuple[list[LayerStats | None], dict[str, list[torch.Tensor]]]:
    """Statistics of ``layers`` (those at ``assigned`` positions only; ``None`` elsewhere).

    Weight sharing is resolved over all layers, so every subset agrees with a whole analysis.
    With ``keep_eigenvalues`` also returns each fitted layer's ESDs (one per conv block) by name.
    With ``frozen_cache`` (a dict kept by the caller between analyses, same settings), a frozen
    layer (``requires_grad=False``) whose weight was not modified since (same tensor version) reuses
    its earlier statistics instead of being analysed again. ``whole_matrix=False`` leaves the
    whole-matrix metrics out (``None``): the random baseline needs only alphas. ``on_windows(i,
    solved, total)`` hears, from worker threads, that ``solved`` more of the ``total`` windows of
    ``layers[i]`` are solved (a progress bar over big layers). ``warm_starts`` (a dict the caller keeps:
    layer name -> one vector per whole matrix) starts each ``lambda_max`` from the last analysis's vector
    (ignored if of a wrong count or length) and gets, in place, the new vectors of the layers solved here.
    """
    owners: dict[tuple, str] = {}
    todo = set(range(len(layers))) if assigned is None else set(assigned)
    eigenvalues: dict[str, list[torch.Tensor]] = {}
    cache: dict[tuple, LayerStats] = frozen_cache if frozen_cache is not None else {}
    frozen = {i: _frozen_key(layers[i]) for i in todo} if frozen_cache is not None else {}
    reused = {i: cache[key] for i, key in frozen.items() if key is not None and key in cache}
    todo -= set(reused)
    workers = torch.get_num_threads()
    # Nearly singular windows are refined only where a result depends on them (certificate.py),
    # unless every eigenvalue is kept: kept ESDs are always fully refined.
    defer = not keep_eigenvalues
    # Each analysed layer's warm starts, replaced by its new vectors (emptied when none were found).
    warm = {layers[i].name: _warm_slot(warm_starts.get(layers[i].name)) for i in todo} \
        if warm_starts is not None and whole_matrix else {}
    with torch.no_grad(), single_threaded_ops():  # parallel work runs on a pool instead (threads.py)
        plans = [plan_layer(layer, settings, owners, i in todo) for i, layer in enumerate(layers)]
        sets = [p for p in plans if isinstance(p, WindowSet)]
        spectra = solve_all(sets, settings["dtype"], workers, _window_reporter(plans, on_windows), defer)

        def finish(item: tuple[LayerMatrix, LayerStats | WindowSet | None]) -> LayerStats | WindowSet | None:
            """The layer's statistics; its window set when they depend on deferred values (refine it)."""
            layer, plan = item
            if not isinstance(plan, WindowSet):
                return plan
            found = spectra[id(plan)]
            errors = None
            if defer and not isinstance(found, Exception):  # sorted here, on the pool
                pairs = plan.eigenvalues_with_errors()
                found, errors = [v for v, _ in pairs], [e for _, e in pairs]
            # The stored precision sets the flat-spectrum tolerance (float8 is analysed upcast).
            stored = layer.weight.dtype if layer.weight.is_floating_point() else plan.matrices.dtype
            fitted = _fit_layer(layer, found, stored, settings, whole_matrix, errors, warm.get(layer.name))
            return plan if fitted is None else fitted

        results = parallel_map(finish, list(zip(layers, plans)), workers)
        # Refine the windows that most often decide first, then (still uncertain) all deferred ones.
        for stage in ("suspects", "all"):
            uncertain = [i for i, r in enumerate(results) if isinstance(r, WindowSet)]
            if not uncertain:
                break
            chosen = [plans[i] for i in uncertain]
            suspects = [ws.first_suspects() for ws in chosen] if stage == "suspects" else None  # type: ignore[union-attr]
            for i, ev in zip(uncertain, refine_all(chosen, workers, suspects)):  # type: ignore[arg-type]
                spectra[id(plans[i])] = ev
            defer = stage == "suspects"
            for i, found in zip(uncertain, parallel_map(finish, [(layers[i], plans[i]) for i in uncertain], workers)):
                results[i] = found
        stats: list[LayerStats | None] = results  # type: ignore[assignment]
    for i in todo:
        found_vectors = warm.get(layers[i].name)
        if found_vectors and stats[i] is not None and stats[i].lambda_max is not None:  # type: ignore[union-attr]
            warm_starts[layers[i].name] = found_vectors  # type: ignore[index]
    if settings.get("random_baseline", True):
        _add_baselines(layers, stats, settings)
    for i, cached in reused.items():
        stats[i] = dataclasses.replace(cached, name=layers[i].name)
    for i, key in frozen.items():
        fresh = stats[i]
        if key is not None and fresh is not None:
            cache[key] = fresh
    if keep_eigenvalues:
        eigenvalues = {layer.name: spectra[id(plan)] for layer, plan in zip(layers, plans)  # type: ignore[misc]
                       if isinstance(plan, WindowSet) and not isinstance(spectra[id(plan)], Exception)}
    return stats, eigenvalues


def _add_baselines(layers: list[LayerMatrix], stats: list[LayerStats | None], settings: dict[str, Any]) -> None:
    """Fill in the random-matrix baseline of every fitted layer (``baseline.py``), in place."""
    fitted = [i for i, s in enumerate(stats) if s is not None and s.alpha is not None]
    if not fitted:
        return

    def engine(stand_ins: list[LayerMatrix], plain: dict[str, Any]) -> list[LayerStats | None]:
        # Only the draws' alphas are used: their exact lambda_max would cost more than their windows.
        return analyze_layers(stand_ins, plain, whole_matrix=False)[0]

    try:
        baselines = random_baselines([layers[i] for i in fitted], settings, engine)
    except Exception as error:  # noqa: BLE001 - the baseline never costs a layer its own statistics
        # Said, not raised: the layers keep their statistics, only alpha_random/alpha_delta stay empty.
        warnings.warn(f"FARMS random baseline not computed ({error!r}): alpha_random and alpha_delta are left "
                      "empty; pass random_baseline=False to skip it", RuntimeWarning, stacklevel=2)
        return
    for i, found in zip(fitted, baselines):
        stats[i] = with_baseline(stats[i], found)  # type: ignore[arg-type]


def _frozen_key(layer: LayerMatrix) -> tuple | None:
    """Name, identity and content fingerprint of a frozen, materialised weight; ``None`` if trainable.

    The name keeps tied layers apart (owner and sharer have different statistics). The version
    counter misses updates through ``.data`` (EMA or momentum encoders), so the content is
    fingerprinted too: three float64 moments, one cheap pass compared with an eigen-analysis.
    """
    w = layer.weight
    if (w.requires_grad or layer.is_lazy or w.is_meta or not w.is_floating_point() or layer.reader is not None
            or w.layout != torch.strided):
        return None  # read through a reader (LoRA adapters, parametrizations): its inputs may change
    flat = w.detach().reshape(-1).double()
    position = torch.arange(1, len(flat) + 1, dtype=torch.float64, device=flat.device)
    fingerprint = tuple(float(v) for v in (flat.sum(), (flat * flat).sum(), (flat * position).sum()))
    return (layer.name, *layer.identity(), w._version, fingerprint)


def _window_reporter(
    plans: list[LayerStats | WindowSet | None], on_windows: Callable[[int, int, int], None] | None
) -> Callable[[WindowSet, int], None] | None:
    """``compute_spectra``'s hook, told in layer positions and window totals."""
    if on_windows is None:
        return None
    where = {id(p): (i, p.num_windows) for i, p in enumerate(plans) if isinstance(p, WindowSet)}

    def solved(ws: WindowSet, count: int) -> None:
        i, total = where[id(ws)]
        on_windows(i, count, total)

    return solved


def _fit_layer(
    layer: LayerMatrix, spectra: list[torch.Tensor] | Exception, weight_dtype: torch.dtype, settings: dict[str, Any],
    whole_matrix: bool = True, errors: list[torch.Tensor] | None = None, warm: list | None = None,
) -> LayerStats | None:
    """Fit every group's ESD; a conv layer's fit and ESD metrics are the block means (counts: totals).

    The whole-matrix metrics describe the weight matrix itself (a conv: its unscaled reshape, per
    group), whatever the ESD; ``alpha_weighted`` is the fitted alpha times its ``log_spectral_norm``.
    With ``errors`` (each eigenvalue's error bound, :meth:`WindowSet.eigenvalues_with_errors`),
    ``None`` when a count, fit or ESD metric could differ within them: the windows need refining.
    """
    base: dict[str, Any] = {"name": layer.name, "type": layer.module_type, "shape": layer.shape,
                            "num_params": layer.num_params}
    if isinstance(spectra, Exception):
        return LayerStats(**base, status="failed", reason=f"eigenvalue error: {spectra!r}")
    fits: list[PowerLawFit] = []
    metrics: list[dict[str, float | None]] = []
    for group, ev in enumerate(spectra):
        values, dropped = nonzero_eigenvalues(ev)
        fit = fit_nonzero(values, dropped, settings["fit"], settings["min_eigenvalues"], settings["peak_bound"],
                          flat_tolerance_for(weight_dtype))
        found = esd_metrics(values, fit.alpha)
        if errors is not None and not spectrum_certain(ev, errors[group], values, fit, settings, found):
            return None
        fits.append(fit)
        metrics.append(found)
    counts: dict[str, Any] = {"num_evals": sum(f.num_evals for f in fits),
                              "num_dropped": sum(f.num_dropped for f in fits)}
    spectral: dict[str, Any] = {name: _mean([m[name] for m in metrics]) for name in ESD_METRIC_NAMES}
    spectral.update(_whole_matrix(layer, spectra, settings, warm) if whole_matrix
                    else dict.fromkeys(MATRIX_METRIC_NAMES))
    bad = [(b, f) for b, f in enumerate(fits) if f.status != "ok"]
    if bad:
        block, fit = bad[0]
        reason = fit.reason if len(fits) == 1 else f"block {block + 1} of {len(fits)}: {fit.reason}"
        spectral.update(alpha_weighted=None, log_alpha_norm=None)
        return LayerStats(**base, status="failed", reason=reason, **counts, **spectral)
    alpha = _mean([f.alpha for f in fits])
    log_spectral_norm = spectral["log_spectral_norm"]
    spectral["alpha_weighted"] = None if alpha is None or log_spectral_norm is None else alpha * log_spectral_norm
    return LayerStats(
        **base, status="ok", reason=layer.note,
        alpha=alpha, xmin=_mean([f.xmin for f in fits]), D=_mean([f.D for f in fits]),
        **counts, **spectral,
    )


def _whole_matrix(layer: LayerMatrix, spectra: list[torch.Tensor], settings: dict[str, Any],
                  warm: list | None = None) -> dict[str, Any]:
    """Whole-matrix metrics of the layer (``None`` each if they cannot be computed); ``warm``, the
    layer's warm starts, is replaced in place by its new top vectors (emptied if none)."""
    try:
        w = layer.oriented()
        matrices = conv_matrices(w, getattr(layer, "groups", 1)) if layer.is_conv else [w]
        # A float64 full ESD is the whole matrix's exact spectrum: its top eigenvalue is lambda_max.
        exact = (not layer.is_conv and settings["esd"] == "full" and resolve_dtype(settings["dtype"]) == torch.float64
                 and len(spectra[0]))
        if exact or warm is None:
            if warm is not None:
                warm.clear()  # nothing solved, no vector
            return whole_matrix_metrics(matrices, float(spectra[0][-1]) if exact else None)
        if len(warm) != len(matrices):
            warm[:] = [None] * len(matrices)  # an entry for another shape of layer: the fixed start
        return whole_matrix_metrics(matrices, None, warm)
    except Exception:  # noqa: BLE001 - a metric never crashes the analysis
        if warm is not None:
            warm.clear()
        return dict.fromkeys(MATRIX_METRIC_NAMES)


def _warm_slot(entry: Any) -> list:
    """A fresh list of a layer's warm starts (each checked where it is used; anything else: none)."""
    return list(entry) if isinstance(entry, (list, tuple)) else []


def _mean(values: list[Union[float, None]]) -> float | None:
    if not values or any(v is None for v in values):
        return None
    return values[0] if len(values) == 1 else statistics.fmean(values)  # type: ignore[arg-type]
