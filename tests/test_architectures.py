"""Grouped/depthwise convs, fused q/k/v, LoRA, quantized, tied, parametrized, sparse and float8 weights."""

import copy
import statistics
import warnings

import pytest
import reference as ref
import torch
from conftest import heavy_tailed
from torch import nn

from farms_lightning import analyze
from farms_lightning.models.layers import discover_layers
from farms_lightning.policies.pruners import prune_model
from farms_lightning.policies.tempbalance import layer_parameters, parameter_factors, tuned_units


def _heavy(module: nn.Module, seed: int = 0) -> nn.Module:
    with torch.no_grad():
        for i, p in enumerate(module.parameters()):
            if p.dim() > 1:
                p.copy_(heavy_tailed(p.shape[0], p[0].numel(), seed=seed + i).reshape(p.shape))
    return module


def _alpha(spectra: list, fit: str = "median") -> float:
    fits = [ref.fit(ev, fit) for ev in spectra]
    assert all(f["ok"] for f in fits)
    return statistics.fmean(f["alpha"] for f in fits)


# ----------------------------------------------------------------------------- convolutions
@pytest.mark.parametrize("shape,groups", [((128, 4, 3, 3), 32), ((96, 16, 3, 3), 4), ((64, 24, 3, 3), 4),
                                          ((60, 6, 5, 5), 6)])
@pytest.mark.parametrize("q", [1.0, 0.5, 2.0])
def test_grouped_conv_is_the_mean_over_every_groups_blocks(shape, groups, q):
    conv = _heavy(nn.Conv2d(shape[1] * groups, shape[0], shape[2:], groups=groups), seed=groups)
    w = conv.weight.detach().numpy()
    # Small per-group blocks (down to 2x4): every window judged here, this checks the numbers.
    report = analyze(conv, aspect_ratio=q, min_eigenvalues=5, min_window_side=2)
    blocks = ref.grouped_conv_block_eigs(w, groups, q)
    stats = report[""]
    assert stats.status == "ok", stats.reason
    assert stats.num_evals == sum(len(b) for b in blocks)
    assert stats.alpha == pytest.approx(_alpha(blocks), rel=1e-9)
    full = analyze(conv, esd="full", min_window_side=2)[""]
    pooled = ref.block_diagonal_conv_full_eigs(w, groups)  # the block-diagonal matrix's exact ESD
    assert full.num_evals == len(pooled)
    assert full.alpha == pytest.approx(ref.fit(pooled, "median")["alpha"], rel=1e-9)


def test_grouped_blocks_coincide_with_dense_blocks_when_out_per_group_is_a_multiple():
    """out/groups a multiple of in/groups, Q <= 1: the stored slice's blocks are exactly the groups' blocks."""
    conv = _heavy(nn.Conv2d(64, 128, 3, groups=8))  # per group 16 x 8: two 8x8 blocks each
    grouped = analyze(conv, min_window_side=2)[""]  # 8x8 blocks: below the default, judged here
    dense = ref.conv_block_eigs(conv.weight.detach().numpy(), 1.0)  # the (128, 8) slice as one matrix
    assert grouped.alpha == pytest.approx(_alpha(dense), rel=1e-12)
    odd = _heavy(nn.Conv2d(64, 96, 3, groups=8))  # per group 12 x 8: one block, 4 rows left over per group
    assert analyze(odd, min_window_side=2)[""].alpha == pytest.approx(_alpha(ref.grouped_conv_block_eigs(odd.weight.detach().numpy(), 8)))
    assert analyze(odd)[""].alpha != pytest.approx(_alpha(ref.conv_block_eigs(odd.weight.detach().numpy())))


@pytest.mark.parametrize("kernel", [3, 5, 7])
def test_depthwise_and_degenerate_convs_are_skipped_in_every_size(kernel):
    model = nn.ModuleDict({"dw": nn.Conv2d(96, 96, kernel, groups=96), "dw2": nn.Conv2d(32, 64, kernel, groups=32),
                           "stem": nn.Conv2d(1, 64, kernel), "point": nn.Conv2d(64, 1, 1)})
    report = analyze(model)
    for name in ("dw", "dw2"):
        assert report[name].status == "skipped" and "depthwise" in report[name].reason
    for name in ("stem", "point"):
        assert report[name].status == "skipped" and "degenerate convolution" in report[name].reason
    assert analyze(model, esd="full").summary["num_fitted"] == 0


def test_grouped_conv_with_too_small_groups_says_so():
    report = analyze(nn.Conv2d(8, 8, 1, groups=4))  # 2x2 per group, 1x1 kernel: 2 eigenvalues per block
    assert report[""].status == "skipped" and "groups" in report[""].reason and "too small" in report[""].reason


