"""Property tests: any shape, dtype and setting gives a fit or a reason, and never touches weights."""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

from farms_lightning import analyze
from farms_lightning.engine.threads import single_threaded_ops
from farms_lightning.engine.windows import farms_grid

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _weights(kind: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = np.random.default_rng(seed)
    fan_in = int(np.prod(shape[1:]))
    if kind == "gaussian":
        w = g.standard_normal(shape)
    elif kind == "student":
        w = g.standard_t(3.0, shape)
    elif kind == "zeros":
        w = np.zeros(shape)
    elif kind == "nan":
        w = g.standard_normal(shape)
        w.flat[g.integers(w.size)] = np.nan
    elif kind == "low_rank":
        w = (g.standard_normal((shape[0], 1)) @ g.standard_normal((1, fan_in))).reshape(shape)
    else:  # constant: a rank-one, flat-ish spectrum
        w = np.full(shape, 0.5)
    return torch.from_numpy(w / math.sqrt(fan_in))


def _check_whole_matrix(stats, matrix: torch.Tensor) -> None:
    """Whole-matrix metrics: exact against a float64 SVD, and 1 <= stable_rank <= min(rows, cols)."""
    if stats.status in ("skipped", "too_small"):  # neither carries statistics (engine/report.py)
        assert stats.lambda_max is None and stats.stable_rank is None
        return
    x = matrix.detach().double()
    with single_threaded_ops():  # torch's threaded SVD crawls on busy cores
        sigma2 = torch.linalg.svdvals(x)[0].item() ** 2
    assert stats.lambda_max == pytest.approx(sigma2, rel=1e-7)
    assert stats.norm == pytest.approx((x * x).sum().item(), rel=1e-12)
    assert 1 <= stats.stable_rank <= min(x.shape)
    assert stats.log_spectral_norm == pytest.approx(math.log10(sigma2), rel=1e-7, abs=1e-9)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.integers(1, 260),
    cols=st.integers(1, 260),
    kind=st.sampled_from(["gaussian", "student", "zeros", "nan", "low_rank", "constant"]),
    dtype=st.sampled_from(DTYPES),
    window=st.integers(2, 150),
    aspect_ratio=st.sampled_from([0.25, 0.5, 1.0, 1.5, 2.0, 3.7]),
    windows_per_dim=st.integers(1, 12),
    fit=st.sampled_from(["median", "ks", "peak"]),
    esd=st.sampled_from(["farms", "full"]),
    seed=st.integers(0, 2**16),
)
def test_linear_layers_fit_or_give_a_reason(rows, cols, kind, dtype, window, aspect_ratio, windows_per_dim, fit,
                                             esd, seed):
    layer = nn.Linear(cols, rows, bias=False)
    with torch.no_grad():
        layer.weight = nn.Parameter(_weights(kind, (rows, cols), seed).to(dtype))
    before = layer.weight.detach().clone()
    # min_window_side=2: every window is judged, so the fits of tiny windows are exercised too.
    stats = analyze(layer, window=window, aspect_ratio=aspect_ratio, windows_per_dim=windows_per_dim, fit=fit,
                    esd=esd, min_window_side=2)[""]
    assert torch.equal(layer.weight.view(torch.uint8), before.view(torch.uint8))  # bitwise: NaN included
    _check_whole_matrix(stats, layer.weight)
    assert stats.status in ("ok", "skipped", "failed")
    if stats.status == "ok":
        assert isinstance(stats.alpha, float) and math.isfinite(stats.alpha) and stats.alpha > 1
        assert stats.reason == ""
    else:
        assert stats.alpha is None and stats.reason
    if kind in ("gaussian", "student"):
        grid = farms_grid(rows, cols, window, aspect_ratio, windows_per_dim)
        if esd == "full":
            enough = min(rows, cols) >= 10
        else:
            enough = grid is not None and grid.num_windows * min(grid.rows, grid.cols) >= 10
        assert (stats.status == "ok") == enough, (stats.status, stats.reason)


@settings(max_examples=80, deadline=None)
@given(
    out_channels=st.integers(1, 80),
    in_channels=st.integers(1, 80),
    kernel=st.integers(1, 3),
    dims=st.sampled_from([1, 2, 3]),
    aspect_ratio=st.sampled_from([0.3, 0.5, 1.0, 2.0, 2.5]),
    kind=st.sampled_from(["gaussian", "student", "zeros", "constant"]),
    esd=st.sampled_from(["farms", "full"]),
    seed=st.integers(0, 2**16),
)
@example(out_channels=1, in_channels=1, kernel=3, dims=3, aspect_ratio=0.3, kind="gaussian", esd="farms", seed=0)
@example(out_channels=2, in_channels=2, kernel=3, dims=3, aspect_ratio=0.3, kind="gaussian", esd="farms", seed=0)
def test_conv_layers_fit_or_give_a_reason(out_channels, in_channels, kernel, dims, aspect_ratio, kind, esd, seed):
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](in_channels, out_channels, kernel, bias=False)
    with torch.no_grad():
        conv.weight.copy_(_weights(kind, tuple(conv.weight.shape), seed))
    before = conv.weight.detach().clone()
    stats = analyze(conv, aspect_ratio=aspect_ratio, esd=esd, fit="median", min_window_side=2)[""]  # every window judged
    assert torch.equal(conv.weight, before)
    _check_whole_matrix(stats, conv.weight.reshape(out_channels, -1))  # the unscaled (out, in*k...) reshape
    assert (stats.status == "ok") == (stats.alpha is not None)
    assert stats.status == "ok" or stats.reason
    if stats.status == "ok":
        assert math.isfinite(stats.alpha) and stats.alpha > 1
    if kind in ("gaussian", "student"):
        positions = kernel ** dims
        small = min(out_channels, in_channels)
        if esd == "full":
            per_esd = positions * small
        else:  # the paper's conv block shape, written out independently
            cols = small
            if aspect_ratio <= 1:
                block_rows, block_cols = cols, int(cols // (1 / aspect_ratio))
            else:
                block_rows, block_cols = int(cols // aspect_ratio), cols
            per_esd = positions * min(max(1, block_rows), max(1, block_cols))
            if min(block_rows, block_cols) < 2:  # windows with a side below min_window_side=2: too small
                per_esd = 0
        if small < 2:  # 1 x n kernel-position matrices: a degenerate conv, skipped with a reason
            per_esd = 0
        assert (stats.status == "ok") == (per_esd >= 10), (stats.status, stats.reason, per_esd)
