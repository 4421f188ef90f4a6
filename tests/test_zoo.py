"""A model zoo: Hugging Face models built from small configs (random init, nothing downloaded), a PEFT
LoRA-wrapped BERT and hand-written CNN/ViT blocks. Names, counts and statuses are what a user should
see, and no fitted alpha comes from a degenerate matrix."""

import pytest
import torch
from torch import nn

from farms_lightning import analyze
from farms_lightning.engine.layer_plans import degenerate_conv_reason
from farms_lightning.models.layers import discover_layers

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow
transformers.logging.set_verbosity_error()

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    T = transformers
    if name == "bert":
        return T.BertModel(T.BertConfig(vocab_size=200, max_position_embeddings=64, **SMALL))
    if name == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=200, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                              bos_token_id=0, eos_token_id=0))
    if name == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=200, num_key_value_heads=2, max_position_embeddings=64,
                                                bos_token_id=0, eos_token_id=0, **SMALL))
    if name == "vit":
        return T.ViTModel(T.ViTConfig(image_size=32, patch_size=8, **SMALL))
    if name == "t5":
        return T.T5Model(T.T5Config(vocab_size=200, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4))
    if name == "gpt_neox":
        return T.GPTNeoXForCausalLM(T.GPTNeoXConfig(vocab_size=200, max_position_embeddings=64, bos_token_id=0,
                                                    eos_token_id=0, **SMALL))
    if name == "phi3":
        return T.Phi3ForCausalLM(T.Phi3Config(vocab_size=200, num_key_value_heads=2, max_position_embeddings=64,
                                              pad_token_id=0, bos_token_id=0, eos_token_id=0, **SMALL))
    raise KeyError(name)


def assert_no_degenerate_fit(model: nn.Module, report) -> None:
    """Every fitted layer's analysed matrices (a conv: each group's kernel-position matrices) are at least 2x2."""
    layers = {layer.name: layer for layer in discover_layers(model)}
    for stats in report.layers:
        if stats.status != "ok":
            continue
        layer = layers[stats.name]
        if layer.is_conv:
            assert not degenerate_conv_reason(layer.weight.shape, layer.groups), stats.name
        else:
            assert min(layer.oriented().shape) >= 2, stats.name