# ----------------------------------------------------------------------------- fused q/k/v
class TimmBlock(nn.Module):
    def __init__(self, dim: int = 96) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(self.fc1(self.proj(self.qkv(x)[..., :x.shape[-1]])))


class NeoXAttention(nn.Module):
    def __init__(self, dim: int = 96, heads: int = 4) -> None:
        super().__init__()
        self.num_attention_heads = heads
        self.query_key_value = nn.Linear(dim, 3 * dim)


def test_fused_qkv_parts_are_the_right_rows():
    block = _heavy(TimmBlock())
    layers = {l.name: l for l in discover_layers(block)}
    assert list(layers) == ["qkv.q", "qkv.k", "qkv.v", "proj", "fc1", "fc2"]
    w = block.qkv.weight.detach()
    for i, part in enumerate("qkv"):
        assert torch.equal(layers[f"qkv.{part}"].oriented(), w[i * 96:(i + 1) * 96])
        stats = analyze(block)[f"qkv.{part}"]
        assert stats.alpha == pytest.approx(ref.fit(ref.farms_eigs(w[i * 96:(i + 1) * 96].numpy()))["alpha"], rel=1e-9)
    neox = _heavy(NeoXAttention())
    heads = {l.name: l for l in discover_layers(neox)}
    rows = neox.query_key_value.weight.detach().view(4, 3, 24, 96)  # (heads, q|k|v, head_dim, in)
    for i, part in enumerate("qkv"):
        assert torch.equal(heads[f"query_key_value.{part}"].oriented(), rows[:, i].reshape(96, 96))
    del neox.num_attention_heads  # no head count: left whole, with the reason
    whole = analyze(neox)
    assert list(whole) == ["query_key_value"] and "head count" in whole["query_key_value"].reason
    assert whole["query_key_value"].status == "ok"  # analysed as one matrix, the reason as a note
    assert "analysed whole" in whole.to_table()
    gqa = nn.Module()
    gqa.qkv_proj = nn.Linear(96, 96 + 2 * 32)  # grouped-query: out != 3 * in, stays whole
    assert [l.name for l in discover_layers(gqa)] == ["qkv_proj"]


def test_fused_qkv_is_one_tempbalance_unit_and_three_pruning_units():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 96), TimmBlock(), nn.Linear(96, 10))
    _heavy(model)
    report = analyze(model)
    params = layer_parameters(model)
    units = tuned_units(report, params)
    assert ["1.qkv.q", "1.qkv.k", "1.qkv.v"] in units
    factors, by_param = parameter_factors(report, params)
    assert factors["1.qkv.q"] == factors["1.qkv.k"] == factors["1.qkv.v"]
    dense = copy.deepcopy(model)
    achieved = prune_model(model, {"1.qkv.k": 0.5})
    w0, w1 = dense[1].qkv.weight.detach(), model[1].qkv.weight.detach()
    assert achieved == {"1.qkv.k": 0.5}
    assert torch.equal(w1[:96], w0[:96]) and torch.equal(w1[192:], w0[192:])
    assert int((w1[96:192] == 0).sum()) == 96 * 96 // 2


def test_head_interleaved_parts_prune_in_place_and_old_names_warn():
    neox = _heavy(NeoXAttention())
    w0 = neox.query_key_value.weight.detach().clone()
    prune_model(neox, {"query_key_value.v": 0.25})
    heads = neox.query_key_value.weight.detach().view(4, 3, 24, 96)
    assert int((heads[:, 2] == 0).sum()) == round(0.25 * 96 * 96)
    assert torch.equal(heads[:, :2], w0.view(4, 3, 24, 96)[:, :2])
    gpt = nn.Module()
    gpt.c_attn = nn.Linear(64, 192)
    with pytest.warns(UserWarning, match="c_attn -> c_attn.q, c_attn.k, c_attn.v"):
        achieved = prune_model(gpt, {"c_attn": 0.5})  # a dict from before the split
    assert sorted(achieved) == ["c_attn.k", "c_attn.q", "c_attn.v"] and set(achieved.values()) == {0.5}
    with pytest.raises(ValueError, match="unknown layer"):
        prune_model(gpt, {"nothing": 0.5})
    assert [l.name for l in discover_layers(gpt, split_qkv=False)] == ["c_attn"]
    assert prune_model(copy.deepcopy(gpt), {"c_attn": 0.5}, split_qkv=False) == {"c_attn": 0.5}


