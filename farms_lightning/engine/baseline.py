"""The random-matrix baseline of a layer: the alpha that "no learned structure" gives.

Every (ESD mode, fit) pair puts alpha on its own scale, so an alpha means little alone. The baseline
of a layer is the alpha that exactly the same analysis (ESD mode, window, aspect ratio, grid, fit,
conv rules, ``min_eigenvalues``, ``peak_bound``, solver dtype) gives for i.i.d. Gaussian matrices of
the layer's analysed shape. One draw is noisy under the ``ks`` and ``peak`` fits, so the baseline is
the median over :data:`BASELINE_DRAWS` draws, with the range of the draws as its spread.

The matrices are drawn on the CPU in float64 from a private generator seeded with
:data:`BASELINE_SEED` (the global RNG is never touched; CPU and GPU runs see the same matrices),
moved to the layer's device and analysed by the engine itself (no math is repeated here). Results are
cached per (shape, layer kind, device, settings) for the life of the process, so a callback pays for
each shape once; layers of one shape share one baseline.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from farms_lightning.engine.report import LayerStats
from farms_lightning.engine.spectra import resolve_dtype
from farms_lightning.models.layers import LayerMatrix

#: Gaussian matrices analysed per shape; the baseline is the median of their alphas.
BASELINE_DRAWS = 5
#: Seed of the private generator: draw ``d`` of every shape is the ``d``-th matrix it produces.
BASELINE_SEED = 0
#: Most random weights held at once while a baseline is computed (float64: 256 MB).
BATCH_ELEMENTS = 1 << 25
#: Settings that do not change the analysis of a matrix (left out of the cache key).
_NOT_ANALYSIS = ("preset", "random_baseline")

Analyse = Callable[[list[LayerMatrix], dict[str, Any]], Sequence[LayerStats | None]]


@dataclass(frozen=True)
class Baseline:
    """The random-matrix alpha of one (shape, settings): median and range of the draws' alphas.

    ``alpha`` is ``None`` when fewer than a majority of the draws gave a fit.
    """

    alpha: float | None
    spread: float | None
    draws: tuple[float | None, ...]


_cache: dict[tuple, Baseline] = {}
_lock = threading.Lock()


def random_matrices(shape: Sequence[int], draws: int = BASELINE_DRAWS, seed: int = BASELINE_SEED) -> Iterator[torch.Tensor]:
    """The baseline's i.i.d. standard-normal float64 CPU matrices of ``shape``, one at a time.

    Draw ``d`` is the ``d``-th matrix of a private generator seeded with ``seed``; the global RNG
    is untouched.
    """
    generator = torch.Generator().manual_seed(seed)
    for _ in range(draws):
        yield torch.randn(tuple(shape), generator=generator, dtype=torch.float64)


def summarize_draws(alphas: Sequence[float | None]) -> Baseline:
    """Median and range (max − min) of the fitted draws; ``None`` without a majority of fits."""
    fitted = [a for a in alphas if a is not None]
    if 2 * len(fitted) <= len(alphas):
        return Baseline(None, None, tuple(alphas))
    return Baseline(statistics.median(fitted), max(fitted) - min(fitted), tuple(alphas))


def cache_key(layer: LayerMatrix, settings: dict[str, Any]) -> tuple:
    """What the baseline of ``layer`` depends on: analysed shape, kind, orientation, device, settings."""
    normalised = {k: v for k, v in settings.items() if k not in _NOT_ANALYSIS}
    normalised["dtype"] = resolve_dtype(settings.get("dtype"))
    w = layer.weight
    device = "meta" if layer.is_lazy else str(w.device)
    return (layer.kind, analysed_shape(layer), layer.groups, device,
            tuple(sorted((k, repr(v)) for k, v in normalised.items())))


def analysed_shape(layer: LayerMatrix) -> tuple[int, ...]:
    """The shape of :meth:`LayerMatrix.oriented` without reading the weight: ``(out, in)`` for
    matrices (a q/k/v part its own third), the stored shape for convolutions."""
    shape = tuple(layer.shape)
    return (shape[1], shape[0]) if layer.transposed and len(shape) == 2 else shape


def random_baselines(layers: Sequence[LayerMatrix], settings: dict[str, Any], analyse: Analyse) -> list[Baseline]:
    """The baseline of every layer, computed for shapes not yet in the cache.

    ``analyse(layers, settings)`` is the engine (``analyze_layers`` without the baseline): it is
    given :data:`BASELINE_DRAWS` random stand-ins per new shape: plain layers of the same kind, conv
    groups and analysed shape (q/k/v parts, ``Conv1D`` and LoRA layers are compared with a plain
    matrix of the shape they are analysed as).
    """
    keys = [cache_key(layer, settings) for layer in layers]
    with _lock:
        missing = {key: layer for key, layer in zip(keys, layers) if key not in _cache}
    if missing:
        computed = {key: _analyse_draws(layer, settings, analyse) for key, layer in missing.items()}
        with _lock:
            _cache.update(computed)
    with _lock:
        return [_cache[key] for key in keys]


def _analyse_draws(layer: LayerMatrix, settings: dict[str, Any], analyse: Analyse) -> Baseline:
    """The draws of one shape, analysed in batches of at most :data:`BATCH_ELEMENTS` weights.

    Huge layers (an LLM's 4096 x 11008 is 360 MB per float64 draw) are then analysed draw by draw
    instead of holding all draws at once.
    """
    plain = {**settings, "random_baseline": False}
    shape = analysed_shape(layer)
    per_batch = max(1, BATCH_ELEMENTS // max(1, math.prod(shape)))
    device = layer.weight.device
    alphas: list[float | None] = []
    batch: list[LayerMatrix] = []
    for d, w in enumerate(random_matrices(shape)):
        # A plain stand-in of the analysed shape: same kind and conv groups, nothing to split or read.
        batch.append(dataclasses.replace(layer, name=f"random[{d}]", weight=w.to(device), transposed=False,
                                         split=None, module=None, reader=None, origin="", skip_reason="", note=""))
        if len(batch) == per_batch:
            alphas += [s.alpha if s is not None else None for s in analyse(batch, plain)]
            batch = []
    if batch:
        alphas += [s.alpha if s is not None else None for s in analyse(batch, plain)]
    return summarize_draws(alphas)


def clear_cache() -> None:
    """Forget every cached baseline (they are recomputed on next use, with equal results)."""
    with _lock:
        _cache.clear()


def with_baseline(stats: LayerStats, baseline: Baseline) -> LayerStats:
    """``stats`` with ``alpha_random``, ``alpha_random_spread`` and ``alpha_delta`` filled in."""
    if baseline.alpha is None or stats.alpha is None:
        return stats
    return dataclasses.replace(stats, alpha_random=baseline.alpha, alpha_random_spread=baseline.spread,
                               alpha_delta=stats.alpha - baseline.alpha)
