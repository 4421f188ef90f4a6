"""``FARMSMetric``: FARMS statistics of a model as a torchmetrics ``Metric`` (and its functional twin)."""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
from torch import nn
from torchmetrics import Metric

from farms_lightning.engine.analysis import analyze_layers, resolve_settings
from farms_lightning.engine.baseline import Baseline, with_baseline
from farms_lightning.engine.distributed import local_share
from farms_lightning.engine.matrix_metrics import wants_matrix_metrics
from farms_lightning.engine.report import LayerStats, summarize
from farms_lightning.models.layers import discover_layers, validate_discovery_args

#: Columns of the per-layer metric state.
_COLUMNS = ("alpha", "alpha_weighted", "status", "alpha_random", "alpha_random_spread")
#: Per-layer status codes of the metric state; 0 marks a row this process did not fill.
STATUS_CODES = ("not analysed here", "ok", "skipped", "failed", "too_small")


def _metric_dict(layers: Sequence[LayerStats], settings: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``alpha/<layer>`` for fitted layers, ``alpha_delta/<layer>`` where a baseline exists, and the
    model summary, as float64 scalar tensors."""
    out = {f"alpha/{s.name or '(model)'}": torch.tensor(s.alpha, dtype=torch.float64)
           for s in layers if s.alpha is not None}
    out.update({f"alpha_delta/{s.name or '(model)'}": torch.tensor(s.alpha_delta, dtype=torch.float64)
                for s in layers if s.alpha_delta is not None})
    out.update({k: torch.tensor(float(v), dtype=torch.float64) for k, v in summarize(tuple(layers), settings).items()})
    return out


def farms_metrics(model: nn.Module, preset: str = "cv", **options: Any) -> dict[str, torch.Tensor]:
    """Functional twin of :class:`FARMSMetric`: ``alpha/<layer>`` and summary values of ``model``.

    ``options`` are :func:`farms_lightning.analyze`'s keyword arguments (``random_baseline=False``
    leaves out ``alpha_delta/<layer>`` and the baseline's summary values).

    Example::

        >>> farms_metrics(model, fit="median")["alpha_mean"]
    """
    from farms_lightning.engine.analysis import analyze

    report = analyze(model, preset, **options)
    return _metric_dict(report.layers, report.settings)


def _nan_if_none(value: float | None) -> float:
    return math.nan if value is None else value


class FARMSMetric(Metric):
    r"""FARMS heavy-tail statistics of a model's weights as a torchmetrics ``Metric``.

    ``update(model)`` analyses the weights (a snapshot: the latest update replaces earlier ones;
    the module itself is never stored), ``compute()`` returns ``alpha/<layer>`` for every fitted
    layer, ``alpha_delta/<layer>`` (alpha minus the layer's random-matrix baseline) where there is
    one, and the model summary (``alpha_mean``, ``alpha_random_mean``, ``num_fitted``, ...) as
    scalar tensors; ``alpha_weighted_mean`` is NaN ("not computed") unless ``matrix_metrics=True``,
    like the other summary values that were not assessed. Under DDP
    each rank analyses a share of the layers and the states are summed, so every rank computes the
    result a single process would.

    Args:
        preset: ``"cv"`` or ``"llm"``; ``options`` override it (``window``, ``aspect_ratio``,
            ``windows_per_dim``, ``fit``, ``esd``, ``dtype``, ``min_eigenvalues``, ``peak_bound``, ``min_window_side``).
        include, exclude, layer_types, split_qkv, lora: layer selection, as for
            :func:`farms_lightning.analyze`.
        random_baseline: compare every layer with i.i.d. Gaussian matrices of its shape
            (``alpha_delta``; cached per shape, so only the first update pays for it).
        matrix_metrics: ``True`` computes the whole-matrix metrics, for ``alpha_weighted_mean``
            (about two thirds of an analysis of random-init weights); ``None`` (default) and
            ``False`` leave them out. Each ``update`` then starts ``lambda_max`` from the vectors the
            previous one found (kept in memory across ``reset()``, not a metric state).
        kwargs: ``torchmetrics.Metric`` arguments.

    Example::

        >>> metric = FARMSMetric(fit="median")
        >>> metric.update(model)
        >>> metric.compute()["alpha_mean"]
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = True
    plot_lower_bound = 0.0

    def __init__(
        self,
        preset: str = "cv",
        window: Optional[int] = None,
        aspect_ratio: Optional[float] = None,
        windows_per_dim: Optional[int] = None,
        fit: Optional[str] = None,
        esd: str = "farms",
        dtype: Optional[str] = None,
        include: Optional[list[str]] = None,
        exclude: Optional[list[str]] = None,
        layer_types: Optional[list[str]] = None,
        min_eigenvalues: int = 10,
        peak_bound: str = "reference",
        random_baseline: bool = True,
        min_window_side: int = 16,
        split_qkv: bool = True,
        lora: str = "merged",
        matrix_metrics: Optional[bool] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        validate_discovery_args(split_qkv, lora)
        self.split_qkv, self.lora = split_qkv, lora
        self.settings = resolve_settings(preset, window, aspect_ratio, windows_per_dim, fit, esd, dtype,
                                         min_eigenvalues, peak_bound, random_baseline, min_window_side)
        self.include, self.exclude, self.layer_types = include, exclude, layer_types
        self.layer_names: list[str] = []
        # No log_metrics to ask for them: only an explicit True computes the whole-matrix metrics.
        self.matrix_metrics = wants_matrix_metrics(matrix_metrics, ())
        #: Layer name -> the top singular vectors of the last update (warm starts of lambda_max).
        self.warm_starts: dict[str, list[torch.Tensor]] = {}
        # Per layer: [alpha (0 if none), alpha_weighted (NaN if none), status code, alpha_random (NaN if
        # none), alpha_random_spread (NaN if none)]; summed across ranks, each layer's row coming from
        # the one rank that analysed it (other ranks leave zeros, and NaN + 0 stays NaN).
        self.add_state("layer_values", default=torch.zeros(0, len(_COLUMNS), dtype=torch.float64),
                       dist_reduce_fx="sum")

    def update(self, model: nn.Module) -> None:  # type: ignore[override]
        layers = discover_layers(model, self.layer_types, self.include, self.exclude, split_qkv=self.split_qkv,
                                 lora=self.lora)
        mine, _ = local_share(layers)
        stats, _ = analyze_layers(layers, self.settings, assigned=mine, whole_matrix=self.matrix_metrics,
                                  warm_starts=self.warm_starts if self.matrix_metrics else None)
        values = torch.zeros(len(layers), len(_COLUMNS), dtype=torch.float64)
        for i in mine:
            s = stats[i]
            assert s is not None  # analyze_layers fills every assigned position
            values[i] = torch.tensor([s.alpha or 0.0, _nan_if_none(s.alpha_weighted), STATUS_CODES.index(s.status),
                                      _nan_if_none(s.alpha_random), _nan_if_none(s.alpha_random_spread)],
                                     dtype=torch.float64)
        self.layer_names = [layer.name for layer in layers]
        self.layer_values = values.to(self.device)

    def compute(self) -> dict[str, torch.Tensor]:
        rows = self.layer_values.detach().cpu()
        layers = []
        for name, (alpha, weighted, code, random, spread) in zip(self.layer_names, rows.tolist()):
            status = STATUS_CODES[int(round(code))]
            if status == "not analysed here":  # states not synced (sync_on_compute=False, a sub-group)
                status = "skipped"
            ok = status == "ok"
            stats = LayerStats(name, "", (), status, "" if ok else status, alpha=alpha if ok else None,
                               alpha_weighted=weighted if ok and not math.isnan(weighted) else None)
            if ok and not math.isnan(random):
                stats = with_baseline(stats, Baseline(random, spread, ()))
            layers.append(stats)
        return _metric_dict(layers, self.settings)

    def plot(self, val: Optional[dict[str, torch.Tensor]] = None, ax: Any = None) -> tuple[Any, Any]:
        """Bar chart of the per-layer alphas of ``val`` (default: ``compute()``); returns ``(fig, ax)``."""
        from farms_lightning.reporting.plotting import plot_alphas

        val = self.compute() if val is None else val
        alphas = {k.removeprefix("alpha/"): float(v) for k, v in val.items() if k.startswith("alpha/")}
        return plot_alphas(alphas, ax=ax)

