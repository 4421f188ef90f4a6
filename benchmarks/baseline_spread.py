"""How widely random matrices' alphas spread by shape: the calibration of "too small to judge".

    python benchmarks/baseline_spread.py          # about 30 s on 2 cores

For heads of 2, 3, 8, 10, 16, 24, 32 and 64 rows (768 columns) and two ordinary layers, prints the
FARMS windows each gets at the cv preset and, per fit, the range of its 5 random-matrix draws
(``alpha_random_spread``, the baseline's spread). A layer's ``alpha_delta`` can be told from
chance only when it is well beyond that range; trained layers move by about 0.05 to 0.5 (median
fit). Windows below ``MIN_WINDOW_SIDE`` rows are reported ``too_small``, so the rows below that
analyse them with the rule lifted.
"""

from __future__ import annotations

import argparse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fits", nargs="+", default=["median", "peak", "ks"], choices=["median", "peak", "ks"])
    args = parser.parse_args()

    import torch
    from torch import nn

    from farms_lightning import analyze
    from farms_lightning.engine import layer_plans

    shapes = [(2, 768), (3, 768), (8, 768), (10, 768), (16, 768), (24, 768), (32, 768), (64, 768), (384, 384),
              (768, 3072)]
    threshold, layer_plans.MIN_WINDOW_SIDE = layer_plans.MIN_WINDOW_SIDE, 0  # measure below the rule too
    print(f"MIN_WINDOW_SIDE = {threshold}\n")
    print("| shape | windows | " + " | ".join(f"{fit} spread" for fit in args.fits) + " |")
    print("|---|---|" + "---:|" * len(args.fits))
    for rows, cols in shapes:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(cols, rows))
        spreads = []
        for fit in args.fits:
            stats = analyze(model, fit=fit).layers[0]
            spreads.append(f"{stats.alpha_random_spread:.3f}")
        side = min(rows, cols, 100)
        print(f"| {rows}x{cols} | {side}x{side} | " + " | ".join(spreads) + " |", flush=True)


if __name__ == "__main__":
    main()
