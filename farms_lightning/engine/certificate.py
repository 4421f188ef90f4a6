"""Certificates: does a fit (or an ESD metric) depend on eigenvalues that are not refined yet?

A nearly singular window's Gram eigenvalues below ``REFINE_RATIO·λmax`` are only known to within
``± e`` (``e = GRAM_ERROR_FACTOR·eps·λmax`` of the window, see :mod:`farms_lightning.engine.spectra`).
Rather than re-solving every such window by an SVD, the analysis fits the Gram values and asks here
whether *any* values inside those intervals could give another result; only then are the layer's
windows refined and the fit repeated. Every check below bounds all realisations at once:

- counts: no uncertain value may straddle the zero threshold of :func:`nonzero_eigenvalues`;
- the sorted order: let ``H`` be the largest upper end of an uncertain value; positions at or above
  ``i_H`` (the count of values ``<= H``) hold the same certified values in every realisation, and
  below it position ``p`` lies between the ``p``-th smallest lower and upper ends;
- ``median``: ``xmin`` sits at ``n // 2``, so the result is certain when ``n // 2 >= i_H``;
- ``ks``/``peak``: the winning ``xmin`` must sit at or above ``i_H`` (its alpha and D then use
  certified values only), and every candidate below ``i_H`` gets a lower bound on its distance ``D``
  from interval bounds on its alpha and on its tail CDF at certified points (``F`` rises with both);
  each must exceed the winner's ``D``. ``peak`` also needs the fullest log-histogram bin and the
  candidate range to be the same for every value the pooled minimum (the histogram's lower end) can
  take: bin indices move monotonically with it, so per-bin counts get certain/possible bounds;
- ``entropy`` and ``log_alpha_norm`` rise with every small value (checked), so evaluating them with
  all uncertain values at their lower and then upper ends brackets them; the bracket must be within
  ``1e-9`` relative.
"""

from __future__ import annotations

import math

import torch

from farms_lightning.engine.esd_metrics import esd_metrics
from farms_lightning.engine.powerlaw import ZERO_TOLERANCE, PowerLawFit

#: Relative width below which a bracketed ESD metric counts as exact (the analysis' accuracy target).
METRIC_RTOL = 1e-9
#: Slack of the distance comparisons, as in the pruned ks scan (rounding in the bounds).
DISTANCE_SLACK = 1e-12
#: Elements of one (candidates x points) block of the distance lower bounds.
BOUND_CHUNK = 1 << 21


def zeros_certain(values: torch.Tensor, errors: torch.Tensor) -> bool:
    """Whether no uncertain value can fall on either side of the zero threshold (exact counts)."""
    uncertain = errors > 0
    if not bool(uncertain.any()):
        return True
    threshold = ZERO_TOLERANCE * float(values[-1])
    low, high = values[uncertain] - errors[uncertain], values[uncertain] + errors[uncertain]
    return not bool(((low <= threshold) & (high > threshold)).any())


def fit_certain(values: torch.Tensor, errors: torch.Tensor, fit: PowerLawFit, method: str, peak_bound: str) -> bool:
    """Whether ``fit`` (of the non-zero, sorted ``values``) is the same for every value in ``± errors``."""
    uncertain = errors > 0
    if not bool(uncertain.any()):
        return True
    if fit.status != "ok" or fit.xmin is None or fit.D is None:
        return False  # a failed fit's reason may hinge on the uncertain values: refine (rare)
    n = len(values)
    high_end = float((values[uncertain] + errors[uncertain]).max())
    above = int(torch.searchsorted(values, torch.tensor([high_end], dtype=values.dtype), right=True))
    if method == "median":
        return n // 2 >= above
    if not fit.xmin > high_end:
        return False
    low_sorted = torch.sort(values - errors).values
    high_sorted = torch.sort(values + errors).values
    candidates = torch.arange(min(above, n - 1))
    if method == "peak":
        window = _peak_window(values, low_sorted, high_sorted, above, peak_bound)
        if window is None:
            return False
        lowest, highest = window
        candidates = candidates[(high_sorted[candidates] >= lowest) & (low_sorted[candidates] <= highest)]
    if len(candidates) == 0:
        return True
    return _distances_exceed(values, low_sorted, high_sorted, above, candidates, fit.D + DISTANCE_SLACK)


