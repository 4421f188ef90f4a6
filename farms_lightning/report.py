"""The result of an analysis: per-layer statistics, model summary, rows and a printable table."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Mapping

import torch

#: Alpha thresholds of WeightWatcher's labels.
OVER_TRAINED_ALPHA = 2.0
UNDER_TRAINED_ALPHA = 6.0


@dataclass(frozen=True)
class LayerStats:
    """FARMS statistics of one weight matrix; ``status`` is ``"ok"`` exactly when alpha is a float.

    ``"skipped"`` layers were not analysable and ``"failed"`` ones gave no fit; ``reason`` says why
    (for an ``"ok"`` layer it is empty, or a note on how it was read, e.g. a fused projection left whole).
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
        self.summary: dict[str, float] = summarize(self.layers)

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
        header = ("layer", "type", "shape", "alpha", "D", "evals", "status")
        rows = [header] + [
            (
                layer.name or "(model)",
                layer.type,
                "x".join(map(str, layer.shape)),
                _fmt(layer.alpha),
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
            f"{s['num_fitted']} fitted, {s['num_failed']} failed, {s['num_skipped']} skipped"
        )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"FARMSReport({len(self)} layers, summary={self.summary})"


def _fmt(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4g}"


def summarize(layers: tuple[LayerStats, ...]) -> dict[str, float]:
    """Model-level statistics; the means are NaN when no layer was fitted."""
    fitted = [layer for layer in layers if layer.alpha is not None]
    alphas = [layer.alpha for layer in layers if layer.alpha is not None]
    weighted = [layer.alpha_weighted for layer in fitted if layer.alpha_weighted is not None]
    return {
        "alpha_mean": statistics.fmean(alphas) if alphas else math.nan,
        "alpha_median": statistics.median(alphas) if alphas else math.nan,
        "alpha_weighted_mean": statistics.fmean(weighted) if weighted else math.nan,
        "num_layers": len(layers),
        "num_fitted": len(fitted),
        "num_skipped": sum(layer.status == "skipped" for layer in layers),
        "num_failed": sum(layer.status == "failed" for layer in layers),
        "num_under_trained": sum(a > UNDER_TRAINED_ALPHA for a in alphas),
        "num_over_trained": sum(a < OVER_TRAINED_ALPHA for a in alphas),
    }