def test_pruning_callback_and_lr_balancer_follow_renamed_checkpoint_names():
    from farms_lightning.training.pruning_callback import FARMSModelPruning

    pruning = FARMSModelPruning(amount=0.5)
    pruning.alphas = {"c_attn": 3.0, "fc": 2.0, "gone": 4.0}
    with pytest.warns(UserWarning, match="earlier version"):
        pruning._follow_renames({"c_attn.q": 1, "c_attn.k": 1, "c_attn.v": 1, "fc": 1})
    assert pruning.alphas == {"c_attn.q": 3.0, "c_attn.k": 3.0, "c_attn.v": 3.0, "fc": 2.0}


def test_resumed_callbacks_with_old_names_say_so_and_keep_working():
    from farms_lightning import FARMSCallback, FARMSLRBalancer

    model = nn.Module()
    model.c_attn = nn.Linear(64, 192)
    model.fc = nn.Linear(64, 64)
    callback = FARMSCallback()
    callback.load_state_dict({"history": [{"stage": "epoch", "epoch": 0, "step": 4, "summary": {},
                                           "layers": [{"name": "c_attn", "status": "ok"},
                                                      {"name": "fc", "status": "ok"}]}]})
    with pytest.warns(UserWarning, match="c_attn -> c_attn.q, c_attn.k, c_attn.v"):
        callback._check_history_names(model)
    balancer = FARMSLRBalancer()
    balancer.load_state_dict({"history": [], "lr_factors": {"c_attn": 1.25, "fc": 0.75}})
    balancer._layer_params = layer_parameters(model)
    with pytest.warns(UserWarning, match="earlier version"):
        balancer._follow_renames()
    assert balancer.lr_factors == {"c_attn.q": 1.25, "c_attn.k": 1.25, "c_attn.v": 1.25, "fc": 0.75}


# ----------------------------------------------------------------------------- tied heads
def test_a_tied_head_follows_the_embeddings_opt_in():
    model = nn.Module()
    model.wte = nn.Embedding(300, 128)
    model.body = _heavy(nn.Linear(128, 128))
    model.lm_head = nn.Linear(128, 300, bias=False)
    model.lm_head.weight = model.wte.weight
    default = analyze(model)
    assert default["lm_head"].status == "skipped" and default["lm_head"].reason == "shares weights with wte"
    assert default.summary["num_fitted"] == 1
    opted = analyze(model, layer_types=["Linear", "Embedding"])
    assert opted["wte"].status == "ok" and opted["lm_head"].reason == "shares weights with wte"


# ----------------------------------------------------------------------------- quantized, sparse, float8
def test_dynamic_quantized_linear_is_analysed_from_its_dequantized_weights():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torch.ao.quantization.quantize_dynamic(_heavy(nn.Sequential(nn.Linear(200, 150), nn.ReLU())),
                                                       {nn.Linear}, dtype=torch.qint8)
        dequantized = model[0].weight().dequantize().numpy()
        report = analyze(model)
        assert report["0"].status == "ok"
        assert report["0"].alpha == pytest.approx(ref.fit(ref.farms_eigs(dequantized))["alpha"], rel=1e-9)
        assert layer_parameters(model)["0"] == []
        with pytest.raises(ValueError, match="quantized"):
            prune_model(model, {"0": 0.5})
        conv = torch.ao.nn.quantized.Conv2d(32, 64, 3, groups=4)
        w = _heavy(nn.Conv2d(32, 64, 3, groups=4)).weight.detach()
        conv.set_weight_bias(torch.quantize_per_tensor(w, float(w.abs().max()) / 127, 0, torch.qint8), None)
        stats = analyze(conv, min_window_side=2)[""]  # 8x8 blocks per group
        expected = ref.grouped_conv_block_eigs(conv.weight().dequantize().numpy(), 4)
        assert stats.status == "ok" and stats.alpha == pytest.approx(_alpha(expected), rel=1e-9)


