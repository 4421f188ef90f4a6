"""Figures of a report (optional, needs matplotlib): pooled ESDs with their fits, alphas per layer."""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from farms_lightning.powerlaw import nonzero_eigenvalues
from farms_lightning.report import FARMSReport


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - exercised only without matplotlib
        raise ModuleNotFoundError(
            "farms_lightning figures need matplotlib: pip install 'farms_lightning[plot]'"
        ) from error
    return plt


def plot_alphas(alphas: Mapping[str, float], ax: Any = None) -> tuple[Any, Any]:
    """Bar chart of alpha per layer, with WeightWatcher's healthy band (2 to 6) shaded."""
    plt = _pyplot()
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(max(4.0, 0.35 * len(alphas) + 2), 3.5))
    names = list(alphas)
    ax.bar(range(len(names)), [alphas[n] for n in names], color="tab:blue")
    ax.axhspan(2.0, 6.0, color="tab:green", alpha=0.1, label="2 ≤ alpha ≤ 6")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_ylabel("alpha")
    ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    return fig, ax


def plot_esds(report: FARMSReport, max_layers: int = 16) -> Any:
    """Pooled ESDs on log-log axes with the fitted power-law tail, one panel per fitted layer.

    Needs a report made with ``keep_eigenvalues=True``; for convolutions the first block is shown.
    """
    plt = _pyplot()
    names = [n for n in report.eigenvalues if report[n].alpha is not None][:max_layers]
    cols = min(4, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        stats = report[name]
        ev = nonzero_eigenvalues(report.eigenvalues[name][0])[0].numpy()  # the values the fit saw
        bins = np.logspace(np.log10(ev[0]), np.log10(ev[-1]), 60)
        density, edges = np.histogram(ev, bins=bins, density=True)
        centers = np.sqrt(edges[1:] * edges[:-1])
        ax.loglog(centers[density > 0], density[density > 0], ".", ms=3, label="ESD")
        xmin, alpha = stats.xmin, stats.alpha  # conv layers: block means, drawn over block 1
        assert xmin is not None and alpha is not None  # only fitted layers are drawn
        tail = np.logspace(np.log10(xmin), np.log10(ev[-1]), 50)
        fraction = np.mean(ev >= xmin)
        ax.loglog(tail, fraction * (alpha - 1) / xmin * (tail / xmin) ** (-alpha), "r-", lw=1.2,
                  label=f"alpha={alpha:.2f}")
        ax.set_title(name or "(model)", fontsize=8)
        ax.legend(fontsize=6)
    fig.tight_layout()
    return fig
