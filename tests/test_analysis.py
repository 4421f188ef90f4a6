import math
import statistics

import numpy as np
import pytest
import reference as ref
import torch
from conftest import gaussian, heavy_tailed
from torch import nn

from farms_lightning import analyze

ROW_KEYS = {
    "name", "type", "shape", "status", "reason", "alpha", "xmin", "D", "num_evals", "num_dropped", "lambda_max",
    "log_spectral_norm", "norm", "log_norm", "alpha_weighted", "log_alpha_norm", "stable_rank", "entropy",
    "num_params", "alpha_random", "alpha_random_spread", "alpha_delta",
}
SUMMARY_KEYS = {
    "alpha_mean", "alpha_median", "alpha_weighted_mean", "alpha_random_mean", "alpha_delta_mean", "alpha_delta_median",
    "num_layers", "num_fitted", "num_looks_random", "num_too_small", "num_skipped", "num_failed",
    "num_under_trained", "num_over_trained",
}


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 48, 3), nn.ReLU(), nn.Conv2d(48, 24, 1),
        nn.Conv1d(24, 40, 5), nn.Flatten(), nn.Linear(300, 180), nn.ReLU(), nn.Linear(180, 10),
    )
    with torch.no_grad():  # heavy-tailed weights, like trained ones
        for i, p in enumerate(model.parameters()):
            if p.dim() > 1:
                p.copy_(heavy_tailed(p.shape[0], p[0].numel(), seed=seed + i).reshape(p.shape))
    return model


def reference_layer(w: torch.Tensor, esd: str, fit: str, m=100, q=1.0, k=9) -> dict:
    """Spec-level expectations for one layer: alpha and ESD metrics (block means for convs), and the
    whole-matrix metrics from a float64 SVD of the matrix (a conv: its unscaled (out, in*kh*kw) reshape)."""
    w = w.detach().double().numpy()
    if w.ndim > 2:
        spectra = ref.conv_block_eigs(w, q) if esd == "farms" else [ref.conv_full_eigs(w)]
    else:
        spectra = [ref.farms_eigs(w, m, q, k) if esd == "farms" else ref.full_eigs(w)]
    fits = [ref.fit(ev, fit) for ev in spectra]
    out = {"ok": all(f["ok"] for f in fits), "num_evals": sum(f["num_evals"] for f in fits)}
    sigma2 = np.linalg.svd(w.reshape(w.shape[0], -1), compute_uv=False) ** 2
    out.update(lambda_max=sigma2[0], norm=np.sum(w * w), stable_rank=np.sum(w * w) / sigma2[0])
    if out["ok"]:
        out["alpha"] = statistics.fmean(f["alpha"] for f in fits)
        out["alpha_weighted"] = out["alpha"] * np.log10(sigma2[0])
        per_block = []
        for f, ev in zip(fits, spectra):
            ev = ref._drop_zeros(ev)[0]  # the same numerical-zero rule as the fit
            p = ev / ev.sum()
            per_block.append({
                "log_alpha_norm": np.log10(np.sum(ev ** f["alpha"])),
                "entropy": -np.sum(p * np.log(p)) / np.log(len(ev)),
            })
        for key in per_block[0]:
            out[key] = statistics.fmean(b[key] for b in per_block)
    return out


@pytest.mark.parametrize("esd", ["farms", "full"])
@pytest.mark.parametrize("fit", ["median", "ks", "peak"])
def test_analyze_matches_the_reference_per_layer(esd, fit):
    model = small_cnn()
    # Every window judged (its 3x3 conv blocks and 10-row head are below the default min_window_side).
    report = analyze(model, fit=fit, esd=esd, dtype=torch.float64, min_window_side=2)
    weights = [m.weight for m in model if hasattr(m, "weight")]
    assert len(report) == len(weights) == 6
    for stats, w in zip(report.values(), weights):
        expected = reference_layer(w, esd, fit)
        assert stats.num_evals == expected["num_evals"]
        assert stats.status == ("ok" if expected["ok"] else "failed"), stats.reason
        if expected["ok"]:
            for key in ("alpha", "lambda_max", "norm", "stable_rank", "alpha_weighted", "log_alpha_norm", "entropy"):
                assert getattr(stats, key) == pytest.approx(expected[key], rel=1e-9), key
    default = analyze(model, fit=fit, esd=esd, min_window_side=2)
    for a, b in zip(default.values(), report.values()):
        if b.alpha is not None:
            assert a.alpha == pytest.approx(b.alpha, rel=1e-6)


