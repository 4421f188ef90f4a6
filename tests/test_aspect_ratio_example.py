"""The aspect-ratio example's core claim, at a small size: full-ESD alpha drifts, FARMS alpha does not."""

import importlib.util
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "aspect_ratio_bias.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("aspect_ratio_bias", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_full_esd_alpha_drifts_with_the_aspect_ratio_and_farms_alpha_does_not(example):
    rows = example.synthetic_alphas(cols=64, ratios=(1, 4), seeds=3, window=32, windows_per_dim=6)
    for kind in example.KINDS:
        square, tall = [r for r in rows if r["kind"] == kind]
        assert (square["shape"], tall["shape"]) == ("64x64", "256x64")
        assert tall["full"] - square["full"] > 0.7, (kind, square, tall)  # measured: +1.33 (Gaussian), +0.95 (t)
        assert abs(tall["farms"] - square["farms"]) < 0.1, (kind, square, tall)  # measured: 0.04, 0.03
        assert 1.9 < square["farms"] < 2.3  # an i.i.d. matrix: the random-matrix alpha, whatever the shape