def metrics_certain(
    values: torch.Tensor, errors: torch.Tensor, alpha: float | None, at_values: dict[str, float | None] | None = None
) -> bool:
    """Whether ``entropy`` and ``log_alpha_norm`` stay within ``METRIC_RTOL`` for every value in ``± errors``.

    With ``S = Σλ`` and ``G = Σ λ ln λ``, ``entropy · ln n = ln S - G/S``, which rises with every value
    below the p-weighted mean log ``G/S`` (checked for the uncertain ones, with a margin);
    ``log_alpha_norm = log10 Σ λ^alpha`` rises with every value. So both are bracketed by their values
    with every uncertain value at its lower and at its upper end: the certain part is summed once.
    ``at_values``: the metrics of ``values`` when the caller has them (``esd_metrics(values, alpha)``).
    """
    uncertain = errors > 0
    if not bool(uncertain.any()):
        return True
    certain = values[~uncertain]
    ends = (values[uncertain] - errors[uncertain], values[uncertain] + errors[uncertain])
    at_values = esd_metrics(values, alpha) if at_values is None else at_values
    log_certain = torch.log(certain)
    s_certain, g_certain = float(certain.sum()), float((certain * log_certain).sum())
    brackets: dict[str, list[float]] = {"entropy": [], "log_alpha_norm": []}
    for end in ends:
        log_end = torch.log(end)
        s = s_certain + float(end.sum())
        g = g_certain + float((end * log_end).sum())
        if end is ends[0] and not float(log_end.max()) < g / s - 1e-3:
            return False  # not monotone over the intervals: cannot bracket (refine)
        brackets["entropy"].append((math.log(s) - g / s) / math.log(len(values)) if len(values) > 1 else 0.0)
        if alpha is not None:
            total = torch.logaddexp(torch.logsumexp(alpha * log_certain, 0), torch.logsumexp(alpha * log_end, 0))
            brackets["log_alpha_norm"].append(float(total) / math.log(10))
    for name, value in at_values.items():
        if value is None:
            continue
        low, high = brackets[name]
        if not abs(high - low) <= METRIC_RTOL * abs(value):
            return False
    return True


def _peak_window(
    values: torch.Tensor, low_sorted: torch.Tensor, high_sorted: torch.Tensor, above: int, peak_bound: str
) -> tuple[float, float] | None:
    """The widest candidate range ``[lowest, highest]`` of the peak fit over all realisations.

    ``None`` when the fullest histogram bin or the candidate set of certified values could differ.
    """
    n = len(values)
    if above >= n or not float(low_sorted[0]) > 0:
        return None
    high = math.log10(float(values[-1]))
    lows = (math.log10(float(low_sorted[0])), math.log10(float(high_sorted[0])))
    edges = [_edges(low, high) for low in lows]
    logs_low, logs_high = torch.log10(low_sorted), torch.log10(high_sorted)
    slack = 1e-12 * (logs_high.abs() + 1)
    # A bin index falls as the histogram's lower end rises (every edge but the last rises with it).
    first = _bins(logs_low - slack, edges[1])
    last = _bins(logs_high + slack, edges[0])
    certain = torch.bincount(first[first == last], minlength=100)
    spans = torch.zeros(101, dtype=torch.long)
    spans.index_add_(0, first, torch.ones_like(first))
    spans.index_add_(0, last + 1, -torch.ones_like(last))
    possible = torch.cumsum(spans, 0)[:100]
    fullest = int(torch.argmax(certain))
    others = possible.clone()
    others[fullest] = -1
    # torch.argmax keeps the first of equal counts: earlier bins must stay below, later ones not above.
    if bool((others[:fullest] >= certain[fullest]).any()) or bool((others[fullest + 1:] > certain[fullest]).any()):
        return None
    peaks = sorted(10.0 ** float(e[fullest]) for e in edges)
    lower = [math.log10(0.95 * p) if peak_bound == "reference" else 0.95 * p for p in peaks]
    upper = [1.5 * p for p in peaks]
    # Certified values (positions >= above, excluding the last) must be in or out for every peak.
    fixed = values[above:n - 1]
    tol = 1e-12 * fixed.abs()
    maybe_in = (fixed >= lower[0] - tol) & (fixed <= upper[1] + tol)
    surely_in = (fixed >= lower[1] + tol) & (fixed <= upper[0] - tol)
    if bool((maybe_in != surely_in).any()):
        return None
    return lower[0] - 1e-12 * abs(lower[0]), upper[1] * (1 + 1e-12)


