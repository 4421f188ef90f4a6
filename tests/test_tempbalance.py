"""TempBalance mapping, tuned-layer selection, parameter pairing and the param-group helper."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from farms_lightning import analyze, farms_param_groups, lr_factors
from farms_lightning.policies.lr_scaling import ParamGroupLRScaler
from farms_lightning.policies.tempbalance import layer_parameters, parameter_factors, tuned_units


def test_mappings_follow_the_spec():
    a = [2.5, 4.0, 3.1, 6.2]
    s1, s2 = 0.2, 1.8
    linear = [s1 + (s2 - s1) * (x - 2.5) / (6.2 - 2.5) for x in a]
    assert lr_factors(a, "tb_linear_map", s1, s2) == pytest.approx(linear, rel=1e-15)
    assert lr_factors(a, "tb_sqrt") == pytest.approx([4 * math.sqrt(x) / sum(map(math.sqrt, a)) for x in a])
    assert lr_factors(a, "tb_log2") == pytest.approx([4 * math.log2(x) / sum(map(math.log2, a)) for x in a])
    ranks = np.argsort(np.argsort(a))
    assert lr_factors(a, "tb_step", s1, s2) == pytest.approx([s1 + (s2 - s1) * r / 4 for r in ranks])
    assert lr_factors([3.3, 3.3, 3.3]) == [1.0, 1.0, 1.0]  # (s1 + s2) / 2, not the reference's s2
    assert lr_factors([3.3, 3.3], lr_min_ratio=0.1, lr_max_ratio=1.9) == [1.0, 1.0]
    assert lr_factors([]) == []
    with pytest.raises(ValueError, match="lr_balance_method"):
        lr_factors(a, "tb_cubic")
    with pytest.raises(ValueError, match="lr_min_ratio"):
        lr_factors(a, lr_min_ratio=2.0, lr_max_ratio=1.0)


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.conv1 = nn.Conv2d(1, 16, 3)
    model.conv2 = nn.Conv2d(16, 24, 3)
    model.bn2 = nn.BatchNorm2d(24)
    model.flat = nn.Flatten()
    model.fc1 = nn.Linear(384, 160)
    model.ln = nn.LayerNorm(160)
    model.fc2 = nn.Linear(160, 120)
    model.attn = nn.MultiheadAttention(120, 4)
    model.fc3 = nn.Linear(120, 10)
    return model


def test_tuned_layers_pairing_and_shared_parameters():
    model = _model()
    report = analyze(model)
    assert report["conv1"].status == "skipped"  # 9 eigenvalues per block: not fitted, never tuned
    params = layer_parameters(model)
    assert tuned_units(report, params) == [["fc1"], ["fc2"], ["attn.in_proj.q", "attn.in_proj.k", "attn.in_proj.v"],
                                           ["attn.out_proj"]]
    assert [p is q for p, q in zip(params["conv2"], [model.conv2.weight, model.conv2.bias, model.bn2.weight,
                                                    model.bn2.bias])] == [True] * 4
    assert params["attn.in_proj.k"][0] is model.attn.in_proj_weight and params["attn.in_proj.k"][1] is model.attn.in_proj_bias
    assert len(params["fc1"]) == 2  # LayerNorm after a Linear is not paired
    layer_factor, param_factor = parameter_factors(report, params, lr_min_ratio=0.5, lr_max_ratio=1.5)
    qkv = np.mean([report[f"attn.in_proj.{p}"].alpha for p in "qkv"])
    units = [report["fc1"].alpha, report["fc2"].alpha, qkv, report["attn.out_proj"].alpha]
    expected = [0.5 + (a - min(units)) / (max(units) - min(units)) for a in units]
    got = [layer_factor[n] for n in ("fc1", "fc2", "attn.in_proj.q", "attn.out_proj")]
    assert got == pytest.approx(expected, rel=1e-12)
    assert layer_factor["attn.in_proj.q"] == layer_factor["attn.in_proj.v"]
    assert param_factor[id(model.attn.in_proj_bias)] == layer_factor["attn.in_proj.q"]
    assert id(model.conv2.weight) not in param_factor and id(model.fc3.weight) not in param_factor


def test_param_groups_cover_every_parameter_once():
    model = _model()
    groups = farms_param_groups(model, weight_decay=5e-4, no_decay_on_bias_and_norm=True, lr=0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    names = [g["name"] for g in groups]
    assert names[:4] == ["conv1", "conv1.no_decay", "conv2", "conv2.no_decay"]
    assert "attn.in_proj" in names and "other.no_decay" in names  # the LayerNorm
    assert all(g["weight_decay"] == (0.0 if g["name"].endswith("no_decay") else 5e-4) for g in groups)
    torch.optim.SGD(groups)  # a valid optimizer


def test_scaler_scales_only_inside_the_step_and_restores_bits():
    w = nn.Parameter(torch.ones(3))
    v = nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([{"params": [w], "lr": 0.1}, {"params": [v], "lr": 0.3}])
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append([g["lr"] for g in o.param_groups]))
    scaler = ParamGroupLRScaler()
    scaler.attach([opt])
    opt.register_step_pre_hook(lambda o, a, k: seen.append([g["lr"] for g in o.param_groups]))
    scaler.set_parameter_factors({id(w): 1.7})
    w.grad, v.grad = torch.ones(3), torch.ones(3)
    opt.step()
    assert seen == [[0.1, 0.3], [0.1 * 1.7, 0.3]]
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.3]
    assert torch.equal(w.detach(), torch.full((3,), 1 - 0.1 * 1.7)) and torch.equal(v.detach(), torch.full((3,), 0.7))
    mixed = []
    scaler2 = ParamGroupLRScaler(on_mixed_group=lambda i, g: mixed.append((i, g)))
    both = torch.optim.SGD([w, nn.Parameter(torch.ones(1))], lr=1.0)
    scaler2.attach([both])
    scaler2.set_parameter_factors({id(w): 2.0})
    assert mixed == [(0, 0)] and scaler2.group_factors == [[(3 * 2.0 + 1 * 1.0) / 4]]
    scaler.detach()
    opt.step()
    assert seen[-1] == [0.1, 0.3]


def test_an_attention_block_first_is_removed_as_one_unit():
    torch.manual_seed(0)
    model = nn.Module()
    model.attn = nn.MultiheadAttention(128, 4)
    model.fc1 = nn.Linear(128, 128)
    model.fc2 = nn.Linear(128, 128)
    model.fc3 = nn.Linear(128, 10)
    report = analyze(model)
    params = layer_parameters(model)
    assert tuned_units(report, params) == [["attn.out_proj"], ["fc1"], ["fc2"]]
    layer_factor, param_factor = parameter_factors(report, params)
    # The first unit is all of q/k/v (one parameter), not only q.
    assert id(model.attn.in_proj_weight) not in param_factor
    assert not {"attn.in_proj.q", "attn.in_proj.k", "attn.in_proj.v"} & set(layer_factor)


def test_scaler_follows_param_groups_added_later():
    w, v = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.1)
    scaler = ParamGroupLRScaler()
    scaler.attach([opt])
    opt.add_param_group({"params": [v], "lr": 0.2})  # e.g. BackboneFinetuning unfreezing a layer
    scaler.set_parameter_factors({id(v): 2.0})
    assert scaler.group_factors == [[1.0, 2.0]]
