"""The result of an analysis: per-layer statistics, model summary, rows and a printable table."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Mapping

import torch

#: Alpha thresholds of WeightWatcher's labels, calibrated on full-ESD ``ks`` fits and used only there.
OVER_TRAINED_ALPHA = 2.0
UNDER_TRAINED_ALPHA = 6.0
#: A layer shows learned structure when its alpha is below its random-matrix baseline by more than
#: this many spreads (ranges of the baseline's draws); see :func:`looks_random`.
RANDOM_SPREAD_FACTOR = 1.5
#: Every value of ``LayerStats.status``.
LAYER_STATUSES = ("ok", "skipped", "failed", "too_small")


@dataclass(frozen=True)
class LayerStats:
    """FARMS statistics of one weight matrix; ``status`` is ``"ok"`` exactly when alpha is a float.

    ``"skipped"`` layers were not analysable, ``"too_small"`` ones have windows too small to judge
    (fewer than 16 eigenvalues each; no alpha, left out of every summary value) and ``"failed"`` ones
    gave no fit; ``reason`` says why (for an ``"ok"`` layer it is empty, or a note on how it was read,
    e.g. a fused projection left whole).
    Metrics are ``None`` where they do not exist (skipped layers have none). ``lambda_max``,
    ``log_spectral_norm``, ``norm``, ``log_norm`` and ``stable_rank`` describe the whole weight
    matrix (a conv: its unscaled ``(out, in/groups·kh·kw)`` reshape, the mean over groups), in every
    ESD mode; ``log_alpha_norm`` and ``entropy`` the ESD alpha was fitted on; ``alpha_weighted`` is
    ``alpha · log_spectral_norm``. For convolutions (paper's block sampling) the fit and ESD
    statistics are the means over blocks and the counts are totals.
    """

    name: str
    type: str
    shape: tuple[int, ...]
    status: str
    reason: str
    alpha: float | None = None
    xmin: float | None = None
    D: float | None = None
    num_evals: int = 0
    num_dropped: int = 0
    lambda_max: float | None = None
    log_spectral_norm: float | None = None
    norm: float | None = None
    log_norm: float | None = None
    alpha_weighted: float | None = None
    log_alpha_norm: float | None = None
    stable_rank: float | None = None
    entropy: float | None = None
    num_params: int = 0
    # Random-matrix baseline (baseline.py): None without a baseline or without a fit.
    alpha_random: float | None = None
    alpha_random_spread: float | None = None
    alpha_delta: float | None = None

    def to_row(self) -> dict[str, Any]:
        row = asdict(self)
        row["shape"] = list(self.shape)
        return row


class FARMSReport(Mapping[str, LayerStats]):
    """Per-layer :class:`LayerStats` by layer name, in model order, plus a model ``summary``.

    Example::

        >>> report = analyze(model)
        >>> report["features.3"].alpha, report.summary["alpha_mean"]
        >>> print(report.to_table())
    """

    def __init__(
        self,
        layers: list[LayerStats],
        settings: Mapping[str, Any],
        eigenvalues: Mapping[str, list[torch.Tensor]] | None = None,
    ) -> None:
        self.layers: tuple[LayerStats, ...] = tuple(layers)
        self.settings: dict[str, Any] = dict(settings)
        #: Sorted ESDs by layer name (one per conv block), when the analysis kept them.
        self.eigenvalues: dict[str, list[torch.Tensor]] = dict(eigenvalues or {})
        self._by_name = {layer.name: layer for layer in self.layers}
        self.summary: dict[str, float] = summarize(self.layers, self.settings)

    def __getitem__(self, name: str) -> LayerStats:
        return self._by_name[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)

    @property
    def alphas(self) -> dict[str, float]:
        """Fitted alphas by layer name (layers without a fit left out)."""
        return {layer.name: layer.alpha for layer in self.layers if layer.alpha is not None}

    def to_rows(self) -> list[dict[str, Any]]:
        """One plain dict per analysed or skipped layer, in model order."""
        return [layer.to_row() for layer in self.layers]

    def to_table(self) -> str:
        """A fixed-width text table: name, type, shape, alpha, D, num_evals, status/reason."""
        baseline = any(layer.alpha_random is not None for layer in self.layers)
        header = ("layer", "type", "shape", "alpha", *(("alpha_random", "alpha_delta") if baseline else ()),
                  "D", "evals", "status")
        rows = [header] + [
            (
                layer.name or "(model)",
                layer.type,
                "x".join(map(str, layer.shape)),
                _fmt(layer.alpha),
                *((_fmt(layer.alpha_random), _fmt(layer.alpha_delta)) if baseline else ()),
                _fmt(layer.D),
                str(layer.num_evals),
                f"{layer.status}: {layer.reason}" if layer.reason else layer.status,
            )
            for layer in self.layers
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]
        s = self.summary
        lines.append(
            f"alpha mean {_fmt(s['alpha_mean'])}, median {_fmt(s['alpha_median'])}; "
            f"{s['num_fitted']} fitted, {s['num_too_small']} too small, {s['num_failed']} failed, "
            f"{s['num_skipped']} skipped"
            + (f"; alpha_delta mean {_fmt(s['alpha_delta_mean'])} (random-matrix alpha mean "
               f"{_fmt(s['alpha_random_mean'])}), {_fmt(s['num_looks_random'])} of {s['num_fitted']} fitted "
               "look random" if baseline else "")
        )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"FARMSReport({len(self)} layers, summary={self.summary})"


def _fmt(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4g}"


def summarize(layers: tuple[LayerStats, ...], settings: Mapping[str, Any] | None = None) -> dict[str, float]:
    """Model-level statistics; the means are NaN when no layer was fitted.

    ``num_under_trained`` and ``num_over_trained`` follow :func:`health_counts` for ``settings``.
    """
    fitted = [layer for layer in layers if layer.alpha is not None]
    alphas = [layer.alpha for layer in layers if layer.alpha is not None]
    weighted = [layer.alpha_weighted for layer in fitted if layer.alpha_weighted is not None]
    randoms = [layer.alpha_random for layer in fitted if layer.alpha_random is not None]
    deltas = [layer.alpha_delta for layer in fitted if layer.alpha_delta is not None]
    verdicts = [v for v in (looks_random(layer) for layer in fitted) if v is not None]
    under, over = health_counts(fitted, settings)
    return {
        "alpha_mean": statistics.fmean(alphas) if alphas else math.nan,
        "alpha_median": statistics.median(alphas) if alphas else math.nan,
        "alpha_weighted_mean": statistics.fmean(weighted) if weighted else math.nan,
        "alpha_random_mean": statistics.fmean(randoms) if randoms else math.nan,
        "alpha_delta_mean": statistics.fmean(deltas) if deltas else math.nan,
        "alpha_delta_median": statistics.median(deltas) if deltas else math.nan,
        "num_layers": len(layers),
        "num_fitted": len(fitted),
        "num_looks_random": sum(verdicts) if verdicts else math.nan,
        "num_too_small": sum(layer.status == "too_small" for layer in layers),
        "num_skipped": sum(layer.status == "skipped" for layer in layers),
        "num_failed": sum(layer.status == "failed" for layer in layers),
        "num_under_trained": under,
        "num_over_trained": over,
    }


def uses_weightwatcher_labels(settings: Mapping[str, Any] | None) -> bool:
    """WeightWatcher's alpha thresholds were calibrated on full-ESD ``ks`` fits: only there do they apply."""
    return settings is not None and settings.get("esd") == "full" and settings.get("fit") == "ks"


def looks_random(layer: LayerStats) -> bool | None:
    """Whether a layer's alpha is indistinguishable from its random-matrix baseline (``None``: no baseline).

    True unless ``alpha_delta < -RANDOM_SPREAD_FACTOR * alpha_random_spread``. The spread is the
    range of 5 random draws, about 2.3 standard deviations of one draw; the delta of a random layer
    varies by about 1.15 of them (its own draw plus the noise of the median), so 1.5 spreads is
    about 3 of the delta's standard deviations: a random layer passes as "learned" about once in
    a thousand layers (with 1 spread: about once in fifty).
    """
    if layer.alpha_delta is None or layer.alpha_random_spread is None:
        return None
    return layer.alpha_delta >= -RANDOM_SPREAD_FACTOR * layer.alpha_random_spread


def health_counts(fitted: list[LayerStats], settings: Mapping[str, Any] | None) -> tuple[float, float]:
    """``(num_under_trained, num_over_trained)``: WeightWatcher's labels, only where they were calibrated.

    Under ``esd="full", fit="ks"``: alpha > 6 is under-trained, alpha < 2 over-trained. Elsewhere
    both are NaN ("not assessed", never "none"): the thresholds do not carry over to other ESD
    modes or fits. What every setting with a baseline does report is ``num_looks_random``
    (:func:`looks_random`).
    """
    if not uses_weightwatcher_labels(settings):
        return math.nan, math.nan
    alphas = [layer.alpha for layer in fitted if layer.alpha is not None]
    return sum(a > UNDER_TRAINED_ALPHA for a in alphas), sum(a < OVER_TRAINED_ALPHA for a in alphas)