@pytest.mark.parametrize("form", ["coo", "csr", "float8"])
def test_sparse_and_float8_weights_are_analysed_like_their_dense_values(form):
    layer = _heavy(nn.Linear(150, 120))
    if form == "float8":
        layer.weight = nn.Parameter(layer.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
        dense = layer.weight.detach().float()
    else:
        dense = layer.weight.detach().clone()
        sparse = dense.to_sparse() if form == "coo" else dense.to_sparse_csr()
        layer.weight = nn.Parameter(sparse, requires_grad=False)
    stats = analyze(layer)[""]
    assert stats.status == "ok", stats.reason
    assert stats.alpha == pytest.approx(ref.fit(ref.farms_eigs(dense.double().numpy()))["alpha"], rel=1e-9)
    with pytest.raises(ValueError, match="float8|sparse"):
        prune_model(layer, {"": 0.5})


# ----------------------------------------------------------------------------- parametrizations
def _parametrized_models():
    from torch.nn.utils import parametrizations as P

    torch.manual_seed(0)
    yield "spectral_norm", P.spectral_norm(_heavy(nn.Linear(120, 100)))
    yield "weight_norm", P.weight_norm(_heavy(nn.Linear(120, 100)))
    yield "orthogonal", P.orthogonal(nn.Linear(100, 100))


@pytest.mark.parametrize("train", [True, False])
def test_parametrized_modules_keep_every_state(train):
    for kind, layer in _parametrized_models():
        layer.train(train)
        x = torch.randn(4, layer.in_features)
        state = {k: v.clone() for k, v in layer.state_dict().items()}
        rng = torch.get_rng_state()
        probe = copy.deepcopy(layer)
        expected_out = probe(x)  # what the next forward gives without analysis
        with torch.no_grad():  # the eval-mode parametrized weight (spectral norm: stored u, v, no iteration)
            weight = copy.deepcopy(layer).eval().weight.detach().double().numpy()
        report = analyze(layer, esd="full")
        assert all(torch.equal(state[k], v) for k, v in layer.state_dict().items()), kind
        assert torch.equal(torch.get_rng_state(), rng)
        assert [m.training for m in layer.modules()] == [train] * len(list(layer.modules()))
        assert torch.equal(layer(x), expected_out), kind
        if kind != "orthogonal":
            assert report[""].alpha == pytest.approx(ref.fit(ref.full_eigs(weight))["alpha"], rel=1e-9), kind
            assert report[""].lambda_max == pytest.approx(ref.full_eigs(weight)[-1], rel=1e-9), kind
        else:
            assert report[""].status == "failed" and "flat" in report[""].reason
        with pytest.raises(ValueError, match="parametriz"):
            prune_model(layer, {"": 0.5})
        params = layer_parameters(layer)[""]  # TempBalance scales every original and the bias
        assert {id(p) for p in params} == {id(p) for p in layer.parameters()}, kind


# ----------------------------------------------------------------------------- LoRA
peft = pytest.importorskip("peft")


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(128, 128)
        self.value = nn.Linear(128, 128)
        self.out = nn.Linear(128, 64)

    def forward(self, x):
        return self.out(self.query(x) + self.value(x))


def _lora(use_dora: bool = False) -> nn.Module:
    torch.manual_seed(0)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], use_dora=use_dora)
    model = peft.get_peft_model(_heavy(Tiny()), config)
    with torch.no_grad():  # a trained-looking adapter (B is zero at init)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    return model


def test_lora_layers_are_analysed_as_their_effective_weight():
    model = _lora()
    report = analyze(model)
    assert list(report) == ["query", "value", "out"]
    for name in ("query", "value"):
        wrapped = getattr(model.base_model.model, name)
        a, b = wrapped.lora_A["default"].weight.detach().double(), wrapped.lora_B["default"].weight.detach().double()
        base = wrapped.base_layer.weight.detach().double()
        effective = (base + 2.0 * b @ a).numpy()  # scaling = lora_alpha / r = 2
        assert report[name].alpha == pytest.approx(ref.fit(ref.farms_eigs(effective))["alpha"], rel=1e-6)
        delta = analyze(model, lora="delta", esd="full", min_eigenvalues=5)[name]
        assert delta.num_evals == 8 and delta.num_dropped == 120  # rank r = 8 of 128
        assert delta.alpha == pytest.approx(ref.fit(ref.full_eigs((2.0 * b @ a).numpy()), min_evals=5)["alpha"], rel=1e-6)
    params = {name: (p, p.dtype) for name, p in model.named_parameters()}
    rank_limited = analyze(model, lora="delta", esd="full")["query"]  # rank 8 < min_eigenvalues=10
    assert all(p is params[n][0] and p.dtype == params[n][1] for n, p in model.named_parameters())
    assert rank_limited.status == "failed" and rank_limited.num_evals == 8, rank_limited.reason
    merged = copy.deepcopy(model).merge_and_unload()
    assert analyze(merged)["query"].alpha == pytest.approx(report["query"].alpha, rel=1e-5)
    with pytest.raises(ValueError, match="lora"):
        analyze(model, lora="adapters")


