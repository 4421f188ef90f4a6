"""Figures (optional, needs matplotlib): pooled ESDs with their fits, alphas per layer, and a heatmap
of a metric over the whole training history (layers x analyses)."""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Union

import numpy as np

from farms_lightning.engine.powerlaw import nonzero_eigenvalues
from farms_lightning.engine.report import FARMSReport
from farms_lightning.reporting.history import History, history_matrix, load_history


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


def plot_alphas(alphas: Union[FARMSReport, Mapping[str, float]], ax: Any = None,
                weightwatcher_band: bool = False) -> tuple[Any, Any]:
    """Bar chart of alpha per layer (model order), each against its own random-matrix baseline.

    With a report whose layers carry a baseline, each bar gets a black marker at the baseline's
    alpha with a bar over the spread of its random draws: a layer whose alpha sits inside that bar
    looks random. ``weightwatcher_band`` shades WeightWatcher's "2 <= alpha <= 6" band, which holds
    for full-ESD ``ks`` fits only (``esd="full", fit="ks"``): leave it off elsewhere.
    """
    plt = _pyplot()
    if isinstance(alphas, FARMSReport):
        fitted = [s for s in alphas.layers if s.alpha is not None]
        values = {s.name: float(s.alpha) for s in fitted if s.alpha is not None}
        baselines = {s.name: (s.alpha_random, s.alpha_random_spread) for s in fitted
                     if s.alpha_random is not None and s.alpha_random_spread is not None}
    else:
        values, baselines = dict(alphas), {}
    names = list(values)
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(max(5.0, 0.4 * len(names) + 2), 4.0))
    ax.bar(range(len(names)), [values[n] for n in names], color="tab:blue", label="alpha")
    if baselines:
        xs = [i for i, n in enumerate(names) if n in baselines]
        ax.errorbar(xs, [baselines[names[i]][0] for i in xs], yerr=[baselines[names[i]][1] / 2 for i in xs],
                    fmt="_", color="black", ms=12, capsize=3, label="random-matrix alpha (range of draws)")
    if weightwatcher_band:
        ax.axhspan(2.0, 6.0, color="tab:green", alpha=0.1, label="2 ≤ alpha ≤ 6 (WeightWatcher, full ESD + ks)")
    ax.set_xticks(range(len(names)), [_plain_text(n or "(model)") for n in names], rotation=90, fontsize=9)
    ax.set_xlabel("layer (model order)")
    ax.set_ylabel("alpha")
    if baselines or weightwatcher_band:
        ax.legend(loc="upper right", fontsize=8)
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
        ax.set_title(_plain_text(name or "(model)"), fontsize=8)
        ax.set_xlabel("eigenvalue λ", fontsize=7)
        ax.set_ylabel("density", fontsize=7)
        ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def plot_history(history_or_path: Union[History, str, os.PathLike], metric: str = "alpha", ax: Any = None
                 ) -> tuple[Any, Any]:
    """Heatmap of ``metric`` over a training history: layers (rows, model order) x analyses (columns,
    ``init`` = before training, ``e<N>`` = end of epoch N, ``s<N>`` = after step N).

    ``history_or_path`` is ``callback.history`` or a file written by ``save_history`` (JSON or CSV).
    ``metric`` is any numeric row key (``"alpha"``, ``"alpha_delta"``, ``"stable_rank"``, ...);
    differences from a baseline (``alpha_delta``) get a diverging colour map centred on zero. Cells
    without a value (a layer not fitted in that analysis) are grey.

    Raises:
        ValueError: an empty history or a metric its rows do not hold.

    Example::

        >>> fig, ax = plot_history("lightning_logs/version_0/farms_history.json")
        >>> fig.savefig("heatmap.png")
    """
    plt = _pyplot()
    layers, columns, values = history_matrix(load_history(history_or_path), metric)
    data = np.ma.masked_invalid(np.array(values, dtype=float))
    if ax is None:  # near TensorBoard's card shape (about 4:3), so that the labels stay readable there
        label_width = 0.09 * max(len(name) for name in layers)
        fig, ax = plt.subplots(figsize=(min(16.0, 2.5 + label_width + 0.4 * len(columns)),
                                        min(16.0, max(3.5, 1.8 + 0.3 * len(layers)))))
    else:
        fig = ax.figure
    if metric.endswith("_delta"):  # signed: blue below zero (heavier tail than random), red above
        bound = float(np.abs(data).max()) if data.count() else 1.0
        cmap, limits = plt.get_cmap("RdBu_r"), {"vmin": -bound, "vmax": bound}
    else:
        cmap, limits = plt.get_cmap("viridis"), {}
    cmap = cmap.with_extremes(bad="lightgrey")
    image = ax.imshow(data, aspect="auto", interpolation="nearest", cmap=cmap, **limits)
    step = max(1, math.ceil(len(columns) / 30))  # at most ~30 column labels
    ax.set_xticks(range(0, len(columns), step), columns[::step], rotation=90 if len(columns) > 12 else 0,
                  fontsize=9)
    ax.set_yticks(range(len(layers)), [_plain_text(name) for name in layers], fontsize=9)
    steps = any(label.startswith("s") for label in columns)
    ax.set_xlabel("init: before training, eN: end of epoch N (from 0)" + (", sN: step N" if steps else ""),
                  fontsize=9)
    ax.set_ylabel("layer (model order; grey: no value)", fontsize=9)
    fig.colorbar(image, ax=ax, label=_plain_text(metric))
    # alpha_delta: blue is a heavier tail than random matrices of the layer's shape (learned structure).
    blue = " (blue: heavier tail than random)" if metric == "alpha_delta" else ""
    ax.set_title(f"{_plain_text(metric)} per layer{blue}", fontsize=10)
    fig.tight_layout()
    return fig, ax


def _plain_text(label: str) -> str:
    """``label`` drawn as written: matplotlib reads text between two ``$`` as mathtext, so a layer
    named ``$\\foo{$`` would fail to draw; an escaped ``\\$`` is drawn as a dollar sign."""
    return label.replace("$", r"\$")
