"""Overlapping windows' Gram matrices from shared pieces equal the direct ones (to the Gram's accuracy)."""

import pytest
import torch
from conftest import heavy_tailed

from farms_lightning.engine import shared_gram
from farms_lightning.engine.spectra import WindowSet, compute_spectra, svd_eigenvalues
from farms_lightning.engine.window_solvers import GRAM_ERROR_FACTOR, structural_zeros
from farms_lightning.engine.windows import WindowGrid, farms_grid

EPS = 2.220446049250313e-16


@pytest.mark.parametrize(("shape", "window", "q"), [((300, 1200), 200, 1.0), ((1200, 300), 200, 1.0),
                                                     ((500, 500), 200, 1.0), ((900, 260), 240, 0.5)])
def test_band_grams_equal_the_direct_grams_and_zero_counts(shape, window, q):
    w = heavy_tailed(*shape, seed=1)
    w[5:9] = 0  # zero rows and columns inside some windows: exact structural zeros
    w[:, 40:44] = 0
    grid = farms_grid(*shape, window, q, 10)
    assert shared_gram.overlap(grid) >= shared_gram.MIN_OVERLAP
    ws = WindowSet(w.unsqueeze(0), grid)
    index = ws.window_index()
    bands: dict[tuple[int, int], list[int]] = {}
    for i, row in enumerate(index):
        bands.setdefault(shared_gram.band_key(grid, row), []).append(i)
    for members in bands.values():
        chosen = index[torch.tensor(members)]
        grams, zeros = shared_gram.band_grams(ws.matrices, grid, chosen)
        windows = ws.extract(chosen).double()
        direct = windows @ windows.mT if grid.rows <= grid.cols else windows.mT @ windows
        scale = direct.diagonal(dim1=-2, dim2=-1).sum(-1)[:, None, None]  # ‖X‖_F²
        assert bool(((grams - direct).abs() <= max(shape) * EPS * scale).all())
        assert torch.equal(zeros, structural_zeros(windows))


def test_overlapping_windows_are_solved_from_shared_pieces_to_svd_accuracy():
    w = heavy_tailed(400, 1000, seed=2)
    w[:, 100:130] = 0
    ws = WindowSet(w.unsqueeze(0), farms_grid(400, 1000, 300, 1.0, 10))
    assert shared_gram.overlap(ws.grid) > 3
    for defer in (False, True):
        compute_spectra([ws], defer_refinement=defer)
        ref = svd_eigenvalues(ws.extract(ws.window_index()).double())
        bound = 1e-9 * ref + 8 * EPS * (ref * ref[:, -1:]).sqrt() + ws.window_errors  # deferred: their bounds
        assert bool(((ws.window_values - ref).abs() <= bound).all())
        if defer:  # a deferred value's bound is GRAM_ERROR_FACTOR·k·eps·λmax of its window
            assert float(ws.window_errors.max()) <= GRAM_ERROR_FACTOR * 300 * EPS * float(ref.max()) * (1 + 1e-9)


def test_windows_that_do_not_overlap_are_not_shared():
    grid = WindowGrid(rows=100, cols=100, row_starts=(0, 300, 600), col_starts=(0, 200, 400))
    assert shared_gram.overlap(grid) == 1.0
