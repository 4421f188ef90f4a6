"""A stand-in module built from a bare state dict, so that ``analyze`` works without a model class."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

#: Key fragments that mark an embedding table (analysed only when "Embedding" is selected).
EMBEDDING_HINTS = ("embed", "wte", "wpe")


def model_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Wrap the weight tensors of ``state_dict`` in ``Linear``/``Conv``/``Embedding`` shells.

    Every floating-point tensor of 2 to 5 dimensions whose key ends in ``weight`` becomes the
    ``weight`` of a module named after its key (``encoder.layer.0.query.weight`` ->
    ``encoder.layer.0.query``): 2-D as ``nn.Linear`` (``nn.Embedding`` when the key names an
    embedding), 3/4/5-D as ``nn.Conv1d/2d/3d``. The tensors are shared, not copied; everything
    else (biases, norms, buffers) is ignored.

    Example::

        >>> model = model_from_state_dict(torch.load("weights.pt"))
        >>> analyze(model).to_rows()
    """
    root = nn.Module()
    for key, tensor in state_dict.items():
        if not (isinstance(tensor, torch.Tensor) and key.endswith("weight") and 2 <= tensor.dim() <= 5
                and tensor.is_floating_point()):
            continue
        path = key.removesuffix(".weight") if key.endswith(".weight") else key
        parts = path.split(".")
        parent = root
        for part in parts[:-1]:
            if part not in parent._modules:
                parent.add_module(part, nn.Module())
            parent = parent._modules[part]  # type: ignore[assignment]
        shell = _shell(tensor, key)
        existing = parent._modules.get(parts[-1])
        if existing is not None:  # "a.b.weight" came before "a.weight": keep a's children
            for name, child in existing._modules.items():
                shell.add_module(name, child)
        parent.add_module(parts[-1], shell)
    return root


def _shell(tensor: torch.Tensor, key: str) -> nn.Module:
    shape = tuple(tensor.shape)
    if tensor.dim() == 2 and any(hint in key.lower() for hint in EMBEDDING_HINTS):
        module: nn.Module = nn.Embedding(shape[0], shape[1], device="meta")
    elif tensor.dim() == 2:
        module = nn.Linear(shape[1], shape[0], bias=False, device="meta")
    else:
        conv = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}[tensor.dim()]
        module = conv(shape[1], shape[0], shape[2:], bias=False, device="meta")  # type: ignore[arg-type]
    module.weight = nn.Parameter(tensor.detach(), requires_grad=False)
    return module