def test_rows_summary_and_table():
    model = small_cnn()
    report = analyze(model, exclude="5", min_window_side=2)
    rows = report.to_rows()
    assert [r["name"] for r in rows] == ["0", "2", "4", "7", "9"]  # "5" excluded: not in the rows
    assert all(set(r) == ROW_KEYS for r in rows)
    assert rows[0]["type"] == "Conv2d" and rows[0]["shape"] == [16, 3, 3, 3] and rows[0]["num_params"] == 432
    assert set(report.summary) == SUMMARY_KEYS
    alphas = [r["alpha"] for r in rows]
    assert report.summary["alpha_mean"] == pytest.approx(statistics.fmean(alphas))
    assert report.summary["alpha_median"] == pytest.approx(statistics.median(alphas))
    assert report.summary["num_fitted"] == 5 and report.summary["num_layers"] == 5
    assert report["7"].alpha == rows[3]["alpha"]
    assert "7" in report.to_table()


def test_presets_and_overrides():
    model = nn.Sequential(nn.Linear(300, 250))
    w = model[0].weight
    llm = analyze(model, "llm")
    assert llm.settings["window"] == 2000 and llm.settings["fit"] == "peak"
    assert llm["0"].alpha == pytest.approx(ref.fit(ref.farms_eigs(w.detach().numpy(), 2000, 1.0, 10), "peak")["alpha"], rel=1e-9)
    custom = analyze(model, window=50, aspect_ratio=2.0, windows_per_dim=3, fit="ks")
    assert custom["0"].alpha == pytest.approx(ref.fit(ref.farms_eigs(w.detach().numpy(), 50, 2.0, 3), "ks")["alpha"], rel=1e-9)


def test_bad_layers_get_a_reason_never_an_exception():
    g = torch.Generator().manual_seed(0)
    model = nn.ModuleDict({
        "nan": nn.Linear(200, 200), "zeros": nn.Linear(200, 200), "tiny": nn.Linear(3, 3),
        "thin": nn.Linear(100000, 1), "orthogonal": nn.Linear(64, 64), "lazy": nn.LazyLinear(10),
        "meta": nn.Linear(50, 50, device="meta"), "low_rank": nn.Linear(100, 100, dtype=torch.float64), "good": nn.Linear(200, 200),
    })
    with torch.no_grad():
        model["nan"].weight[3, 4] = math.nan
        model["zeros"].weight.zero_()
        nn.init.orthogonal_(model["orthogonal"].weight)
        # Rank 30 stored in float64: 70 singular values are SVD noise (in float32 the rounding residue
        # would be a genuine, kept part of the stored matrix).
        model["low_rank"].weight.copy_(torch.randn(100, 30, generator=g, dtype=torch.float64)
                                       @ torch.randn(30, 100, generator=g, dtype=torch.float64))
    report = analyze(model)
    status = {name: (s.status, s.reason) for name, s in report.items()}
    assert status["nan"] == ("skipped", "non-finite weights")
    assert status["zeros"] == ("skipped", "all-zero weights")
    assert status["tiny"][0] == "skipped" and "too small" in status["tiny"][1]
    assert status["thin"][0] == "skipped" and "too small" in status["thin"][1]
    assert status["orthogonal"][0] == "failed" and "flat spectrum" in status["orthogonal"][1]
    assert status["lazy"] == ("skipped", "uninitialised (lazy) weights")
    assert status["meta"][0] == "skipped" and "meta" in status["meta"][1]
    assert status["good"] == ("ok", "")
    low = report["low_rank"]
    assert low.status == "ok" and low.num_dropped == 70 and low.num_evals == 30
    expected = ref.fit(ref.farms_eigs(model["low_rank"].weight.detach().numpy()), "median")
    assert low.alpha == pytest.approx(expected["alpha"], rel=1e-6) and expected["num_dropped"] == 70
    assert report.summary["num_skipped"] == 6 and report.summary["num_failed"] == 1
    for s in report.values():
        assert (s.status == "ok") == (s.alpha is not None)