def test_lora_tempbalance_units_are_the_adapters_and_pruning_asks_to_merge():
    model = _lora()
    params = layer_parameters(model)
    wrapped = model.base_model.model.query
    assert params["query"] == [wrapped.lora_A["default"].weight, wrapped.lora_B["default"].weight]
    assert all(p.requires_grad for p in params["query"])
    assert params["out"][0] is model.base_model.model.out.weight
    with pytest.raises(ValueError, match=r"merge_and_unload\(\) first"):
        prune_model(model, {"query": 0.5})
    assert prune_model(model, {"out": 0.5}) == {"out": 0.5}


def test_dora_gets_a_reason():
    report = analyze(_lora(use_dora=True))
    assert report["query"].status == "skipped" and "merge_and_unload" in report["query"].reason


# ----------------------------------------------------------------------------- state dicts
def test_state_dict_shells_split_like_live_modules_and_skip_lora_keys():
    from farms_lightning.models.state_dict import model_from_state_dict

    torch.manual_seed(0)
    live = nn.Module()
    live.mha = nn.MultiheadAttention(64, 4)
    live.blk = TimmBlock(64)
    gpt = nn.Module()
    gpt.c_attn = nn.Linear(1, 1)  # replaced below by a (in, 3 in) Conv1D-shaped weight
    sd = {**live.state_dict(), "h.c_attn.weight": torch.randn(64, 192),
          "x.query.lora_A.weight": torch.randn(8, 64), "x.query.lora_B.weight": torch.randn(64, 8)}
    report = analyze(model_from_state_dict(sd))
    live_names = list(analyze(live))
    assert [n for n in report if n in live_names] == live_names
    assert report["mha.in_proj.k"].alpha == analyze(live)["mha.in_proj.k"].alpha
    assert torch.equal(
        {l.name: l for l in discover_layers(model_from_state_dict(sd))}["h.c_attn.v"].oriented(), sd["h.c_attn.weight"].T[128:])
    assert report["x.query.lora_A"].status == "skipped" and "merge first" in report["x.query.lora_A"].reason
    with pytest.raises(ValueError, match="merge"):
        prune_model(model_from_state_dict(sd), {"x.query.lora_B": 0.5})


def test_cli_splits_by_key_and_no_split_qkv_keeps_projections_whole(tmp_path, capsys):
    import json

    from farms_lightning.cli.commands import main

    torch.manual_seed(0)
    sd = {"blk.attn.qkv.weight": heavy_tailed(192, 64, seed=1), "h.attn.c_attn.weight": heavy_tailed(64, 192, seed=2),
          "h.attn.c_proj.weight": heavy_tailed(64, 64, seed=3), "x.query.lora_A.weight": torch.randn(8, 64)}
    torch.save(sd, tmp_path / "sd.pt")
    assert main(["analyze", str(tmp_path / "sd.pt"), "--format", "json", "-o", str(tmp_path / "a.json")]) == 0
    rows = {r["name"]: r for r in json.loads((tmp_path / "a.json").read_text())["layers"]}
    assert sorted(rows) == ["blk.attn.qkv.k", "blk.attn.qkv.q", "blk.attn.qkv.v", "h.attn.c_attn.k", "h.attn.c_attn.q",
                            "h.attn.c_attn.v", "h.attn.c_proj", "x.query.lora_A"]
    assert rows["x.query.lora_A"]["status"] == "skipped" and "merge first" in rows["x.query.lora_A"]["reason"]
    expected = ref.fit(ref.farms_eigs(sd["h.attn.c_attn.weight"].T[64:128].double().numpy()))["alpha"]
    assert rows["h.attn.c_attn.k"]["alpha"] == pytest.approx(expected, rel=1e-9)
    assert main(["analyze", str(tmp_path / "sd.pt"), "--no-split-qkv", "--format", "json", "-o",
                 str(tmp_path / "b.json")]) == 0
    whole = [r["name"] for r in json.loads((tmp_path / "b.json").read_text())["layers"]]
    assert whole == ["blk.attn.qkv", "h.attn.c_attn", "h.attn.c_proj", "x.query.lora_A"]
    code = main(["prune", str(tmp_path / "sd.pt"), "--sparsity", "0.5", "-o", str(tmp_path / "p.pt")])
    assert code == 2 and "merge" in capsys.readouterr().err  # adapter tensors are not pruned
    code = main(["prune", str(tmp_path / "sd.pt"), "--sparsity", "0.5", "--exclude", "x.*", "-o", str(tmp_path / "p.pt")])
    pruned = torch.load(tmp_path / "p.pt", weights_only=True)
    assert code == 0 and int((pruned["blk.attn.qkv.weight"] == 0).sum()) > 0