# (model, number of rows, {name: (status, reason fragment)}, names that must not appear)
EXPECTED = {
    "bert": (13, {"encoder.layer.1.attention.self.key": ("ok", ""), "pooler.dense": ("ok", "")}, ()),
    "gpt2": (13, {"transformer.h.0.attn.c_attn.q": ("ok", ""), "transformer.h.1.attn.c_attn.v": ("ok", ""),
                  "transformer.h.0.mlp.c_fc": ("ok", ""),
                  "lm_head": ("skipped", "shares weights with transformer.wte")}, ("transformer.h.0.attn.c_attn",)),
    "llama": (15, {"model.layers.0.self_attn.k_proj": ("ok", ""), "lm_head": ("ok", "")}, ()),
    # The patch embedding's 3 input channels give 3x3 blocks: too small to judge.
    "vit": (14, {"embeddings.patch_embeddings.projection": ("too_small", "3x3 windows")}, ()),
    "t5": (32, {"decoder.block.1.layer.1.EncDecAttention.k": ("ok", "")}, ()),
    "gpt_neox": (13, {"gpt_neox.layers.0.attention.query_key_value.q": ("ok", ""),
                      "gpt_neox.layers.1.attention.query_key_value.v": ("ok", "")},
                 ("gpt_neox.layers.0.attention.query_key_value",)),
    "phi3": (9, {"model.layers.0.self_attn.qkv_proj": ("ok", "")}, ("model.layers.0.self_attn.qkv_proj.q",)),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_hugging_face_models(name):
    model = build(name)
    report = analyze(model)
    count, statuses, absent = EXPECTED[name]
    assert len(report) == count, list(report)
    for layer, (status, reason) in statuses.items():
        assert report[layer].status == status and reason in report[layer].reason, (layer, report[layer].reason)
    assert not set(absent) & set(report)
    assert report.summary["num_fitted"] == count - sum(s != "ok" for s, _ in statuses.values())
    assert_no_degenerate_fit(model, report)


def test_gpt2_split_shapes_and_the_whole_option():
    model = build("gpt2")
    report = analyze(model)
    assert report["transformer.h.0.attn.c_attn.k"].shape == (64, 64)
    whole = analyze(model, split_qkv=False)
    # c_attn, c_proj, c_fc, mlp.c_proj per block, and the tied head
    assert len(whole) == 2 * 4 + 1 and whole["transformer.h.0.attn.c_attn"].shape == (64, 192)


def test_neox_parts_are_the_heads_rows():
    model = build("gpt_neox")
    attention = model.gpt_neox.layers[0].attention
    layers = {layer.name: layer for layer in discover_layers(model)}
    heads = attention.query_key_value.weight.detach().view(4, 3, 16, 64)  # (heads, q|k|v, head_size, in)
    assert torch.equal(layers["gpt_neox.layers.0.attention.query_key_value.k"].oriented(), heads[:, 1].reshape(64, 64))


def test_peft_lora_bert_keeps_the_plain_names():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification(
        transformers.BertConfig(vocab_size=200, max_position_embeddings=64, num_labels=3, **SMALL))
    plain = analyze(base)
    config = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"])
    model = peft.get_peft_model(base, config)
    report = analyze(model)
    # No base_model.model., no .base_layer, no adapter rows; the classifier is the trained copy
    # (modules_to_save) under its own name, not two rows.
    assert list(report) == list(plain) and len(report) == 14
    # The 3-label classifier (3x3 windows) is too small to judge; every other layer is fitted.
    assert {s.name for s in report.layers if s.status != "ok"} == {"classifier"}
    assert report["classifier"].status == plain["classifier"].status == "too_small"
    # lora_B starts at zero: the effective weight is the base weight.
    assert report["bert.encoder.layer.0.attention.self.query"].alpha == \
        plain["bert.encoder.layer.0.attention.self.query"].alpha
    assert report["bert.encoder.layer.0.attention.self.query"].type == "Linear"
    assert_no_degenerate_fit(model, report)


class CNNBlocks(nn.Module):
    """MobileNet/ConvNeXt depthwise, ResNeXt grouped, squeeze-excitation 1x1 and a timm ViT block."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3)
        self.conv_dw = nn.Conv2d(96, 96, 7, groups=96)
        self.dw_mult = nn.Conv2d(32, 64, 5, groups=32)
        self.grouped = nn.Conv2d(128, 128, 3, groups=32)
        self.se_reduce = nn.Conv2d(64, 16, 1)
        self.se_expand = nn.Conv2d(16, 64, 1)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(64, 192)
        self.attn.proj = nn.Linear(64, 64)


def test_cnn_and_vit_blocks():
    model = CNNBlocks()
    report = analyze(model, min_window_side=2)  # the block geometry of every layer, small blocks included
    assert {n for n, s in analyze(model).items() if s.status == "too_small"} == {"stem", "grouped"}
    assert list(report) == ["stem", "conv_dw", "dw_mult", "grouped", "se_reduce", "se_expand", "attn.qkv.q",
                            "attn.qkv.k", "attn.qkv.v", "attn.proj"]
    assert {n for n, s in report.items() if s.status == "skipped"} == {"conv_dw", "dw_mult"}
    assert all("depthwise" in report[n].reason for n in ("conv_dw", "dw_mult"))
    assert report["grouped"].num_evals == 32 * 9 * 4  # 32 groups, one 4x4 block each, 9 kernel positions
    assert report["se_reduce"].num_evals == report["se_expand"].num_evals == 4 * 16  # four 16x16 blocks
    assert_no_degenerate_fit(model, report)


def test_peft_lora_gpt2_fan_in_fan_out_equals_the_merged_model():
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    model = peft.get_peft_model(build("gpt2"), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    report = analyze(model)
    merged = analyze(model.merge_and_unload())
    assert list(report) == list(merged)
    for name in ("transformer.h.0.attn.c_attn.q", "transformer.h.1.attn.c_attn.v"):
        assert report[name].alpha == pytest.approx(merged[name].alpha, rel=1e-9)
    assert report["lm_head"].reason == "shares weights with transformer.wte"
