import pytest
import torch
from torch import nn

from farms_lightning import analyze
from farms_lightning.models.layers import clean_name, discover_layers


class GPT2Conv1D(nn.Module):
    """Shaped like transformers' Conv1D: weight stored (in, out), `nf` output features."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.zeros(nf))


class Zoo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(500, 64)
        self.conv1 = nn.Conv1d(64, 96, 3)
        self.conv3 = nn.Conv3d(4, 8, 2)
        self.attn = nn.MultiheadAttention(64, 4)
        self.attn_kv = nn.MultiheadAttention(64, 4, kdim=32, vdim=48)
        self.c_attn = GPT2Conv1D(192, 64)
        self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64, 500, bias=False)


def test_discovery_names_kinds_and_order():
    names = [(l.name, l.kind) for l in discover_layers(Zoo())]
    assert names == [
        ("conv1", "Conv1d"), ("conv3", "Conv3d"),
        ("attn.in_proj.q", "MultiheadAttention"), ("attn.in_proj.k", "MultiheadAttention"),
        ("attn.in_proj.v", "MultiheadAttention"), ("attn.out_proj", "Linear"),
        ("attn_kv.q_proj", "MultiheadAttention"), ("attn_kv.k_proj", "MultiheadAttention"),
        ("attn_kv.v_proj", "MultiheadAttention"), ("attn_kv.out_proj", "Linear"),
        ("c_attn.q", "Conv1D"), ("c_attn.k", "Conv1D"), ("c_attn.v", "Conv1D"), ("head", "Linear"),
    ]
    whole = [l.name for l in discover_layers(Zoo(), split_qkv=False)]
    assert "attn.in_proj" in whole and "c_attn" in whole and not any(n.endswith((".q", ".k", ".v")) for n in whole)
    with_embedding = [l.name for l in discover_layers(Zoo(), layer_types=[*DEFAULTS, "Embedding"])]
    assert with_embedding[0] == "embed"


DEFAULTS = ("Linear", "Conv1d", "Conv2d", "Conv3d", "MultiheadAttention", "Conv1D")


def test_split_and_transposed_matrices_read_the_right_values():
    model = Zoo()
    layers = {l.name: l for l in discover_layers(model)}
    e = 64
    assert torch.equal(layers["attn.in_proj.k"].oriented(), model.attn.in_proj_weight[e:2 * e])
    assert layers["attn.in_proj.k"].shape == (64, 64) and layers["attn.in_proj.k"].num_params == 64 * 64
    # GPT-2 Conv1D stores (in, out): q/k/v are column thirds of the stored weight.
    assert torch.equal(layers["c_attn.k"].oriented(), model.c_attn.weight.T[e:2 * e])
    assert layers["c_attn.k"].shape == (64, 64) and layers["c_attn.k"].num_params == 64 * 64
    whole = {l.name: l for l in discover_layers(model, split_qkv=False)}
    assert torch.equal(whole["c_attn"].oriented(), model.c_attn.weight.T) and whole["c_attn"].shape == (64, 192)
    assert torch.equal(layers["attn_kv.k_proj"].oriented(), model.attn_kv.k_proj_weight)


def test_type_and_name_filters():
    model = Zoo()
    only_linear = [l.name for l in discover_layers(model, layer_types="Linear")]
    assert only_linear == ["attn.out_proj", "attn_kv.out_proj", "head"]
    assert [l.name for l in discover_layers(model, layer_types=[nn.Conv1d])] == ["conv1"]
    assert [l.name for l in discover_layers(model, include="attn.*")] == [
        "attn.in_proj.q", "attn.in_proj.k", "attn.in_proj.v", "attn.out_proj"]
    names = [l.name for l in discover_layers(model, exclude=["*.in_proj.*", "*_proj", "conv*"])]
    assert names == ["c_attn.q", "c_attn.k", "c_attn.v", "head"]  # "*_proj" matches the out_proj layers too
    with pytest.raises(ValueError, match="layer_types"):
        discover_layers(model, layer_types=["Dense"])
    with pytest.raises(ValueError, match="include"):
        discover_layers(model, include=[3])


@pytest.mark.parametrize(
    "raw,clean",
    [("module.features.3", "features.3"), ("_orig_mod.module.fc", "fc"),
     ("block._fsdp_wrapped_module.layer._checkpoint_wrapped_module.fc", "block.layer.fc"),
     ("encoder.module.fc", "encoder.module.fc"), ("", "")],
)
def test_wrapper_prefixes_are_stripped(raw, clean):
    assert clean_name(raw) == clean


def test_compiled_and_wrapped_models_keep_their_names():
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128))
    plain = analyze(model)

    class Wrapper(nn.Module):  # what DistributedDataParallel looks like to named_modules()
        def __init__(self, module):
            super().__init__()
            self.module = module

    for wrapped in (torch.compile(model), Wrapper(model), Wrapper(torch.compile(model))):
        report = analyze(wrapped)
        assert list(report) == ["0", "2"]
        assert report["2"].alpha == plain["2"].alpha


def test_shared_modules_and_tied_weights_are_analysed_once():
    model = nn.Module()
    model.embed = nn.Embedding(300, 128)
    model.body = nn.Linear(128, 128)
    model.head = nn.Linear(128, 300, bias=False)
    model.head.weight = model.embed.weight
    model.again = model.body  # the same module under a second name
    report = analyze(model, layer_types=["Linear", "Embedding"])
    assert list(report) == ["embed", "body", "head", "again"]
    assert report["embed"].status == "ok"
    assert report["head"].status == "skipped" and report["head"].reason == "shares weights with embed"
    assert report["again"].status == "skipped" and report["again"].reason == "shares weights with body"
    assert report.summary["num_fitted"] == 2


@pytest.mark.parametrize("order", [("a.b.weight", "a.weight"), ("a.weight", "a.b.weight")])
def test_state_dict_shells_keep_every_layer_in_any_key_order(order):
    from farms_lightning.models.state_dict import model_from_state_dict

    tensors = {"a.weight": torch.randn(30, 20), "a.b.weight": torch.randn(40, 30, 3, 3), "a.bias": torch.randn(30),
               "emb.word_embeddings.weight": torch.randn(50, 20), "ids": torch.arange(5)}
    model = model_from_state_dict({k: tensors[k] for k in (*order, "a.bias", "emb.word_embeddings.weight", "ids")})
    layers = {l.name: l for l in discover_layers(model, layer_types=list(DEFAULTS) + ["Embedding"])}
    assert sorted(layers) == ["a", "a.b", "emb.word_embeddings"]
    assert layers["a.b"].kind == "Conv2d" and layers["emb.word_embeddings"].kind == "Embedding"
    assert layers["a"].weight is tensors["a.weight"] or torch.equal(layers["a"].weight, tensors["a.weight"])