def test_bad_arguments_raise_value_errors_naming_them():
    model = nn.Linear(10, 10)
    for kwargs, name in [({"window": 1}, "window"), ({"aspect_ratio": 0}, "aspect_ratio"),
                         ({"aspect_ratio": -1.0}, "aspect_ratio"), ({"windows_per_dim": 0}, "windows_per_dim"),
                         ({"fit": "mle"}, "fit"), ({"esd": "pooled"}, "esd"), ({"preset": "nlp"}, "preset"),
                         ({"min_eigenvalues": 1}, "min_eigenvalues"), ({"dtype": torch.int8}, "dtype"),
                         ({"peak_bound": "x"}, "peak_bound"), ({"layer_types": ["Dense"]}, "layer_types")]:
        with pytest.raises(ValueError, match=name):
            analyze(model, **kwargs)


def test_analysis_leaves_the_model_untouched():
    model = small_cnn()
    model[2].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.requires_grad for p in model.parameters()]
    rng_state = torch.get_rng_state()
    report = analyze(model, fit="peak", min_window_side=2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [p.requires_grad for p in model.parameters()] == grads
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert all(p.grad is None for p in model.parameters())
    assert report.summary["num_fitted"] == 6


def test_farms_removes_the_aspect_ratio_bias():
    """Spec §8: full-ESD alpha grows with the aspect ratio, FARMS alpha does not."""
    shapes = [(256, 256), (512, 256), (1024, 256), (2048, 256), (256, 1024)]
    full, farms = [], []
    for shape in shapes:
        model = nn.Linear(shape[1], shape[0], bias=False)
        with torch.no_grad():
            model.weight.copy_(gaussian(*shape, seed=shape[0] + shape[1]))
        full.append(analyze(model, esd="full", fit="median")[""].alpha)
        farms.append(analyze(model, window=128, aspect_ratio=1.0, windows_per_dim=10, fit="median")[""].alpha)
    assert max(full) - min(full) > 1.5
    assert all(abs(a - farms[0]) <= 0.03 for a in farms), farms


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_orthogonal_layers_are_flat_in_every_precision(dtype):
    # No larger than the window, so the window is the whole orthogonal matrix.
    model = nn.Sequential(nn.Linear(100, 100), nn.Linear(64, 64))
    model.to(torch.float32 if dtype == torch.float32 else torch.float64)  # QR in float32 or float64
    for layer in model:
        nn.init.orthogonal_(layer.weight)
    model.to(dtype)
    report = analyze(model)
    for name in ("0", "1"):
        assert report[name].status == "failed" and "flat spectrum" in report[name].reason


def test_frozen_unchanged_layers_are_reused_not_reanalysed(monkeypatch):
    from farms_lightning.engine import analysis
    from farms_lightning.models.layers import discover_layers

    model = small_cnn()
    for p in list(model[7].parameters()) + list(model[2].parameters()):
        p.requires_grad_(False)
    fitted = []
    original = analysis._fit_layer
    monkeypatch.setattr(analysis, "_fit_layer", lambda layer, *a: fitted.append(layer.name) or original(layer, *a))
    settings = analysis.resolve_settings(min_window_side=2)
    cache: dict = {}
    first, _ = analysis.analyze_layers(discover_layers(model), settings, frozen_cache=cache)
    assert sorted(fitted) == ["0", "2", "4", "5", "7", "9"]
    fitted.clear()
    with torch.no_grad():
        model[0].weight.mul_(1.5)  # trainable: always analysed
        model[2].weight.mul_(2.0)  # frozen but modified in place: analysed again
    second, _ = analysis.analyze_layers(discover_layers(model), settings, frozen_cache=cache)
    assert sorted(fitted) == ["0", "2", "4", "5", "9"]  # "7" frozen and unchanged: reused
    assert second[4] == first[4] and second[4] == analyze(model)["7"]
    assert second[1].lambda_max == pytest.approx(4 * first[1].lambda_max)


def test_frozen_cache_sees_data_updates_and_keeps_tied_layers_apart():
    from farms_lightning.engine import analysis
    from farms_lightning.models.layers import discover_layers

    torch.manual_seed(0)
    shared = nn.Linear(128, 128)
    model = nn.Sequential(nn.Linear(128, 128), shared, shared)
    model.requires_grad_(False)
    settings, cache = analysis.resolve_settings(), {}
    first, _ = analysis.analyze_layers(discover_layers(model), settings, frozen_cache=cache)
    second, _ = analysis.analyze_layers(discover_layers(model), settings, frozen_cache=cache)
    assert [(s.name, s.status) for s in second] == [("0", "ok"), ("1", "ok"), ("2", "skipped")] and second == first
    model[0].weight.data.mul_(0.5).add_(torch.randn(128, 128) ** 3)  # an EMA-style update: no version bump
    third, _ = analysis.analyze_layers(discover_layers(model), settings, frozen_cache=cache)
    assert third[0].alpha == analyze(model)["0"].alpha != first[0].alpha


@pytest.mark.parametrize("fit", ["median", "ks", "peak"])
@pytest.mark.parametrize("random_baseline", [True, False])
def test_layers_too_small_to_judge_follow_the_window_rule(fit, random_baseline):
    """Windows under 16 rows or columns give no alpha, for every fit, with or without the baseline, in
    FARMS and full ESDs; they are in no summary value; min_window_side moves the line."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(768, 2), nn.Linear(768, 15), nn.Linear(768, 16), nn.Linear(200, 200))
    report = analyze(model, fit=fit, random_baseline=random_baseline)
    assert [s.status for s in report.layers] == ["too_small", "too_small", "ok", "ok"]
    assert report["0"].reason.startswith("2x2 windows, fewer than 16 eigenvalues")
    assert report["0"].alpha is None and report["0"].alpha_delta is None and report["0"].num_evals == 0
    fitted = [report["2"], report["3"]]
    assert report.summary["num_too_small"] == 2 and report.summary["num_fitted"] == 2
    assert report.summary["alpha_mean"] == pytest.approx(statistics.fmean(s.alpha for s in fitted), rel=1e-12)
    if random_baseline:
        assert report.summary["alpha_delta_mean"] == pytest.approx(statistics.fmean(s.alpha_delta for s in fitted))
        assert report.summary["num_looks_random"] <= 2
    else:
        assert math.isnan(report.summary["alpha_delta_mean"]) and math.isnan(report.summary["num_looks_random"])
    full = analyze(model, esd="full", fit=fit, random_baseline=random_baseline)  # the window is the matrix
    assert [s.status for s in full.layers][:3] == ["skipped", "too_small", "ok"]  # 2 eigenvalues < min_eigenvalues
    judged = analyze(model, fit=fit, random_baseline=random_baseline, min_window_side=2)
    assert [s.status for s in judged.layers] == ["ok"] * 4
    assert judged["3"].alpha == report["3"].alpha  # ordinary layers are unaffected by the rule
    with pytest.raises(ValueError, match="min_window_side"):
        analyze(model, min_window_side=1)


def test_a_too_small_head_keeps_its_place_in_tempbalance_and_gets_the_mean_sparsity():
    from farms_lightning import alpha_sparsity
    from farms_lightning.policies.tempbalance import layer_parameters, parameter_factors

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 128), nn.Linear(128, 96), nn.Linear(96, 2))
    report = analyze(model, random_baseline=False)
    assert report["3"].status == "too_small"
    factors, _ = parameter_factors(report, layer_parameters(model))
    # "0" is the first layer and "3", too small, is still the last: only "1" and "2" are tuned.
    assert sorted(factors) == ["1", "2"] and sorted(factors.values()) == [0.5, 1.5]
    sparsities = alpha_sparsity(report, 0.5)
    assert sparsities["3"] == 0.5 and sparsities.keys() == {"0", "1", "2", "3"}
