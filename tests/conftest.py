import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# The CLI's results are compared with the in-memory CPU analysis: its default device is the CPU here
# also on a GPU machine (CUDA tests ask for --device cuda).
os.environ.setdefault("FARMS_LIGHTNING_DEVICE", "cpu")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def heavy_tailed(rows: int, cols: int, seed: int = 0, df: float = 4.0) -> torch.Tensor:
    """A Student-t matrix: bulk plus heavy tail, like trained weights."""
    g = np.random.default_rng(seed)
    return torch.from_numpy(g.standard_t(df, size=(rows, cols)) / np.sqrt(cols)).float()


def gaussian(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = np.random.default_rng(seed)
    return torch.from_numpy(g.standard_normal((rows, cols)) / np.sqrt(cols)).float()
