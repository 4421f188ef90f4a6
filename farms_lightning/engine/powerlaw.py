"""Power-law fits of a pooled ESD (docs/method.md): ``median``, ``ks`` and ``peak``.

For a candidate index ``i`` (``xmin = λ_i``, ``n = N - i``) the Hill/MLE exponent is
``alpha_i = 1 + n / Σ_{j≥i} ln(λ_j / λ_i)`` and the references' one-sided distance is
``D_i = max_t |1 - (λ_{i+t}/λ_i)^(1-alpha_i) - t/n|``. All candidates are handled as tensors: the
Hill sums for every ``i`` come from one suffix sum of non-negative terms (no cancellation on flat
spectra), and the O(N²) distance scan is chunked and pruned exactly by sampled lower/upper bounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import torch

from farms_lightning.engine.threads import single_threaded_ops

FIT_METHODS = ("median", "ks", "peak")
PEAK_BOUNDS = ("reference", "corrected")
#: Eigenvalues at or below this fraction of the largest are numerically zero and dropped: singular
#: values below ``1e-12·σmax``, the float64 SVD's own noise floor (its absolute error is a small
#: multiple of ``eps·σmax``, at most ``n·eps·σmax ≈ 1e-12·σmax`` for ``n`` up to ~4500). Such values
#: come from exact rank deficiency (pruned rows, zero padding, low-rank updates). Everything above is
#: a genuine eigenvalue of the stored matrix and is kept: the peak fit's log-histogram spans from the
#: smallest value, and an earlier rule (``λ <= 1e-12·λmax``) moved real MiniLM peak alphas by 16%.
ZERO_TOLERANCE = 1e-24
#: A tail whose values all lie within this relative spread of xmin is flat: no power law.
FLAT_TOLERANCE = 1e-9


def flat_tolerance_for(weight_dtype: torch.dtype) -> float:
    """The flat-spectrum tolerance for eigenvalues of weights stored in ``weight_dtype``.

    An orthogonal matrix is only orthogonal to its storage precision: built in float32 (QR in
    float32) its λ spread by up to ~40 ulps (5e-6 at 2000x2000), cast to bf16/fp16 by ~1.2 ulps of
    that format. A 1e-9 tolerance would call such a layer "fitted" with alpha ~1e6, so below
    float64 the tolerance is ``max(64·eps(float32), 4·eps(dtype))``. No real power-law tail is
    that narrow (it would mean alpha > 1e5).
    """
    if weight_dtype == torch.float64 or not weight_dtype.is_floating_point:
        return FLAT_TOLERANCE
    return max(64 * torch.finfo(torch.float32).eps, 4 * torch.finfo(weight_dtype).eps)
#: Elements of one temporary (candidates x points) block in the distance scan.
SCAN_CHUNK = 1 << 22
#: Sample counts of the successive pruning passes of the ks/peak scan.
PRUNE_SAMPLES = (32, 256, 2048)
#: Below this many (candidate, point) pairs the exact scan is cheaper than pruning first.
DIRECT_SCAN_PAIRS = 1 << 18

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence[float]]


@dataclass(frozen=True)
class PowerLawFit:
    """The fitted power law of one ESD.

    ``status`` is ``"ok"`` exactly when ``alpha`` is a float; otherwise ``"failed"`` with a human
    ``reason`` (too few eigenvalues, flat spectrum, no peak candidate, non-finite input).
    ``num_evals`` counts the eigenvalues after dropping ``num_dropped`` numerical zeros.
    """

    alpha: float | None
    xmin: float | None
    D: float | None
    num_evals: int
    num_dropped: int
    status: str
    reason: str


def validate_fit_args(method: str, min_eigenvalues: int, peak_bound: str) -> None:
    """Raise ``ValueError`` naming the argument and its allowed values."""
    if method not in FIT_METHODS:
        raise ValueError(f"`fit`/`method` must be one of {FIT_METHODS}, got {method!r}")
    if isinstance(min_eigenvalues, bool) or not isinstance(min_eigenvalues, int) or min_eigenvalues < 2:
        raise ValueError(f"`min_eigenvalues` must be an integer >= 2, got {min_eigenvalues!r}")
    if peak_bound not in PEAK_BOUNDS:
        raise ValueError(f"`peak_bound` must be one of {PEAK_BOUNDS}, got {peak_bound!r}")


def nonzero_eigenvalues(ev: ArrayLike) -> tuple[torch.Tensor, int]:
    """Sorted float64 CPU eigenvalues above ``ZERO_TOLERANCE · λmax`` (1e-24), and how many were dropped.

    Only numerical zeros are dropped: values at the float64 SVD's noise floor (``σ <= 1e-12·σmax``),
    e.g. exact zeros from pruned rows. Genuine small eigenvalues are kept, however small.

    Raises ``ValueError`` unless ``ev`` is one-dimensional. Non-finite values are returned as they
    are (callers check); an ESD with no positive value returns an empty tensor.
    """
    values = torch.as_tensor(ev).detach().to(device="cpu", dtype=torch.float64)
    if values.dim() != 1:
        raise ValueError(f"eigenvalues must be a 1-D tensor or array, got shape {tuple(values.shape)}")
    if len(values) > 1 and not bool((values[1:] >= values[:-1]).all()):  # the engine's ESDs come sorted
        values = torch.sort(values).values
    if len(values) == 0 or not torch.isfinite(values).all():
        return values, 0
    keep = values > ZERO_TOLERANCE * values[-1]
    kept = values[keep]
    return kept, len(values) - len(kept)


def fit_power_law(
    ev: ArrayLike,
    method: str = "median",
    min_eigenvalues: int = 10,
    peak_bound: str = "reference",
    flat_tolerance: float = FLAT_TOLERANCE,
) -> PowerLawFit:
    """Fit the power-law tail of an ESD as the FARMS/TempBalance/WeightWatcher references do.

    Args:
        ev: eigenvalues (1-D tensor, array or sequence), in any order; zeros are dropped here.
        method: ``"median"`` (xmin at the middle value), ``"ks"`` (xmin minimising D over all
            values) or ``"peak"`` (xmin minimising D near the histogram peak of log10 λ).
        min_eigenvalues: fewest non-zero eigenvalues a fit needs.
        peak_bound: ``"reference"`` reproduces the references' lower candidate bound
            ``log10(0.95·peak)``; ``"corrected"`` uses ``0.95·peak``.
        flat_tolerance: a tail whose values lie within this relative spread is "flat" (no power
            law); :func:`analyze` widens it to the precision of low-precision weights.

    Returns:
        A :class:`PowerLawFit`; data problems give ``status="failed"``, never an exception.

    Raises:
        ValueError: a bad argument, or ``ev`` not one-dimensional.

    Example::

        >>> fit = fit_power_law(torch.rand(1000) ** -2, method="median")
        >>> fit.status, round(fit.alpha, 1)
        ('ok', 1.5)
    """
    validate_fit_args(method, min_eigenvalues, peak_bound)
    values, dropped = nonzero_eigenvalues(ev)
    with single_threaded_ops():  # see farms_lightning.engine.threads: faster and robust on busy cores
        return fit_nonzero(values, dropped, method, min_eigenvalues, peak_bound, flat_tolerance)


def fit_nonzero(
    values: torch.Tensor,
    dropped: int,
    method: str,
    min_eigenvalues: int,
    peak_bound: str,
    flat_tolerance: float = FLAT_TOLERANCE,
) -> PowerLawFit:
    """:func:`fit_power_law` on the output of :func:`nonzero_eigenvalues` (arguments validated)."""
    n = len(values)

    def failed(reason: str, count: int = n) -> PowerLawFit:
        return PowerLawFit(None, None, None, count, dropped, "failed", reason)

    if n and not torch.isfinite(values).all():
        return failed("non-finite eigenvalues", 0)
    if n < min_eigenvalues:
        return failed(f"too few eigenvalues: {n} < min_eigenvalues={min_eigenvalues}")
    tail = _TailStatistics(values, flat_tolerance)
    if method == "median":
        candidates = torch.tensor([n // 2])
    elif method == "ks":
        candidates = torch.arange(n - 1)
    else:
        candidates = _peak_candidates(values, peak_bound)
        if len(candidates) == 0:
            return failed("no peak candidate: no eigenvalue in the peak's xmin range")
    candidates = candidates[tail.fittable(candidates)]
    if len(candidates) == 0:
        if method == "peak" and not bool(tail.flat[0]):
            return failed("no peak candidate: no xmin near the peak has a power-law tail")
        return failed("flat spectrum: the tail has no spread, so no power law")
    best, distance = tail.min_distance(candidates)
    return PowerLawFit(
        alpha=float(tail.alpha[best]),
        xmin=float(values[best]),
        D=distance,
        num_evals=n,
        num_dropped=dropped,
        status="ok",
        reason="",
    )


def _peak_candidates(values: torch.Tensor, peak_bound: str) -> torch.Tensor:
    """Indices ``i <= N-2`` with ``lo <= λ_i <= 1.5·peak`` around the fullest log10-histogram bin."""
    logs = torch.log10(values)
    low, high = float(logs[0]), float(logs[-1])
    if low == high:  # numpy widens a zero range by ±0.5
        low, high = low - 0.5, high + 0.5
    # Bin edges exactly as numpy.linspace builds them, membership exactly as numpy.histogram.
    edges = torch.arange(101, dtype=torch.float64) * ((high - low) / 100) + low
    edges[-1] = high
    bins = (torch.searchsorted(edges, logs, right=True) - 1).clamp_(0, 99)
    fullest = int(torch.argmax(torch.bincount(bins, minlength=100)))
    peak = 10.0 ** float(edges[fullest])
    lower = math.log10(0.95 * peak) if peak_bound == "reference" else 0.95 * peak
    inside = (values[:-1] >= lower) & (values[:-1] <= 1.5 * peak)
    return torch.nonzero(inside).reshape(-1)


class _TailStatistics:
    """Hill exponents of every candidate xmin of a sorted positive ESD, and their distances D."""

    def __init__(self, values: torch.Tensor, flat_tolerance: float) -> None:
        n = len(values)
        self.logs = torch.log(values)
        self.count = torch.arange(n, 0, -1, dtype=torch.float64)  # n_i = N - i
        # Σ_{j≥i} ln(λ_j/λ_i) = Σ_{k≥i} (N-k-1)·ln(λ_{k+1}/λ_k): a suffix sum of terms >= 0.
        steps = torch.log1p(torch.diff(values) / values[:-1]) * self.count[1:]
        sums = torch.zeros(n, dtype=torch.float64)
        sums[:-1] = torch.flip(torch.cumsum(torch.flip(steps, [0]), 0), [0])
        self.flat = values[-1] <= values * (1 + flat_tolerance)
        self.alpha = 1 + self.count / sums  # inf where the tail is flat

    def fittable(self, idx: torch.Tensor) -> torch.Tensor:
        """Candidates with a non-flat tail and a finite exponent above 1 (as the references)."""
        alpha = self.alpha[idx]
        return ~self.flat[idx] & torch.isfinite(alpha) & (alpha > 1)

    def _tail_cdf(self, idx: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``F(t) = 1 - (λ_{i+t}/λ_i)^(1-α_i)`` for candidate rows ``idx`` at float offsets ``t < n_i``.

        The exact scan and the pruning bounds both use this, so a sampled lower bound is computed
        with exactly the same operations as the full distance it bounds.
        """
        logs = self.logs[idx[:, None] + t.long()] - self.logs[idx][:, None]
        return 1 - torch.exp((1 - self.alpha[idx][:, None]) * logs)

    def _deviation(self, idx: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """``|F(t) - t/n_i|`` for candidate rows ``idx`` and offset grid ``t``.

        Offsets past a candidate's tail are clamped to its last point, which is then repeated.
        """
        n = self.count[idx][:, None]
        t = torch.minimum(offsets.to(torch.float64), n - 1)
        return torch.abs(self._tail_cdf(idx, t) - t / n)

    def distances(self, idx: torch.Tensor) -> torch.Tensor:
        """Exact ``D_i`` of each candidate, scanning its whole tail in bounded chunks."""
        out = torch.empty(len(idx), dtype=torch.float64)
        width = int(self.count[idx].max()) if len(idx) else 0
        rows = max(1, SCAN_CHUNK // max(width, 1))
        for start in range(0, len(idx), rows):
            part = idx[start:start + rows]
            offsets = torch.arange(int(self.count[part].max()))
            out[start:start + rows] = self._deviation(part, offsets[None, :]).amax(dim=1)
        return out

    def bounds(self, idx: torch.Tensor, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Lower and upper bounds on ``D_i`` from ``samples + 1`` evenly spaced tail points.

        The lower bound is the max over the sampled points. Between consecutive samples
        ``t_a < t_b`` both ``F(t) = 1 - (λ_{i+t}/λ_i)^(1-α)`` and ``t/n`` are non-decreasing, so
        ``|F(t) - t/n| <= max(F(t_b) - t_a/n, t_b/n - F(t_a))``, which bounds D from above.
        """
        lower = torch.empty(len(idx), dtype=torch.float64)
        upper = torch.empty(len(idx), dtype=torch.float64)
        rows = max(1, SCAN_CHUNK // (samples + 1))
        k = torch.arange(samples + 1, dtype=torch.float64)
        for start in range(0, len(idx), rows):
            part = idx[start:start + rows]
            n = self.count[part][:, None]
            t = torch.minimum(torch.ceil(n / samples) * k, n - 1)
            cdf = self._tail_cdf(part, t)
            gap = cdf - t / n
            lower[start:start + rows] = gap.abs().amax(dim=1)
            step_up = cdf[:, 1:] - t[:, :-1] / n
            step_down = t[:, 1:] / n - cdf[:, :-1]
            upper[start:start + rows] = torch.maximum(step_up, step_down).amax(dim=1).clamp_min(lower[start:start + rows])
        return lower, upper

    def min_distance(self, idx: torch.Tensor) -> tuple[int, float]:
        """The candidate with the smallest D (the first on ties) and that D, pruned exactly."""
        slack = 1e-12  # covers rounding in the bounds; pruning needs lower > best upper + slack
        for samples in PRUNE_SAMPLES:
            if len(idx) * float(self.count[idx].max()) <= DIRECT_SCAN_PAIRS:
                break
            lower, upper = self.bounds(idx, samples)
            idx = idx[lower <= upper.min() + slack]
        d = self.distances(idx)
        best = int(torch.argmin(d))
        return int(idx[best]), float(d[best])
