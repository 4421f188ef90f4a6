"""Small eigenvalues are the float64 SVD's; only exact/numerical zeros are dropped; float32 = published SVD."""

import numpy as np
import pytest
import reference as ref
import torch
from conftest import heavy_tailed

from farms_lightning import analyze
from farms_lightning.engine.spectra import REFINE_RATIO, WindowSet, compute_spectra, window_eigenvalues
from farms_lightning.engine.windows import farms_grid
from farms_lightning.functional import farms_eigenvalues, fit_power_law, full_eigenvalues

EPS = float(np.finfo(np.float64).eps)


def assert_svd_accurate(got: np.ndarray, expected: np.ndarray) -> None:
    """Per eigenvalue |Δλ| <= 1e-9·λ + 8·eps·sqrt(λ·λmax): an SVD's own accuracy."""
    bound = 1e-9 * expected + 8 * EPS * np.sqrt(expected * expected[-1])
    assert np.all(np.abs(got - expected) <= bound), np.max(np.abs(got - expected) / bound)


def test_nearly_singular_windows_are_refined_to_svd_accuracy():
    g = torch.Generator().manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(60, 60, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(60, 60, generator=g, dtype=torch.float64))
    windows = torch.stack([u @ torch.diag(torch.logspace(0, -s, 60, dtype=torch.float64)) @ v.T
                           for s in (1, 2, 10)])  # λmin/λmax = 1e-2, 1e-4, 1e-20
    ev, refined = window_eigenvalues(windows)
    assert refined.tolist() == [False, False, True]
    for x, got in zip(windows, ev):
        assert_svd_accurate(got.numpy(), np.sort(np.linalg.svd(x.numpy(), compute_uv=False) ** 2))
    assert float(ev[2, 0]) == pytest.approx(1e-20, rel=1e-4)  # a Gram matrix gives ~1e-16 noise here
    unrefined = ev[0].numpy()
    assert unrefined[0] > REFINE_RATIO * unrefined[-1]


def zeroed(seed: int = 4) -> torch.Tensor:
    w = heavy_tailed(320, 300, seed=seed)
    w[20:70] = 0  # pruned rows: the first row band of windows has 50 zero rows
    w[:, 250:] = 0  # and zero padding in the last columns
    return w


@pytest.mark.parametrize("method", ["median", "peak"])
def test_exact_zero_rows_are_exact_zeros_dropped_and_counted(method):
    w = zeroed()
    m, k = 100, 4
    expected_ev, zeros = ref.farms_eigs_exact_zeros(w.double().numpy(), m, 1.0, k)
    assert zeros > 0
    got = farms_eigenvalues(w, window=m, windows_per_dim=k)
    assert int((got == 0).sum()) == zeros  # structural zeros are exact, not Gram/SVD noise
    assert_svd_accurate(got.numpy()[zeros:], expected_ev[zeros:])
    fit = fit_power_law(got, method)
    expected = ref.fit(expected_ev, method)
    assert fit.num_dropped == expected["num_dropped"] == zeros
    assert fit.num_evals == len(expected_ev) - zeros
    assert fit.alpha == pytest.approx(expected["alpha"], rel=1e-9)
    if method == "peak":
        assert fit.alpha == pytest.approx(ref.published_peak_alpha(expected_ev), rel=1e-9)
    report = analyze(torch.nn.Sequential(torch.nn.Linear(300, 320)).requires_grad_(False).apply(
        lambda mod: mod.weight.copy_(w) if isinstance(mod, torch.nn.Linear) else None),
        window=m, windows_per_dim=k, fit=method)
    # analyze keeps certified Gram values of windows the functional API refines: equal to 1e-12, not in bits
    assert report["0"].num_dropped == zeros and report["0"].alpha == pytest.approx(fit.alpha, rel=1e-12)


