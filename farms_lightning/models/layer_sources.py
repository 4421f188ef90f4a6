"""Weights that are not a plain stored tensor: PEFT LoRA layers, parametrizations, quantized Linear.

Each helper recognises one kind of module by duck typing (no import of ``peft`` or
``torch.ao``) and gives a *reader*: a function returning the weight as the module's forward pass
uses it, computed under ``torch.no_grad()`` without changing any state. Also: fused q/k/v
projections (which matrices a fused projection holds) and the PEFT name prefixes.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

#: Module names of fused q/k/v projections stored as contiguous thirds ``[q; k; v]`` (timm/torchvision
#: ViT and Swin ``qkv``, GPT-2 ``c_attn``, ``qkv_proj``, MosaicML ``Wqkv``); split only when ``out == 3 * in``.
FUSED_QKV_NAMES = ("qkv", "c_attn", "qkv_proj", "Wqkv")
#: Fused projections whose rows interleave the heads, ``(heads, 3, head_dim)`` (GPT-NeoX/Pythia, Bloom, Falcon).
HEAD_INTERLEAVED_QKV_NAMES = ("query_key_value",)
#: Attributes of an attention module that give its number of heads.
HEAD_COUNT_ATTRIBUTES = ("num_attention_heads", "num_heads", "n_head", "n_heads")
LORA_MODES = ("merged", "delta")

Reader = Callable[[], torch.Tensor]


# ----------------------------------------------------------------------------- fused q/k/v
def fused_qkv_split(name: str, module: nn.Module, parent: nn.Module | None, out_features: int,
                    in_features: int) -> tuple[int, str] | None:
    """``(heads, reason)`` of a fused q/k/v projection, or ``None`` when ``module`` is not one.

    ``heads`` is 1 for the contiguous ``[q; k; v]`` layout, the head count for an interleaved one,
    0 when the projection must stay whole (``reason`` says why; it is analysed as one matrix). Grouped-query projections
    (``out != 3 * in``) are not fused q/k/v in this sense and stay whole silently.
    """
    last = name.rsplit(".", 1)[-1]
    if out_features != 3 * in_features:
        return None
    if last in FUSED_QKV_NAMES or getattr(module, "farms_fused_qkv", False):
        return 1, ""
    if last not in HEAD_INTERLEAVED_QKV_NAMES:
        return None
    heads = _head_count(parent, in_features)
    if heads is None or in_features % heads:
        return 0, ("fused q/k/v with interleaved heads, analysed whole: the parent module gives no head "
                   f"count dividing {in_features}")
    return heads, ""


def _head_count(parent: nn.Module | None, embed_dim: int) -> int | None:
    if parent is None:
        return None
    sources = [parent, getattr(parent, "config", None)]
    for source in sources:
        for attribute in HEAD_COUNT_ATTRIBUTES:
            value = getattr(source, attribute, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    for attribute in ("head_size", "head_dim"):
        size = getattr(parent, attribute, None)
        if isinstance(size, int) and size > 0 and embed_dim % size == 0:
            return embed_dim // size
    return None


# ----------------------------------------------------------------------------- PEFT LoRA
def is_lora_layer(module: nn.Module) -> bool:
    """A ``peft`` LoRA layer: a ``base_layer`` plus ``lora_A``/``lora_B`` adapters and ``get_delta_weight``."""
    return (isinstance(getattr(module, "lora_A", None), nn.ModuleDict) and hasattr(module, "base_layer")
            and callable(getattr(module, "get_delta_weight", None)))


def lora_base(module: nn.Module) -> nn.Module:
    getter = getattr(module, "get_base_layer", None)
    return getter() if callable(getter) else module.base_layer  # type: ignore[return-value]


def lora_adapters(module: nn.Module) -> list[str]:
    """The active adapters of a LoRA layer that hold weights in it."""
    active = getattr(module, "active_adapters", None) or []
    if isinstance(active, str):
        active = [active]
    held = set(module.lora_A) | set(getattr(module, "lora_embedding_A", {}) or {})  # type: ignore[arg-type]
    return [a for a in active if a in held]


def lora_variant_reason(module: nn.Module) -> str:
    """Why a LoRA layer cannot be read as ``W + scaling * B @ A`` (DoRA, other variants), or ``""``."""
    variants = getattr(module, "lora_variant", None) or {}
    dora = getattr(module, "use_dora", None) or {}
    for adapter in lora_adapters(module):
        if adapter in variants or dora.get(adapter):
            kind = type(variants[adapter]).__name__ if adapter in variants else "DoRA"
            return (f"LoRA variant {kind} (adapter {adapter!r}) rescales the weight by a learned magnitude: "
                    "call merge_and_unload() first, then analyse the merged model")
    return ""


def lora_reader(module: nn.Module, mode: str) -> Reader:
    """The effective weight ``W + Σ scaling·B@A`` of the active adapters (``"merged"``), or ``Σ scaling·B@A``.

    Deltas come from peft's own ``get_delta_weight`` (which handles ``fan_in_fan_out`` and conv
    LoRA) and have the base weight's stored layout; ``"delta"`` is computed in float64 (float32
    rounding of ``B@A`` would give the update a full rank of noise). Adapters already merged into the
    base weight are not added twice; with the adapters disabled, the merged ones are taken out again (the weight
    the forward pass uses).
    """
    def read() -> torch.Tensor:
        with torch.no_grad():
            base: torch.Tensor = lora_base(module).weight.detach()  # type: ignore[operator]
            adapters = lora_adapters(module)
            merged = set(getattr(module, "merged_adapters", []) or [])
            if mode == "delta":  # in float64: the update's rank stays r (float32 rounding fills the rest)
                total = torch.zeros(base.shape, dtype=torch.float64, device=base.device)
                return sum((_float64_delta(module, a) for a in adapters), total)
            delta = {a: module.get_delta_weight(a).detach().to(base.dtype) for a in adapters}  # type: ignore[operator]
            if getattr(module, "disable_adapters", False):
                return base - sum((d for a, d in delta.items() if a in merged), torch.zeros_like(base))
            return base + sum((d for a, d in delta.items() if a not in merged), torch.zeros_like(base))
    return read


def _float64_delta(module: nn.Module, adapter: str) -> torch.Tensor:
    """peft's ``get_delta_weight`` evaluated on float64 copies of the adapter's weights.

    The copies are put in place of the adapter's parameters for the call only; the original
    ``Parameter`` objects are put back, untouched, whatever happens.
    """
    holders = [getattr(module, name)[adapter] for name in ("lora_A", "lora_B")
               if isinstance(getattr(module, name, None), nn.ModuleDict) and adapter in getattr(module, name)]
    saved = [(h, h._parameters["weight"]) for h in holders if h._parameters.get("weight") is not None]
    try:
        for holder, weight in saved:
            holder._parameters["weight"] = nn.Parameter(weight.detach().double(), requires_grad=False)  # type: ignore[union-attr]
        return module.get_delta_weight(adapter).detach().double()  # type: ignore[operator]
    finally:
        for holder, weight in saved:
            holder._parameters["weight"] = weight


def lora_trainable_parameters(module: nn.Module) -> list[torch.Tensor]:
    """The trainable adapter parameters (``lora_A``/``lora_B`` of the active adapters) of a LoRA layer."""
    params: list[torch.Tensor] = []
    for adapter in lora_adapters(module):
        for container in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
            holder = getattr(module, container, None)
            if holder is not None and adapter in holder:
                item = holder[adapter]
                params.extend(item.parameters() if isinstance(item, nn.Module) else [item])
    return [p for p in params if p.requires_grad]


def modules_to_save_choice(module: nn.Module) -> tuple[str, list[str]] | None:
    """For a PEFT ``ModulesToSaveWrapper`` (a trained copy of e.g. a classifier head): the child the
    forward pass uses and the children it ignores; ``None`` for other modules."""
    saved = getattr(module, "modules_to_save", None)
    if not (isinstance(saved, nn.ModuleDict) and isinstance(getattr(module, "original_module", None), nn.Module)):
        return None
    active = getattr(module, "active_adapters", None) or []
    active = [active] if isinstance(active, str) else list(active)
    disabled = getattr(module, "disable_adapters", False)
    used = "original_module" if disabled or not active or any(a not in saved for a in active) \
        else f"modules_to_save.{active[0]}"
    children = ["original_module"] + [f"modules_to_save.{name}" for name in saved]
    return used, [c for c in children if c != used]


def peft_prefixes(model: nn.Module) -> dict[str, str]:
    """Raw name prefixes added by PEFT wrappers -> what they collapse to.

    A ``PeftModel`` holds the user's model as ``base_model.model``; a tuner model (``LoraModel``)
    as ``model``. Both are recognised by their ``peft_config``.
    """
    prefixes: dict[str, str] = {}
    for name, module in model.named_modules():
        if not hasattr(module, "peft_config"):
            continue
        inner = f"{name}.model" if name else "model"
        if inner in prefixes:  # the tuner inside a PeftModel: already collapsed
            continue
        base = getattr(module, "base_model", None)
        if isinstance(base, nn.Module) and base is not module and isinstance(getattr(base, "model", None), nn.Module):
            prefixes[f"{name}.base_model.model" if name else "base_model.model"] = name
        elif isinstance(getattr(module, "model", None), nn.Module):
            prefixes[inner] = name
    return prefixes


# ----------------------------------------------------------------------------- parametrizations
def is_parametrized(module: nn.Module, attribute: str = "weight") -> bool:
    """``torch.nn.utils.parametrize`` on ``attribute`` (reading it would run the parametrization)."""
    parametrizations = getattr(module, "parametrizations", None)
    return isinstance(parametrizations, nn.ModuleDict) and attribute in parametrizations


def parametrized_original(module: nn.Module, attribute: str = "weight") -> torch.Tensor:
    """The stored tensor behind a parametrized weight (the largest ``original*`` for several)."""
    plist: Any = module.parametrizations[attribute]  # type: ignore[index]
    if hasattr(plist, "original"):
        return plist.original  # type: ignore[return-value]
    originals = [getattr(plist, f"original{i}") for i in range(plist.ntensors)]
    return max(originals, key=lambda t: t.numel())


def parametrized_reader(module: nn.Module, attribute: str = "weight") -> Reader:
    """The parametrized weight, evaluated with the parametrizations in eval mode, changing no state.

    Reading ``module.weight`` in train mode would run e.g. ``spectral_norm``'s power iteration,
    which updates its ``_u``/``_v`` buffers. In eval mode it reuses them: the result is the weight
    an eval-mode forward uses (for ``spectral_norm`` it differs from the train-mode one by a scalar
    only, which leaves alpha unchanged). Training flags and the RNG state are restored.
    """
    def read() -> torch.Tensor:
        plist: Any = module.parametrizations[attribute]  # type: ignore[index]
        modes = [(m, m.training) for m in plist.modules()]
        devices = [t.device.index for t in plist.parameters() if t.device.type == "cuda"]
        try:
            for m, _ in modes:
                m.training = False
            with torch.no_grad(), torch.random.fork_rng(devices=sorted(set(d for d in devices if d is not None))):
                return plist().detach()
        finally:
            for m, training in modes:
                m.training = training
    return read


# ----------------------------------------------------------------------------- quantized
def quantized_kind(module: nn.Module) -> str | None:
    """``"Linear"``/``"Conv1d"``/... for ``torch.ao.nn.quantized`` modules (static, or dynamic from
    ``quantize_dynamic``), whose ``weight()`` is a method returning a quantized tensor; else ``None``."""
    if not (type(module).__module__.startswith("torch.ao.nn.quantized") and callable(getattr(module, "weight", None))):
        return None
    name = type(module).__name__
    for kind in ("Conv1d", "Conv2d", "Conv3d", "Linear"):
        if name.endswith(kind) and hasattr(module, "_packed_params" if kind == "Linear" else "_weight_bias"):
            return kind
    return None


def quantized_reader(module: nn.Module) -> Reader:
    def read() -> torch.Tensor:
        with torch.no_grad():
            return module.weight().dequantize()  # type: ignore[operator]
    return read
