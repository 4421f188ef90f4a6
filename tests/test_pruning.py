"""AlphaPruning allocation against an independent NumPy computation, and its properties."""

import math

import numpy as np
import pytest
import torch
from conftest import heavy_tailed
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from farms_lightning import analyze
from farms_lightning.policies.pruning import alpha_sparsity, block_of, uniform_sparsity, weighted_mean


def spec_sparsity(alphas, counts, s, eps):
    """Spec §7 written out in NumPy, without any clipping."""
    a, p = np.asarray(alphas, float), np.asarray(counts, float)
    r = np.ones_like(a) if a.max() == a.min() else (a - a.min()) / (a.max() - a.min()) * 2 * eps + (1 - eps)
    return r * (s * p.sum() / (p * r).sum())


def as_dicts(alphas, counts):
    names = [f"layer{i}" for i in range(len(alphas))]
    return dict(zip(names, alphas)), dict(zip(names, counts))


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3, 0.6, 0.9])
def test_matches_the_spec_formula(rng, eps):
    alphas, counts = rng.uniform(1.5, 8, 12), rng.integers(1_000, 3_000_000, 12)
    a, p = as_dicts(alphas.tolist(), [int(c) for c in counts])
    got = alpha_sparsity(a, 0.3, eps, param_counts=p, max_sparsity=1.0)
    expected = spec_sparsity(alphas, counts, 0.3, eps)
    assert max(expected) <= 1.0  # no clipping in this case: the formula itself
    np.testing.assert_allclose(list(got.values()), expected, rtol=1e-13)
    assert list(got) == list(a)  # input order
    assert math.isclose(np.dot(list(got.values()), counts) / counts.sum(), 0.3, rel_tol=1e-13)


def test_higher_alpha_is_pruned_more():
    got = alpha_sparsity({"a": 2.0, "b": 4.0, "c": 3.0}, 0.5)
    assert got["a"] < got["c"] < got["b"]
    # Unweighted by default: r = 0.7, 1.3, 1.0 and scale = 0.5 * 3 / 3.
    assert got == pytest.approx({"a": 0.35, "b": 0.65, "c": 0.5}, rel=1e-14)


def test_spec_example_exceeds_one_and_clipping_keeps_the_exact_mean():
    alphas, counts = [2.0, 3.0, 6.0], [10**6, 10**6, 10**5]
    np.testing.assert_allclose(spec_sparsity(alphas, counts, 0.8, 0.3), [0.7, 0.85, 1.3], rtol=1e-14)
    a, p = as_dicts(alphas, counts)
    got = alpha_sparsity(a, 0.8, 0.3, param_counts=p)  # max_sparsity 0.99
    assert got["layer2"] == 0.99
    # The unclipped layers keep their ratios (r = 0.7, 0.85) and absorb the rest of the budget.
    scale = (0.8 * 2.1e6 - 0.99 * 1e5) / (0.7e6 + 0.85e6)
    assert got["layer0"] == pytest.approx(0.7 * scale, rel=1e-14)
    assert got["layer1"] == pytest.approx(0.85 * scale, rel=1e-14)
    assert weighted_mean(got, p) == pytest.approx(0.8, rel=1e-14)
    # The reference's single clip to 0.998 prunes less than asked.
    reference = np.minimum(spec_sparsity(alphas, counts, 0.8, 0.3), 0.998)
    assert np.dot(reference, counts) / sum(counts) < 0.8 - 1e-3


def test_clipping_repeats_until_no_layer_exceeds_the_bound():
    # r = 0.5, 1.3, 1.5. After clipping the last layer, the rescaled second one exceeds 0.9 too.
    alphas, counts = [1.0, 5.0, 6.0], [1000, 100, 1000]
    first = spec_sparsity(alphas, counts, 0.65, 0.5)
    assert first[2] > 0.9 > first[1]
    assert 1.3 * (0.65 * 2100 - 0.9 * 1000) / (0.5 * 1000 + 1.3 * 100) > 0.9
    a, p = as_dicts(alphas, counts)
    got = alpha_sparsity(a, 0.65, 0.5, param_counts=p, max_sparsity=0.9)
    assert got["layer1"] == got["layer2"] == 0.9
    assert got["layer0"] == pytest.approx((0.65 * 2100 - 0.9 * 1100) / 1000, rel=1e-14)
    assert weighted_mean(got, p) == pytest.approx(0.65, rel=1e-14)


@settings(max_examples=200, deadline=None)
@given(
    alphas=st.lists(st.floats(1.0, 20.0), min_size=1, max_size=12),
    data=st.data(),
    s=st.floats(0.0, 0.99),
    eps=st.floats(0.0, 0.99),
    bound=st.floats(0.5, 1.0),
)
def test_properties(alphas, data, s, eps, bound):
    s = min(s, bound)
    counts = data.draw(st.lists(st.integers(1, 10**7), min_size=len(alphas), max_size=len(alphas)))
    a, p = as_dicts(alphas, counts)
    got = alpha_sparsity(a, s, eps, param_counts=p, max_sparsity=bound)
    values = np.array(list(got.values()))
    assert math.isclose(weighted_mean(got, p), s, rel_tol=1e-9, abs_tol=1e-12)  # exact mean
    assert values.min() >= 0 and values.max() <= bound
    order = np.argsort(alphas, kind="stable")
    assert np.all(np.diff(values[order]) >= -1e-12)  # monotone in alpha
    unclipped = values < bound
    if unclipped.sum() >= 2:  # the unclipped layers keep the spec's ratios
        expected = spec_sparsity(alphas, counts, s, eps)[unclipped]
        ratio = values[unclipped] / expected if expected.min() > 0 else None
        if ratio is not None:
            np.testing.assert_allclose(ratio, ratio[0], rtol=1e-9)


