"""The refinement certificate: analyze refines nearly singular windows exactly when a result depends on them."""

import math

import numpy as np
import pytest
import torch
from conftest import heavy_tailed

from farms_lightning import analyze
from farms_lightning.engine import certificate, layer_spectra
from farms_lightning.engine.esd_metrics import esd_metrics
from farms_lightning.engine.powerlaw import fit_nonzero
from farms_lightning.engine.spectra import GRAM_ERROR_FACTOR, REFINE_RATIO, gram_eigenvalues, svd_eigenvalues

EPS = float(np.finfo(np.float64).eps)


def _fit(values: torch.Tensor, method: str):
    return fit_nonzero(values, 0, method, 10, "reference")


def _realisations(values: torch.Tensor, errors: torch.Tensor, count: int = 40, seed: int = 0):
    """The two ends of every interval, then random points inside them (always re-sorted)."""
    g = torch.Generator().manual_seed(seed)
    yield torch.sort(values - errors).values
    yield torch.sort(values + errors).values
    for _ in range(count):
        yield torch.sort(values + errors * (2 * torch.rand(len(values), generator=g, dtype=torch.float64) - 1)).values


def _spectrum(n: int = 3000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.sort(torch.rand(n, generator=g, dtype=torch.float64) ** -1.5).values  # a power-law tail


def _pooled_esd(seed: int = 0) -> torch.Tensor:
    """Ten heavy-tailed 100x100 windows' eigenvalues, pooled: a bulk with a peak, a tail, tiny minima."""
    return torch.sort(torch.cat([svd_eigenvalues(heavy_tailed(100, 100, seed=seed + i).double()[None])[0]
                                 for i in range(10)])).values


@pytest.mark.parametrize("method", ["median", "ks", "peak"])
def test_certified_fits_hold_for_every_value_within_the_bounds(method):
    values = _pooled_esd()
    errors = torch.zeros_like(values)
    errors[:12] = 1e-6 * values[:12]  # the smallest values are uncertain, as a nearly singular window's
    fit = _fit(values, method)
    assert certificate.fit_certain(values, errors, fit, method, "reference")
    assert certificate.metrics_certain(values, errors * 1e-3, fit.alpha)
    for other in _realisations(values, errors):
        again = _fit(other, method)
        # The winner uses only certified positions: the same operations on the same values, same bits.
        assert (again.alpha, again.xmin, again.D) == (fit.alpha, fit.xmin, fit.D)


def test_median_fit_depending_on_uncertain_values_is_not_certified():
    values = _spectrum(2000)
    errors = torch.zeros_like(values)
    errors[:1100] = 0.3 * values[:1100]  # more than half the values: xmin itself is uncertain
    fit = _fit(values, "median")
    assert not certificate.fit_certain(values, errors, fit, "median", "reference")
    assert any(_fit(other, "median").alpha != fit.alpha for other in _realisations(values, errors, 4))


def test_ks_candidate_below_the_uncertain_values_can_win_so_it_is_not_certified():
    # A clean power law from its very first value: the best xmin is the smallest value. Making
    # the lowest values uncertain therefore leaves a candidate whose D may beat the winner's.
    g = torch.Generator().manual_seed(3)
    values = torch.sort((1 - torch.rand(400, generator=g, dtype=torch.float64)) ** (-1 / 1.5)).values
    fit = _fit(values, "ks")
    errors = torch.zeros_like(values)
    errors[:3] = 0.5 * values[:3]
    assert not certificate.fit_certain(values, errors, fit, "ks", "reference")
    tiny = errors * 1e-12
    assert certificate.fit_certain(values, tiny, fit, "ks", "reference") == (fit.xmin > float((values + tiny)[:3].max()))


def test_peak_histogram_range_set_by_an_uncertain_minimum():
    """The pooled minimum sets the lower end of the log-histogram: a wide bound on it must refine."""
    values = _pooled_esd(10)  # its minimum is 2.7e-8·λmax, a nearly singular window's
    fit = _fit(values, "peak")
    wide = torch.zeros_like(values)
    wide[0] = 0.5 * values[0]  # log10 of the minimum may move by 0.3: every bin edge moves
    assert not certificate.fit_certain(values, wide, fit, "peak", "reference")
    changed = [_fit(other, "peak") for other in _realisations(values, wide, 10)]
    assert any((f.alpha, f.xmin) != (fit.alpha, fit.xmin) for f in changed)  # the refinement matters here
    narrow = torch.zeros_like(values)
    narrow[0] = 1e-12 * values[0]
    assert certificate.fit_certain(values, narrow, fit, "peak", "reference")
    for other in _realisations(values, narrow):
        again = _fit(other, "peak")
        assert (again.alpha, again.xmin, again.D) == (fit.alpha, fit.xmin, fit.D)


@pytest.mark.parametrize("method", ["median", "ks", "peak"])
def test_whenever_realisations_differ_the_fit_is_not_certified(method):
    """Soundness on many random cases: a certified fit is the same for every sampled realisation."""
    g = torch.Generator().manual_seed(9)
    for case in range(12):
        values = _pooled_esd(20 + case) if case % 2 else _spectrum(1500, seed=case)
        errors = torch.zeros_like(values)
        count = int(torch.randint(1, 60, (1,), generator=g))
        errors[:count] = values[:count] * 10 ** float(torch.empty(1).uniform_(-9, 0, generator=g))
        fit = _fit(values, method)
        fits = {(f.alpha, f.xmin, f.D) for f in map(lambda v: _fit(v, method), _realisations(values, errors, 10))}
        if certificate.fit_certain(values, errors, fit, method, "reference"):
            assert fits == {(fit.alpha, fit.xmin, fit.D)}


def test_metrics_are_bracketed_and_a_wide_bracket_is_not_certified():
    values = _spectrum()
    fit = _fit(values, "median")
    errors = torch.zeros_like(values)
    errors[:5] = 1e-14 * values[:5]
    assert certificate.metrics_certain(values, errors, fit.alpha)
    exact = esd_metrics(values, fit.alpha)
    for other in _realisations(values, errors):
        got = esd_metrics(other, fit.alpha)
        for name, value in exact.items():
            assert got[name] == pytest.approx(value, rel=1e-9)
    errors[:5] = 0.5 * values[:5]
    low, high = esd_metrics(values - errors, fit.alpha), esd_metrics(values + errors, fit.alpha)
    assert abs(high["entropy"] - low["entropy"]) > 1e-9 * exact["entropy"]
    assert not certificate.metrics_certain(values, errors, fit.alpha)


def test_a_value_that_may_be_a_numerical_zero_changes_the_counts_so_it_is_not_certified():
    values = torch.tensor([1e-30, 1e-3, 1.0], dtype=torch.float64)
    assert not certificate.zeros_certain(values, torch.tensor([1e-15, 0.0, 0.0], dtype=torch.float64))
    assert certificate.zeros_certain(values, torch.tensor([1e-31, 0.0, 0.0], dtype=torch.float64))
    assert certificate.zeros_certain(values, torch.zeros(3, dtype=torch.float64))


def _layer_from(window: torch.Tensor, copies: int = 9) -> torch.nn.Module:
    """A linear layer tiled from ``copies`` perturbed windows (k = 3 windows per dimension, m = 60)."""
    g = torch.Generator().manual_seed(7)
    rows = [torch.cat([window * (1 + 0.1 * torch.rand(1, generator=g, dtype=torch.float64)) for _ in range(3)], 1)
            for _ in range(3)]
    layer = torch.nn.Linear(180, 180, bias=False).double().requires_grad_(False)
    layer.weight.copy_(torch.cat(rows, 0))
    return torch.nn.Sequential(layer)


def _planted(ratio: float, seed: int = 11) -> torch.Tensor:
    """A 60x60 window with a heavy-tailed spectrum whose smallest λ is ``ratio·λmax``."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(60, 60, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(60, 60, generator=g, dtype=torch.float64))
    s = torch.sort(torch.rand(60, generator=g, dtype=torch.float64) ** -0.7, descending=True).values
    s[-1] = s[0] * math.sqrt(ratio)
    return u @ torch.diag(s) @ v.T


def _count_refinements(monkeypatch) -> list[int]:
    refined: list[int] = []
    original = layer_spectra.refine_deferred

    def counting(sets, workers, windows=None):
        chosen = windows if windows is not None else [ws.pending for ws in sets]
        refined.append(sum(len(c) for c in chosen))
        return original(sets, workers, windows)

    monkeypatch.setattr(layer_spectra, "refine_deferred", counting)
    return refined


@pytest.mark.parametrize(("ratio", "expect_refinement"), [(1e-8, False), (1e-29, True)])
@pytest.mark.parametrize("method", ["median", "ks", "peak"])
def test_analyze_refines_exactly_when_a_result_depends_on_it(monkeypatch, method, ratio, expect_refinement):
    """λmin = 1e-8·λmax: below the refinement threshold but Gram-accurate to 2e-7 relative, so no
    result moves; 1e-29: below the Gram noise (~1e-16), a possible numerical zero: the counts depend
    on it, so it is refined. Either way the result equals the fully refined analysis."""
    model = _layer_from(_planted(ratio))
    refined = _count_refinements(monkeypatch)
    got = analyze(model, window=60, windows_per_dim=3, fit=method, min_window_side=2, random_baseline=False)
    assert bool(refined) == expect_refinement
    full = analyze(model, window=60, windows_per_dim=3, fit=method, min_window_side=2, random_baseline=False,
                   keep_eigenvalues=True)  # kept ESDs are always fully refined
    a, b = got["0"], full["0"]
    assert (a.num_evals, a.num_dropped) == (b.num_evals, b.num_dropped)
    for name in ("alpha", "xmin", "D", "entropy", "log_alpha_norm"):
        assert getattr(a, name) == pytest.approx(getattr(b, name), rel=1e-9), name


def test_the_gram_error_bound_has_its_margin_on_varied_windows():
    """Every Gram eigenvalue is within GRAM_ERROR_FACTOR·k·eps·λmax / 10 of a float64 SVD's (margin >= 10)."""
    g = torch.Generator().manual_seed(2)
    windows = [torch.randn(200, 200, generator=g, dtype=torch.float64),
               heavy_tailed(300, 300, seed=3).double(),
               torch.randn(400, 8, generator=g, dtype=torch.float64) @ torch.randn(8, 400, generator=g, dtype=torch.float64),
               torch.randn(300, 1000, generator=g, dtype=torch.float64),
               torch.randn(1000, 1000, generator=g, dtype=torch.float64)]
    for x in windows:
        gram, svd = gram_eigenvalues(x[None])[0], svd_eigenvalues(x[None])[0]
        bound = GRAM_ERROR_FACTOR * max(x.shape) * EPS * float(svd[-1])
        assert float((gram - svd).abs().max()) <= bound / 10
        # The certified side: above REFINE_RATIO·λmax the Gram values keep 1e-9 relative.
        certified = svd > REFINE_RATIO * svd[-1]
        assert bool(((gram - svd).abs() <= 1e-9 * svd)[certified].all())


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["cv", "llm"])
def test_certificate_path_equals_the_fully_refined_path_on_minilm(monkeypatch, preset):
    """The real MiniLM, all three fits: analyze (certified Gram values) = kept ESDs (every window refined)."""
    from test_real_weights import minilm_state_dict

    from farms_lightning.models.state_dict import model_from_state_dict

    model = model_from_state_dict(minilm_state_dict())
    refined = _count_refinements(monkeypatch)
    for method in ("median", "ks", "peak"):
        got = analyze(model, preset, fit=method, random_baseline=False, include="encoder.layer.[0-2].*")
        full = analyze(model, preset, fit=method, random_baseline=False, include="encoder.layer.[0-2].*",
                       keep_eigenvalues=True)
        assert list(got) == list(full) and len(got) >= 18
        for name in got:
            a, b = got[name], full[name]
            assert (a.status, a.num_evals, a.num_dropped) == (b.status, b.num_evals, b.num_dropped)
            for field in ("alpha", "xmin", "D", "entropy", "log_alpha_norm", "lambda_max"):
                assert getattr(a, field) == pytest.approx(getattr(b, field), rel=1e-9), (name, method, field)
    assert sum(refined) < 10  # the certificate settles (nearly) every layer without the SVD


def test_a_failing_refinement_fails_only_its_layer(monkeypatch):
    """An SVD that raises while refining one layer gives that layer a reason, never a crashed analysis."""
    model = _layer_from(_planted(1e-29))  # needs refinement (a possible numerical zero)
    model.append(torch.nn.Linear(180, 180, bias=False).double())  # needs none

    def broken(sets, workers, windows=None):
        raise RuntimeError("SVD did not converge")

    monkeypatch.setattr(layer_spectra, "refine_deferred", broken)
    report = analyze(model, window=60, windows_per_dim=3, min_window_side=2, random_baseline=False)
    assert report["0"].status == "failed" and "eigenvalue error" in report["0"].reason
    assert report["1"].status == "ok" and report["1"].alpha is not None
