"""Whole-matrix metrics: exact against a float64 SVD, on every path and kind of matrix."""

import functools
import math

import numpy as np
import pytest
import torch
from conftest import gaussian, heavy_tailed
from torch import nn

from farms_lightning import analyze
from farms_lightning.engine import matrix_metrics as mm
from farms_lightning.engine.threads import single_threaded_ops


@pytest.fixture(autouse=True)
def one_thread():
    with single_threaded_ops():  # threaded SVDs crawl on busy cores; the analysis runs this way too
        yield


def svd_sigma2(w: torch.Tensor) -> np.ndarray:
    """Squared singular values from ``torch.linalg.svdvals`` in float64 (descending)."""
    return torch.linalg.svdvals(w.detach().double()).numpy() ** 2


def _orthogonal(n: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return q


def _with_spectrum(rows: int, cols: int, sigma: np.ndarray, seed: int) -> torch.Tensor:
    k = len(sigma)
    u, v = _orthogonal(rows, seed)[:, :k], _orthogonal(cols, seed + 1)[:, :k]
    return torch.from_numpy(u @ np.diag(sigma) @ v.T)


@functools.cache
def _cases() -> dict[str, torch.Tensor]:
    g = np.random.default_rng(0)
    near = np.linspace(1.0, 0.1, 150)
    near[1], near[2] = 1.0, 1.0 - 1e-7  # a repeated and a nearly repeated top singular value
    return {
        "gaussian wide": gaussian(200, 700, seed=1),
        "gaussian tall": gaussian(900, 150, seed=2),
        "student-t wide": heavy_tailed(120, 480, seed=3),
        "student-t tall": heavy_tailed(700, 300, seed=4),
        "square": gaussian(256, 256, seed=5),
        "rank 3": torch.from_numpy(g.standard_normal((300, 3)) @ g.standard_normal((3, 200))),
        "rank 1": torch.from_numpy(g.standard_normal((400, 1)) @ g.standard_normal((1, 90))),
        "orthogonal": torch.from_numpy(_orthogonal(128, 6)),
        "near-degenerate top": _with_spectrum(260, 150, near, seed=7),
        "bfloat16": gaussian(180, 500, seed=8).bfloat16(),
        "float16": heavy_tailed(300, 100, seed=9).half(),
        "small (direct)": gaussian(40, 90, seed=10),
        "one row": gaussian(1, 500, seed=11),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_lambda_max_equals_the_float64_svd(name):
    w = _cases()[name]
    sigma2 = svd_sigma2(w)
    expected = sigma2[0]
    assert mm.lambda_max(w) == pytest.approx(expected, rel=mm.RESIDUAL_RTOL)
    metrics = mm.whole_matrix_metrics([w])
    x = w.double().numpy()
    assert metrics["norm"] == pytest.approx(np.sum(x * x), rel=1e-12)
    assert metrics["log_norm"] == pytest.approx(math.log10(np.sum(x * x)), rel=1e-12)
    assert metrics["log_spectral_norm"] == pytest.approx(math.log10(expected), abs=1e-7)
    rank = int(np.sum(sigma2 > 1e-20 * expected))
    assert 1 <= metrics["stable_rank"] <= rank <= min(x.shape)
    assert metrics["stable_rank"] == pytest.approx(np.sum(x * x) / expected, rel=mm.RESIDUAL_RTOL)


def test_both_lanczos_paths_are_taken_and_exact(monkeypatch):
    """Well-separated tops stop on W; Gaussian-like ones switch to the Gram matrix."""
    grams = []
    original = mm._gram
    monkeypatch.setattr(mm, "_gram", lambda x: grams.append(x.shape) or original(x))
    low_rank = torch.from_numpy(np.random.default_rng(1).standard_normal((500, 4)) @
                                np.random.default_rng(2).standard_normal((4, 300)))
    assert mm.lambda_max(low_rank) == pytest.approx(svd_sigma2(low_rank)[0], rel=1e-12)
    assert grams == []  # converged on W itself
    w = gaussian(300, 900, seed=3)
    assert mm.lambda_max(w) == pytest.approx(svd_sigma2(w)[0], rel=1e-10)
    assert grams == [(300, 900)]


def test_conv_matrices_are_the_unscaled_reshape_per_group():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 3, 3, 3, generator=g)  # groups=2: (out, in/groups, kh, kw)
    single = mm.conv_matrices(weight)
    assert len(single) == 1 and torch.equal(single[0], weight.reshape(8, 27))
    groups = mm.conv_matrices(weight, groups=2)
    assert [tuple(m.shape) for m in groups] == [(4, 27), (4, 27)]
    assert torch.equal(groups[1], weight[4:].reshape(4, 27))
    metrics = mm.whole_matrix_metrics(groups)
    per_group = [svd_sigma2(m) for m in groups]
    assert metrics["lambda_max"] == pytest.approx(np.mean([s[0] for s in per_group]), rel=1e-12)
    assert metrics["stable_rank"] == pytest.approx(np.mean([s.sum() / s[0] for s in per_group]), rel=1e-12)
    assert metrics["log_norm"] == pytest.approx(np.mean([math.log10(s.sum()) for s in per_group]), rel=1e-12)
    with pytest.raises(ValueError, match="groups"):
        mm.conv_matrices(weight, groups=3)


def test_bad_input_and_zero_matrices():
    with pytest.raises(ValueError, match="2-D"):
        mm.lambda_max(torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match="at least one"):
        mm.whole_matrix_metrics([])
    zero = mm.whole_matrix_metrics([torch.zeros(5, 7)])
    assert zero["lambda_max"] == 0 and zero["norm"] == 0
    assert zero["stable_rank"] is None and zero["log_norm"] is None and zero["log_spectral_norm"] is None


def test_weights_and_rng_untouched():
    w = heavy_tailed(300, 200, seed=5).bfloat16()
    before = w.clone()
    state = torch.get_rng_state()
    mm.lambda_max(w)
    mm.whole_matrix_metrics([w])
    assert torch.equal(w.view(torch.int16), before.view(torch.int16)) and w.dtype == torch.bfloat16
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("esd", ["farms", "full"])
def test_analysis_reports_whole_matrix_metrics_in_every_mode(esd):
    """A 256x512 layer's FARMS windows pooled gave stable_rank ~1900 before; now it is the matrix's."""
    model = nn.Sequential(nn.Linear(512, 256, bias=False), nn.Conv2d(16, 32, 3, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(heavy_tailed(256, 512, seed=0))
        model[1].weight.copy_(heavy_tailed(32, 144, seed=1).reshape(32, 16, 3, 3))
    report = analyze(model, esd=esd)
    for name, matrices in [("0", [model[0].weight]), ("1", [model[1].weight.reshape(32, -1)])]:
        stats = report[name]
        sigma2 = [svd_sigma2(m) for m in matrices]
        assert stats.status == "ok"
        assert stats.lambda_max == pytest.approx(sigma2[0][0], rel=1e-9)
        assert stats.norm == pytest.approx(sigma2[0].sum(), rel=1e-9)
        assert stats.stable_rank == pytest.approx(sigma2[0].sum() / sigma2[0][0], rel=1e-9)
        assert 1 <= stats.stable_rank <= min(matrices[0].shape)
        assert stats.alpha_weighted == pytest.approx(stats.alpha * math.log10(sigma2[0][0]), rel=1e-9)


def test_full_esd_reuses_its_exact_top_eigenvalue(monkeypatch):
    calls = []
    original = mm.lambda_max
    monkeypatch.setattr(mm, "lambda_max", lambda w: calls.append(w.shape) or original(w))
    model = nn.Linear(300, 200, bias=False)
    # random_baseline=False: the baseline's random draws are analysed (and counted) too
    full = analyze(model, esd="full", random_baseline=False)[""]
    assert calls == []  # the float64 full ESD already holds lambda_max
    farms = analyze(model, random_baseline=False)[""]
    assert calls == [(200, 300)]
    assert full.lambda_max == pytest.approx(farms.lambda_max, rel=1e-12)
