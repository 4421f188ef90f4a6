import math

import numpy as np
import pytest
import reference as ref
import torch
from conftest import gaussian, heavy_tailed

from farms_lightning.engine.windows import farms_grid, grid_starts
from farms_lightning.functional import farms_eigenvalues, full_eigenvalues


@pytest.mark.parametrize("size,win,k", [(256, 100, 9), (100, 100, 9), (101, 100, 9), (1000, 7, 3), (50, 10, 1), (12, 2, 20)])
def test_grid_starts_follow_the_spec(size, win, k):
    starts = grid_starts(size, win, k)
    assert list(starts) == ref.grid_starts(size, win, k)
    assert len(set(starts)) == len(starts) and starts[0] == 0 and starts[-1] <= size - win


def test_grid_clamps_for_any_aspect_ratio():
    grid = farms_grid(50, 300, window=100, aspect_ratio=2.0, windows_per_dim=4)
    assert (grid.rows, grid.cols) == (50, 100)
    grid = farms_grid(300, 120, window=100, aspect_ratio=2.0, windows_per_dim=4)
    assert (grid.rows, grid.cols) == (60, 120)  # floor(cols / Q) = 60 rows: the window fits
    assert farms_grid(1, 100000, 100, 1.0, 9) is None
    assert farms_grid(100000, 1, 100, 1.0, 9) is None


@pytest.mark.parametrize(
    "shape,m,q,k",
    [((256, 256), 100, 1.0, 9), ((300, 170), 64, 0.5, 5), ((90, 400), 100, 2.0, 4), ((37, 41), 100, 1.0, 9),
     ((128, 512), 50, 1.5, 1)],
)
def test_farms_eigenvalues_match_float64_svd(shape, m, q, k):
    w = heavy_tailed(*shape, seed=sum(shape))
    expected = ref.farms_eigs(w.double().numpy(), m, q, k)
    for dtype in (None, torch.float64):
        got = farms_eigenvalues(w, window=m, aspect_ratio=q, windows_per_dim=k, dtype=dtype)
        assert got.dtype == torch.float64 and got.dim() == 1
        assert torch.all(got[1:] >= got[:-1]) and torch.all(got >= 0)
        np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-10 * expected[-1])


def test_full_eigenvalues_match_float64_svd():
    for shape in [(200, 50), (50, 200), (64, 64)]:
        w = gaussian(*shape, seed=3)
        expected = ref.full_eigs(w.double().numpy())
        got = full_eigenvalues(w)
        assert len(got) == min(shape)
        np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-10 * expected[-1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_precision_weights_are_upcast(dtype):
    w = heavy_tailed(120, 150, seed=5).to(dtype)
    expected = ref.farms_eigs(w.double().numpy(), 100, 1.0, 3)
    got = farms_eigenvalues(w, windows_per_dim=3)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-10 * expected[-1])


def test_weights_are_never_modified():
    w = heavy_tailed(200, 300, seed=9)
    before = w.clone()
    farms_eigenvalues(w)
    full_eigenvalues(w, dtype=torch.float64)
    assert torch.equal(w, before)


def test_empty_when_no_window_and_errors_for_bad_input():
    assert farms_eigenvalues(torch.randn(1, 100000)).numel() == 0
    with pytest.raises(ValueError, match="2-D"):
        farms_eigenvalues(torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match="2-D"):
        full_eigenvalues(torch.randn(5))
    with pytest.raises(ValueError, match="window"):
        farms_eigenvalues(torch.randn(5, 5), window=1)
    with pytest.raises(ValueError, match="aspect_ratio"):
        farms_eigenvalues(torch.randn(5, 5), aspect_ratio=0)
    with pytest.raises(ValueError, match="windows_per_dim"):
        farms_eigenvalues(torch.randn(5, 5), windows_per_dim=0)
    with pytest.raises(ValueError, match="dtype"):
        farms_eigenvalues(torch.randn(5, 5), dtype=torch.int32)


def test_rank_deficient_matrix_keeps_its_zeros():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(100, 5, generator=g) @ torch.randn(5, 100, generator=g)
    ev = full_eigenvalues(w)
    assert len(ev) == 100
    assert int((ev > 1e-12 * ev[-1]).sum()) == 5
    assert math.isclose(float(ev.sum()), float((w.double() ** 2).sum()), rel_tol=1e-10)


def test_windows_solved_on_the_pool_give_the_same_bits_every_time():
    """Pool threads run torch ops on one thread each: a window's eigenvalues never depend on how the
    cores were shared (they did, in the last bits, when a pool thread kept OpenMP's default)."""
    from farms_lightning.engine.spectra import WindowSet, compute_spectra

    w = heavy_tailed(100, 90, seed=2)
    runs = [compute_spectra([WindowSet(w.unsqueeze(0), farms_grid(100, 90, 100, 1.0, 9))], workers=2)[0][0]
            for _ in range(8)]
    assert all(torch.equal(run, runs[0]) for run in runs)