def test_zero_rows_do_not_send_every_window_to_the_svd():
    w = zeroed()
    ws = WindowSet(w.unsqueeze(0), farms_grid(320, 300, 100, 1.0, 4))
    compute_spectra([ws])
    # Only windows whose non-zero part is itself nearly singular are refined, not every window
    # that holds a zero row or column (12 of the 16 do).
    assert ws.refined_windows < 12


def test_a_layers_eigenvalues_do_not_depend_on_what_it_is_solved_with():
    g = torch.Generator().manual_seed(3)
    plain = torch.randn(300, 300, generator=g, dtype=torch.float64)  # 100x50 windows: λmin/λmax ~ 0.03, Gram
    low_rank = torch.randn(300, 20, generator=g, dtype=torch.float64) @ torch.randn(20, 300, generator=g,
                                                                                      dtype=torch.float64)
    grid = farms_grid(300, 300, 100, 0.5, 4)
    alone = WindowSet(plain.unsqueeze(0), grid)
    compute_spectra([alone], workers=1)
    assert alone.refined_windows == 0
    for order in ((0, 1), (1, 0)):
        sets = [WindowSet(plain.unsqueeze(0), grid), WindowSet(low_rank.unsqueeze(0), grid)]
        compute_spectra([sets[i] for i in order], workers=1)  # one batch holds both layers' windows
        assert sets[1].refined_windows == 16  # every low-rank window needs the SVD ...
        assert sets[0].refined_windows == 0  # ... which does not send the other layer's windows there
        assert torch.equal(sets[0].eigenvalues()[0], alone.eigenvalues()[0])


def test_only_numerical_zeros_are_dropped():
    values = np.array([0.0, 1e-30, 5e-14, 1e-13] + list(np.linspace(1, 10, 40)))
    fit = fit_power_law(values, "median")
    assert fit.num_dropped == 2 and fit.num_evals == 42  # 5e-14·λmax is a genuine eigenvalue


def test_low_rank_update_drops_its_svd_noise_but_keeps_rounding_residue():
    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(200, 4, generator=g, dtype=torch.float64), torch.randn(4, 200, generator=g, dtype=torch.float64)
    w = b @ a  # a LoRA-like delta of rank 4, stored in float64: 196 singular values are SVD noise
    ev = full_eigenvalues(w)
    fit = fit_power_law(ev, "median", min_eigenvalues=2)
    assert fit.num_dropped == 196 and fit.num_evals == 4
    np.testing.assert_allclose(ev.numpy()[-4:], ref.full_eigs(w.numpy())[-4:], rtol=1e-12)
    # Rounded to float32 the stored matrix has full rank (σ ~ eps32·σmax): genuine values, kept.
    fit32 = fit_power_law(full_eigenvalues(w.float()), "median")
    assert fit32.num_dropped == 0 and fit32.num_evals == 200


@pytest.mark.parametrize("dtype", [torch.float32, "float32", "torch.float32"])
def test_float32_is_refused_with_its_reason(dtype):
    layer = torch.nn.Linear(40, 40)
    with pytest.raises(ValueError, match="float32 is not supported.*slower than the exact float64 default"):
        analyze(layer, dtype=dtype, window=20)
    with pytest.raises(ValueError, match="float32 is not supported"):
        farms_eigenvalues(layer.weight, window=20, dtype=dtype)


def test_cli_refuses_float32_in_one_line(tmp_path, capsys):
    from farms_lightning.cli.commands import main

    torch.save({"enc.weight": heavy_tailed(64, 64, seed=1)}, tmp_path / "sd.pt")
    assert main(["analyze", str(tmp_path / "sd.pt"), "--dtype", "float32"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "float32 is not supported" in err


@pytest.mark.parametrize("dtype", [None, torch.float64, "float64", "torch.float64"])
def test_float64_spellings_are_accepted(dtype):
    layer = torch.nn.Linear(40, 40)
    assert analyze(layer, dtype=dtype, window=20).alphas == analyze(layer, window=20).alphas
    with pytest.raises(ValueError, match="dtype"):
        analyze(layer, dtype="float16")
