import math

import numpy as np
import pytest
import reference as ref
import torch
from conftest import heavy_tailed

from farms_lightning.engine import powerlaw
from farms_lightning.functional import farms_eigenvalues, fit_power_law


def _assert_fit_matches(fit, expected, rel=1e-9):
    assert fit.status == ("ok" if expected["ok"] else "failed")
    assert fit.num_evals == expected["num_evals"] and fit.num_dropped == expected["num_dropped"]
    if expected["ok"]:
        assert fit.alpha == pytest.approx(expected["alpha"], rel=rel)
        assert fit.xmin == pytest.approx(expected["xmin"], rel=rel)
        assert fit.D == pytest.approx(expected["D"], rel=rel, abs=1e-12)
    else:
        assert fit.alpha is None and fit.reason


def _esds():
    g = np.random.default_rng(7)
    yield "pareto", (g.pareto(2.5, 3000) + 1.0)
    yield "student-farms", farms_eigenvalues(heavy_tailed(300, 300, seed=1), windows_per_dim=3).numpy()
    yield "mp-bulk", np.linalg.svd(g.standard_normal((400, 200)) / 20, compute_uv=False) ** 2
    yield "lognormal", g.lognormal(0, 2, 2000)


@pytest.mark.parametrize("method", ["median", "ks", "peak"])
@pytest.mark.parametrize("peak_bound", ["reference", "corrected"])
def test_fits_equal_the_float64_reference(method, peak_bound):
    for _, ev in _esds():
        got = fit_power_law(torch.from_numpy(ev), method=method, peak_bound=peak_bound)
        _assert_fit_matches(got, ref.fit(ev, method, peak_bound=peak_bound))


def test_any_input_order_and_container():
    ev = np.random.default_rng(3).pareto(2.0, 500) + 1
    a = fit_power_law(ev, method="ks")
    b = fit_power_law(list(ev[::-1]), method="ks")
    c = fit_power_law(torch.from_numpy(np.random.default_rng(1).permutation(ev)), method="ks")
    assert a == b == c
    assert isinstance(a.alpha, float) and isinstance(a.num_evals, int)


def test_zero_eigenvalues_are_dropped_and_counted():
    ev = np.concatenate([np.zeros(40), np.full(3, 1e-30), np.random.default_rng(0).pareto(2, 200) + 1])
    fit = fit_power_law(ev, method="median")
    assert fit.num_dropped == 43 and fit.num_evals == 200
    _assert_fit_matches(fit, ref.fit(ev, "median"))


def test_min_eigenvalues_flat_and_no_candidate():
    fit = fit_power_law(np.arange(1.0, 10.0), min_eigenvalues=10)
    assert fit.status == "failed" and "too few" in fit.reason and fit.num_evals == 9
    assert fit_power_law(np.arange(1.0, 10.0), min_eigenvalues=5).status == "ok"
    for method in ("median", "ks", "peak"):
        flat = fit_power_law(np.ones(100), method=method)
        assert flat.status == "failed" and "flat" in flat.reason and flat.alpha is None
    # Median tail flat although the head is not: still no power law.
    half_flat = np.concatenate([np.linspace(0.1, 0.9, 50), np.full(50, 2.0)])
    assert "flat" in fit_power_law(half_flat).reason
    # The fullest histogram bin holds only the (equal) largest values: no candidate has a tail.
    ev = np.concatenate([np.arange(1.0, 11.0), np.full(100, 20.0)])
    fit = fit_power_law(ev, method="peak", peak_bound="corrected")
    assert fit.status == "failed" and "no peak candidate" in fit.reason
    assert ref.fit(ev, "peak", peak_bound="corrected")["ok"] is False
    # The references' log-vs-linear bound (log10(0.95·peak) ≈ 1.27) admits the small values.
    _assert_fit_matches(fit_power_law(ev, method="peak"), ref.fit(ev, "peak"))


def test_never_raises_on_bad_data_but_on_bad_arguments():
    for data in ([], [0.0] * 20, [math.nan] * 20, [math.inf, 1.0] * 10, [-1.0] * 20):
        fit = fit_power_law(data)
        assert fit.status == "failed" and fit.reason and fit.alpha is None
    with pytest.raises(ValueError, match="method"):
        fit_power_law([1.0, 2.0], method="mle")
    with pytest.raises(ValueError, match="min_eigenvalues"):
        fit_power_law([1.0, 2.0], min_eigenvalues=0)
    with pytest.raises(ValueError, match="peak_bound"):
        fit_power_law([1.0, 2.0], peak_bound="fixed")
    with pytest.raises(ValueError, match="1-D"):
        fit_power_law(np.ones((3, 3)))


def test_hill_sum_is_accurate_on_nearly_flat_spectra():
    # Values spread by 1e-7 around 1e6: the naive Σ ln λ_j - n ln λ_i loses most digits here.
    ev = 1e6 * (1 + 1e-7 * np.random.default_rng(5).pareto(3.0, 1000))
    fit = fit_power_law(ev)
    ev_sorted = np.sort(ev)
    i = len(ev) // 2
    tail = ev_sorted[i:]
    exact = 1 + len(tail) / np.sum(np.log1p((tail - tail[0]) / tail[0]))
    assert fit.alpha == pytest.approx(exact, rel=1e-9)


@pytest.mark.parametrize("method", ["ks", "peak"])
def test_pruned_scan_equals_the_plain_definition(method, monkeypatch):
    # Force the pruned path on a mid-sized ESD and compare with the reference loop.
    monkeypatch.setattr(powerlaw, "SCAN_CHUNK", 1 << 12)
    ev = farms_eigenvalues(heavy_tailed(400, 400, seed=11), window=100, windows_per_dim=5).numpy()
    _assert_fit_matches(fit_power_law(ev, method=method), ref.fit(ev, method))


@pytest.mark.slow
def test_ks_at_twenty_thousand_values_equals_the_reference():
    ev = farms_eigenvalues(heavy_tailed(1500, 1500, seed=4), window=100, windows_per_dim=15).numpy()[:20000]
    assert len(ev) == 20000
    _assert_fit_matches(fit_power_law(ev, method="ks"), ref.fit(ev, "ks"))
