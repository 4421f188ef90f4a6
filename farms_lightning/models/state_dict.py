"""A stand-in module built from a bare state dict, so that ``analyze`` works without a model class."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

#: Key fragments that mark an embedding table (analysed only when "Embedding" is selected).
EMBEDDING_HINTS = ("embed", "wte", "wpe")
#: Key components of PEFT LoRA adapter tensors.
LORA_COMPONENTS = frozenset({"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"})
LORA_KEY_REASON = ("LoRA adapter weights: merge first (merge_and_unload() and save the merged model); a state dict "
                   "lacks the adapter's scaling")


def model_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Wrap the weight tensors of ``state_dict`` in ``Linear``/``Conv``/``Embedding`` shells.

    Every floating-point tensor of 2 to 5 dimensions whose key ends in ``weight`` becomes the
    ``weight`` of a module named after its key (``encoder.layer.0.query.weight`` ->
    ``encoder.layer.0.query``): 2-D as ``nn.Linear`` (``nn.Embedding`` when the key names an
    embedding), 3/4/5-D as ``nn.Conv1d/2d/3d``. The tensors are shared, not copied; everything
    else (biases, norms, buffers) is ignored.

    Keys follow the live modules' naming rules: ``nn.MultiheadAttention``'s ``<m>.in_proj_weight``
    becomes ``<m>.in_proj`` (split into ``.q|k|v`` like the live module), ``<m>.q_proj_weight``
    ``<m>.q_proj``; a GPT-2 ``<m>.c_attn.weight`` stored ``(in, 3·in)`` becomes a ``Conv1D`` (its
    columns are split); ``<m>.qkv.weight`` is split by name like a live ``qkv`` Linear. Grouped
    convolutions cannot be recognised from a state dict (it does not store ``groups``): a
    grouped conv's weight is analysed as a dense conv. PEFT LoRA adapter tensors (``lora_A``,
    ``lora_B``) are reported as skipped ("merge first"): a state dict lacks the adapter's scaling.

    Example::

        >>> model = model_from_state_dict(torch.load("weights.pt"))
        >>> analyze(model).to_rows()
    """
    root = nn.Module()
    for key, tensor in state_dict.items():
        if not (isinstance(tensor, torch.Tensor) and key.endswith("weight") and 2 <= tensor.dim() <= 5
                and tensor.is_floating_point()):
            continue
        path = module_path(key)
        parts = path.split(".")
        parent = root
        for part in parts[:-1]:
            if part not in parent._modules:
                parent.add_module(part, nn.Module())
            parent = parent._modules[part]  # type: ignore[assignment]
        shell = _shell(tensor, key, path)
        existing = parent._modules.get(parts[-1])
        if existing is not None:  # "a.b.weight" came before "a.weight": keep a's children
            for name, child in existing._modules.items():
                shell.add_module(name, child)
        parent.add_module(parts[-1], shell)
    return root


def module_path(key: str) -> str:
    """The name of the module shell that :func:`model_from_state_dict` makes for a weight ``key``."""
    path = key.removesuffix(".weight") if key.endswith(".weight") else key
    if path.endswith("_proj_weight"):  # nn.MultiheadAttention's packed or separate projections
        path = path.removesuffix("_weight")
    return path


class Conv1D(nn.Module):
    """A GPT-2 ``Conv1D`` stand-in: weight stored ``(in, out)``, ``nf`` output features."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.nf = weight.shape[1]
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)


def _shell(tensor: torch.Tensor, key: str, path: str) -> nn.Module:
    shape = tuple(tensor.shape)
    parts = path.split(".")
    if parts[-1] == "c_attn" and tensor.dim() == 2 and shape[1] == 3 * shape[0]:
        return Conv1D(tensor)
    if tensor.dim() == 2 and any(hint in key.lower() for hint in EMBEDDING_HINTS) and not LORA_COMPONENTS & set(parts):
        module: nn.Module = nn.Embedding(shape[0], shape[1], device="meta")
    elif tensor.dim() == 2:
        module = nn.Linear(shape[1], shape[0], bias=False, device="meta")
    else:
        conv = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}[tensor.dim()]
        module = conv(shape[1], shape[0], shape[2:], bias=False, device="meta")  # type: ignore[arg-type]
    module.weight = nn.Parameter(tensor.detach(), requires_grad=False)
    if parts[-1] == "in_proj":
        setattr(module, "farms_fused_qkv", True)  # an nn.MultiheadAttention in-projection: split like the live module
    if LORA_COMPONENTS & set(parts):
        setattr(module, "farms_skip_reason", LORA_KEY_REASON)
    return module