def _edges(low: float, high: float) -> torch.Tensor:
    """The 101 histogram edges exactly as ``powerlaw._peak_candidates`` (numpy.histogram) builds them."""
    if low == high:
        low, high = low - 0.5, high + 0.5
    edges = torch.arange(101, dtype=torch.float64) * ((high - low) / 100) + low
    edges[-1] = high
    return edges


def _bins(logs: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    return (torch.searchsorted(edges, logs, right=True) - 1).clamp_(0, 99)


def _distances_exceed(
    values: torch.Tensor, low_sorted: torch.Tensor, high_sorted: torch.Tensor, above: int,
    candidates: torch.Tensor, threshold: float,
) -> bool:
    """Whether every candidate's distance ``D`` exceeds ``threshold`` in every realisation.

    For candidate ``a`` (``n_a = N - a`` tail points), its Hill sum ``S = Σ_{j>=a} ln λ_j - n_a ln λ_a``
    lies between the suffix sums of the sorted lower/upper ends minus ``n_a`` times the log of the
    other end of ``λ_a``, so ``alpha ∈ [1 + n_a/S_max, 1 + n_a/S_min]``. At a certified point
    ``q >= above`` with ratio ``r = ln λ_q - ln λ_a``, ``F = 1 - exp((1 - alpha) r)`` rises with both,
    so ``|F - (q-a)/n_a|`` is at least the distance from ``(q-a)/n_a`` to ``[F_low, F_high]``.
    A sample of points is tried first, then every point (a lower bound either way).
    """
    n = len(values)
    log_low, log_high = torch.log(low_sorted), torch.log(high_sorted)
    suffix_low = torch.flip(torch.cumsum(torch.flip(log_low, [0]), 0), [0])
    suffix_high = torch.flip(torch.cumsum(torch.flip(log_high, [0]), 0), [0])
    count = (n - candidates).to(torch.float64)
    rounding = 1e-13 * torch.flip(torch.cumsum(torch.flip(log_high.abs(), [0]), 0), [0])[candidates] + 1e-300
    s_min = suffix_low[candidates] - count * log_high[candidates] - rounding
    s_max = suffix_high[candidates] - count * log_low[candidates] + rounding
    alpha_low = torch.where(s_max > 0, 1 + count / s_max.clamp_min(1e-300), torch.ones_like(count)).clamp_min(1.0)
    alpha_high = torch.where(s_min > 0, 1 + count / s_min.clamp_min(1e-300), torch.full_like(count, math.inf))
    points = torch.arange(above, n)
    bounds = (alpha_low, alpha_high, log_low[candidates], log_high[candidates])
    for sample in (points[torch.linspace(0, len(points) - 1, min(len(points), 2048)).long()], points):
        keep = ~_exceeds(candidates, bounds, sample, torch.log(values), n, threshold)
        candidates = candidates[keep]
        bounds = tuple(b[keep] for b in bounds)  # type: ignore[assignment]
        if len(candidates) == 0:
            return True
    return False


def _exceeds(
    candidates: torch.Tensor, bounds: tuple[torch.Tensor, ...], points: torch.Tensor, logs: torch.Tensor, n: int,
    threshold: float,
) -> torch.Tensor:
    """Per candidate, whether the lower bound of its ``D`` over ``points`` exceeds ``threshold``."""
    alpha_low, alpha_high, log_a_low, log_a_high = bounds
    out = torch.zeros(len(candidates), dtype=torch.bool)
    rows = max(1, BOUND_CHUNK // max(len(points), 1))
    log_points = logs[points]
    for start in range(0, len(candidates), rows):
        part = slice(start, start + rows)
        a = candidates[part][:, None]
        y = (points[None, :] - a).to(torch.float64) / (n - a).to(torch.float64)
        r_low = (log_points[None, :] - log_a_high[part][:, None]).clamp_min(0)
        r_high = log_points[None, :] - log_a_low[part][:, None]
        f_low = 1 - torch.exp((1 - alpha_low[part][:, None]) * r_low)
        f_high = 1 - torch.exp((1 - alpha_high[part][:, None]) * r_high)
        gap = torch.maximum(f_low - y, y - f_high.nan_to_num(nan=1.0))
        out[part] = gap.amax(dim=1) > threshold
    return out
