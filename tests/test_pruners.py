"""Magnitude and Wanda pruners and FARMSModelPruning, checked against direct NumPy computations."""

import copy

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning_helpers import TinyNet, loaders, trainer
from torch import nn

from farms_lightning import analyze
from farms_lightning.policies.pruners import prune_model
from farms_lightning.policies.pruning import alpha_sparsity, weighted_mean
from farms_lightning.training.pruning_callback import FARMSModelPruning


class Conv1D(nn.Module):
    """GPT-2's Conv1D: weight stored (in, out), recognised by ``nf``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(40, 64)
        self.conv = nn.Conv2d(3, 8, 3)
        self.attn = nn.MultiheadAttention(16, 2)
        self.gpt = Conv1D(48, 24)
        self.emb = nn.Embedding(30, 12)


def oriented(model: nn.Module, name: str) -> np.ndarray:
    """The matrix of layer ``name`` as analysed, read directly from the parameters."""
    if name.startswith("attn.in_proj."):
        e = model.attn.embed_dim
        i = "qkv".index(name[-1])
        return model.attn.in_proj_weight.detach()[i * e:(i + 1) * e].numpy()
    w = model.get_submodule(name).weight.detach()
    return (w.T if name == "gpt" else w).numpy()


def smallest_mask(scores: np.ndarray, k: int) -> np.ndarray:
    flat = np.zeros(scores.size, dtype=bool)
    flat[np.argsort(scores.reshape(-1), kind="stable")[:k]] = True
    return flat.reshape(scores.shape)


def unchanged(before: dict, model: nn.Module, skip: set) -> None:
    for key, value in model.state_dict().items():
        if key not in skip:
            assert torch.equal(value, before[key]), key


def test_magnitude_prunes_exactly_the_smallest_and_nothing_else():
    torch.manual_seed(0)
    model = Mixed()
    dense = copy.deepcopy(model)
    sparsities = {"fc": 0.3, "conv": 0.55, "attn.in_proj.k": 0.5, "gpt": 0.25, "emb": 0.1, "attn.out_proj": 0.0}
    achieved = prune_model(model, sparsities, method="magnitude")
    assert list(achieved) == ["fc", "conv", "attn.in_proj.k", "attn.out_proj", "gpt", "emb"]
    for name, s in sparsities.items():
        w0, w1 = oriented(dense, name), oriented(model, name)
        k = round(s * w0.size)
        expected = smallest_mask(np.abs(w0), k)
        assert np.array_equal(w1 == 0, expected), name
        assert np.array_equal(w1[~expected], w0[~expected])
        assert achieved[name] == k / w0.size
    in_proj = model.attn.in_proj_weight.detach()
    assert torch.equal(in_proj[:16], dense.attn.in_proj_weight[:16]) and torch.equal(in_proj[32:],
                                                                                    dense.attn.in_proj_weight[32:])
    unchanged(dense.state_dict(), model, {"fc.weight", "conv.weight", "attn.in_proj_weight", "gpt.weight",
                                          "emb.weight"})


def test_ties_are_broken_by_position_in_the_analysed_orientation():
    model = Mixed()
    with torch.no_grad():
        model.fc.weight.copy_(torch.randint(-2, 3, (64, 40)).float())
        model.gpt.weight.copy_(torch.randint(-2, 3, (24, 48)).float())
    dense = copy.deepcopy(model)
    prune_model(model, {"fc": 0.37, "gpt": 0.61})
    for name, s in (("fc", 0.37), ("gpt", 0.61)):
        w0 = oriented(dense, name)
        assert np.array_equal(oriented(model, name) == 0, smallest_mask(np.abs(w0), round(s * w0.size)))


def test_already_zero_weights_count_and_round_is_python_round():
    model = nn.Linear(10, 5)  # 50 weights
    achieved = prune_model(model, {"": 0.25})  # 12.5 -> 12 (half to even)
    assert int((model.weight == 0).sum()) == 12 and achieved[""] == 12 / 50
    prune_model(model, {"": 0.1})  # the 5 smallest are zeros already
    assert int((model.weight == 0).sum()) == 12


class WandaNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(24, 32)
        self.gpt = Conv1D(16, 32)
        self.cross = nn.MultiheadAttention(16, 2, batch_first=True, kdim=12, vdim=20)  # separate q/k/v weights
        self.packed = nn.MultiheadAttention(16, 4, batch_first=True)
        self.drop = nn.Dropout(0.5)

    def forward(self, x, mem_k, mem_v):
        g = self.gpt(self.drop(torch.relu(self.fc(x))))
        a = self.cross(g, mem_k, mem_v, need_weights=False)[0]
        return self.packed(query=a, key=g, value=torch.tanh(g), need_weights=False)[0]


def test_wanda_matches_a_direct_computation():
    torch.manual_seed(1)
    model, x, mk, mv = WandaNet(), torch.randn(3, 7, 24) * torch.linspace(0.1, 3, 24), torch.randn(3, 5, 12), \
        torch.randn(3, 5, 20)
    model.train()  # the calibration runs in eval mode (no dropout), then the flags are restored
    dense = copy.deepcopy(model).eval()
    with torch.no_grad():  # the inputs of every matrix, from the dense model
        h = torch.relu(dense.fc(x))
        g = dense.gpt(h)
        a = dense.cross(g, mk, mv, need_weights=False)[0]
    inputs = {"fc": x, "gpt": h, "cross.q_proj": g, "cross.k_proj": mk, "cross.v_proj": mv,
              "packed.in_proj.q": a, "packed.in_proj.k": g, "packed.in_proj.v": torch.tanh(g), "cross.out_proj": a}
    sparsities = {"fc": 0.5, "gpt": 0.37, "cross.q_proj": 0.2, "cross.k_proj": 0.6, "cross.v_proj": 0.45,
                  "packed.in_proj.q": 0.3, "packed.in_proj.k": 0.7, "packed.in_proj.v": 0.55}
    prune_model(model, sparsities, method="wanda", calibration=(x, mk, mv))
    assert model.training and model.drop.training
    for name, s in sparsities.items():
        w0 = _weight(dense, name)
        w1 = _weight(model, name)
        norms = np.sqrt((inputs[name].double().numpy().reshape(-1, w0.shape[1]) ** 2).sum(0))
        scores = np.abs(w0.astype(np.float64)) * norms
        k = round(s * w0.size)
        expected = np.zeros_like(scores, dtype=bool)
        for i in range(w0.shape[0]):
            quota = k // w0.shape[0] + (i < k % w0.shape[0])
            expected[i, np.argsort(scores[i], kind="stable")[:quota]] = True
        assert np.array_equal(w1 == 0, expected), name
        assert int((w1 == 0).sum()) == k
    unchanged(dense.state_dict(), model, {"fc.weight", "gpt.weight", "cross.q_proj_weight", "cross.k_proj_weight",
                                          "cross.v_proj_weight", "packed.in_proj_weight"})


def _weight(model: nn.Module, name: str) -> np.ndarray:
    if name.startswith("packed.in_proj."):
        i = "qkv".index(name[-1])
        return model.packed.in_proj_weight.detach()[i * 16:(i + 1) * 16].numpy()
    if name.startswith("cross.") and name != "cross.out_proj":
        return getattr(model.cross, name.split(".")[1] + "_weight").detach().numpy()
    w = model.get_submodule(name).weight.detach()
    return (w.T if name == "gpt" else w).numpy()


def test_wanda_with_a_callable_calibration_and_a_tensor():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    x = torch.randn(10, 8)
    twin = copy.deepcopy(model)
    prune_model(model, {"0": 0.5}, method="wanda", calibration=x)
    prune_model(twin, {"0": 0.5}, method="wanda", calibration=lambda m: m(x[:5]) + m(x[5:]))
    assert torch.equal(model[0].weight, twin[0].weight)
    assert int((model[0].weight == 0).sum()) == 24


class Partial(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc, self.unused = nn.Conv2d(3, 4, 3), nn.Linear(6, 5), nn.Linear(5, 5)

    def forward(self, x):
        return self.fc(self.conv(x))


@pytest.mark.parametrize("sparsities,kwargs,message", [
    ({"fc": 0.5}, {"method": "wanda"}, "`calibration`"),
    ({"conv": 0.5}, {"method": "wanda", "calibration": torch.randn(2, 3, 8, 8)}, "supports"),
    ({"unused": 0.5}, {"method": "wanda", "calibration": torch.randn(2, 3, 8, 8)}, "never reached"),
    ({"nope": 0.5}, {}, "unknown layer"),
    ({"fc": 1.5}, {}, "`sparsities`"),
    ({"fc": 0.5}, {"method": "sparsegpt"}, "`method`"),
])
def test_errors_leave_the_weights_alone(sparsities, kwargs, message):
    model = Partial()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message):
        prune_model(model, sparsities, **kwargs)
    unchanged(before, model, set())


def test_wanda_cannot_see_the_inputs_of_attention_out_proj():
    model = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    with pytest.raises(ValueError, match=r"never reached 1 layer\(s\), e.g. \['self_attn.out_proj'\]"):
        prune_model(model, {"self_attn.out_proj": 0.5, "linear1": 0.5}, "wanda", calibration=torch.randn(2, 4, 16))


def test_model_pruning_callback_prunes_attention_rows_per_matrix():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(32, 96))
    model.add_module("attn", nn.MultiheadAttention(96, 4, batch_first=True))
    dense = copy.deepcopy(model)
    callback = FARMSModelPruning(amount=0.5, esd="full")
    callback.setup(None, model, "fit")
    callback.apply_pruning(0.5)
    report = analyze(dense, "llm", esd="full")
    assert callback.alphas == report.alphas
    targets = alpha_sparsity(report, 0.5)
    mask = model.attn.in_proj_weight_mask
    for i, part in enumerate("qkv"):
        rows = mask[i * 96:(i + 1) * 96]
        assert int((rows == 0).sum()) == round(targets[f"attn.in_proj.{part}"] * rows.numel())
    out = model.attn(torch.randn(2, 3, 96), torch.randn(2, 3, 96), torch.randn(2, 3, 96))[0]
    assert out.shape == (2, 3, 96)
    assert torch.equal(model.attn.in_proj_weight, dense.attn.in_proj_weight * mask)


class MaskSnapshots(pl.Callback):
    """Dense weights (``weight_orig``) and masks of the TinyNet layers at every epoch end."""

    names = ("features.0", "features.2", "head.0", "head.2", "head.4")

    def __init__(self) -> None:
        self.weights, self.masks = [], []

    def on_train_epoch_end(self, trainer, pl_module):
        modules = [pl_module.get_submodule(n) for n in self.names]
        self.weights.append({n: getattr(m, "weight_orig", m.weight).detach().clone() for n, m in zip(self.names,
                                                                                                       modules)})
        self.masks.append({n: getattr(m, "weight_mask", None) for n, m in zip(self.names, modules)})


def test_farms_model_pruning_in_a_real_fit(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    before, pruning, after = MaskSnapshots(), FARMSModelPruning(amount=lambda epoch: [0.3, 0.6][epoch]), \
        MaskSnapshots()
    fit = trainer(tmp_path, max_epochs=2, callbacks=[before, pruning, after])
    fit.fit(model, *loaders())
    # The alphas come from the dense weights at the first pruning.
    probe = TinyNet()
    with torch.no_grad():
        for name, weight in before.weights[0].items():
            probe.get_submodule(name).weight.copy_(weight)
    report = analyze(probe, "llm")  # the callback's default preset
    assert pruning.alphas == {s.name: s.alpha for s in report.layers}
    assert report["features.0"].status == "skipped" and report["head.4"].status == "too_small"
    assert len(report.alphas) == 3  # the too-small head gets the target sparsity, as a skipped layer does
    counts = {s.name: s.num_params for s in report.layers}
    previous = {name: np.zeros(before.weights[0][name].shape, dtype=bool) for name in counts}
    for epoch, target in enumerate([0.3, 0.6]):
        sparsities = alpha_sparsity(report, target)
        assert weighted_mean(sparsities, counts) == pytest.approx(target, rel=1e-12)
        for name, s in sparsities.items():
            w = before.weights[epoch][name].numpy()
            pruned = after.masks[epoch][name].numpy() == 0
            k = round(s * w.size)
            scores = np.where(previous[name], -1.0, np.abs(w.astype(np.float64)))  # masks only grow
            assert np.array_equal(pruned, smallest_mask(scores, k)), (epoch, name)
            assert np.all(pruned[previous[name]])
            previous[name] = pruned
    assert pruning.sparsities == alpha_sparsity(report, 0.6)
    for name in counts:  # made permanent at the end: plain parameters with the zeros in them
        module = model.get_submodule(name)
        assert not hasattr(module, "weight_orig") and isinstance(module.weight, nn.Parameter)
        assert np.array_equal(module.weight.detach().numpy() == 0, previous[name])
    fit.save_checkpoint(tmp_path / "pruned.ckpt")
    state = torch.load(tmp_path / "pruned.ckpt", weights_only=True)["callbacks"]["FARMSModelPruning"]
    assert state["alphas"] == pruning.alphas


@pytest.mark.parametrize("kwargs,argument", [
    ({"amount": 1.5}, "sparsity"), ({"epsilon": 1.0}, "epsilon"), ({"fit": "best"}, "fit"), ({"window": 1}, "window"),
])
def test_model_pruning_rejects_bad_arguments_at_construction(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        FARMSModelPruning(**kwargs)