def test_equal_alphas_give_the_target_everywhere():
    assert alpha_sparsity({"a": 3.0, "b": 3.0}, 0.4, param_counts={"a": 5, "b": 7}) == {"a": 0.4, "b": 0.4}


def test_report_input_skipped_layers_get_the_target_and_the_mean_holds():
    model = nn.Sequential(nn.Linear(300, 200), nn.Linear(200, 150), nn.Linear(150, 1), nn.Linear(150, 120))
    with torch.no_grad():
        for i, layer in enumerate([model[0], model[1], model[3]]):
            layer.weight.copy_(heavy_tailed(*layer.weight.shape, seed=i, df=2.5 + 2 * i))
        model[2].weight.zero_()  # skipped: all-zero weights
    report = analyze(model, fit="median")
    assert report["2"].status == "skipped" and len(report.alphas) == 3
    got = alpha_sparsity(report, 0.6, 0.3)
    assert got["2"] == 0.6
    fitted = list(report.alphas)
    expected = spec_sparsity([report[n].alpha for n in fitted], [report[n].num_params for n in fitted], 0.6, 0.3)
    np.testing.assert_allclose([got[n] for n in fitted], expected, rtol=1e-13)
    counts = {name: stats.num_params for name, stats in report.items()}
    assert counts == {"0": 60000, "1": 30000, "2": 150, "3": 18000}
    assert weighted_mean(got, counts) == pytest.approx(0.6, rel=1e-14)


def test_dict_input_with_missing_alphas():
    a = {"x": 2.0, "y": None, "z": float("nan"), "w": 5.0}
    p = {"x": 100, "y": 50, "z": 10, "w": 300}
    got = alpha_sparsity(a, 0.5, 0.3, param_counts=p)
    assert got["y"] == got["z"] == 0.5
    np.testing.assert_allclose([got["x"], got["w"]], spec_sparsity([2.0, 5.0], [100, 300], 0.5, 0.3), rtol=1e-14)
    assert weighted_mean(got, p) == pytest.approx(0.5, rel=1e-14)


def test_block_wise_uses_block_mean_alphas():
    a = {
        "encoder.layer.0.q": 2.0, "encoder.layer.0.ffn": 4.0,
        "encoder.layer.1.q": 5.0, "encoder.layer.1.ffn": 7.0, "encoder.layer.1.skipped": None,
        "encoder.layer.10.q": 3.0,
        "head": 9.0,
    }
    p = {name: 10 * (i + 1) for i, name in enumerate(a)}
    got = alpha_sparsity(a, 0.5, 0.3, param_counts=p, blocks="encoder.layer.*")
    broadcast = {"encoder.layer.0.q": 3.0, "encoder.layer.0.ffn": 3.0, "encoder.layer.1.q": 6.0,
                 "encoder.layer.1.ffn": 6.0, "encoder.layer.10.q": 3.0, "head": 9.0}
    expected = spec_sparsity(list(broadcast.values()), [p[n] for n in broadcast], 0.5, 0.3)
    np.testing.assert_allclose([got[n] for n in broadcast], expected, rtol=1e-13)
    assert got["encoder.layer.0.q"] == got["encoder.layer.0.ffn"] and got["encoder.layer.1.skipped"] == 0.5
    assert weighted_mean(got, p) == pytest.approx(0.5, rel=1e-14)


def test_block_names():
    assert block_of("encoder.layer.11.attention.self.query", ["encoder.layer.*"]) == "encoder.layer.11"
    assert block_of("layers.0.self_attn.in_proj.q", ["blocks.*", "layers.*"]) == "layers.0"
    assert block_of("lm_head", ["layers.*"]) is None


@pytest.mark.parametrize("kwargs,argument", [
    ({"epsilon": 1.0}, "epsilon"),
    ({"epsilon": -0.1}, "epsilon"),
    ({"epsilon": float("nan")}, "epsilon"),
    ({"sparsity": -0.01}, "sparsity"),
    ({"sparsity": 0.995}, "sparsity"),  # above max_sparsity=0.99
    ({"sparsity": float("nan")}, "sparsity"),
    ({"max_sparsity": 0.0}, "max_sparsity"),
    ({"max_sparsity": 1.5}, "max_sparsity"),
    ({"param_counts": {"a": 1}}, "param_counts"),
    ({"param_counts": {"a": 1, "b": -3}}, "param_counts"),
    ({"blocks": ""}, "blocks"),
])
def test_bad_arguments_raise_naming_them(kwargs, argument):
    call = {"sparsity": 0.5, **kwargs}
    with pytest.raises(ValueError, match=f"`{argument}`"):
        alpha_sparsity({"a": 2.0, "b": 3.0}, **call)


def test_param_counts_are_refused_with_a_report():
    report = analyze(nn.Linear(120, 100))
    with pytest.raises(ValueError, match="`param_counts`"):
        alpha_sparsity(report, 0.5, param_counts={"": 1})


def test_uniform_allocation():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Conv2d(2, 3, 3), nn.Embedding(5, 4))
    assert uniform_sparsity(model, 0.3) == {"0": 0.3, "2": 0.3}
    assert uniform_sparsity(["a", "b"], 0.0) == {"a": 0.0, "b": 0.0}
    with pytest.raises(ValueError, match="`sparsity`"):
        uniform_sparsity(model, 1.2)
