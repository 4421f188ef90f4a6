"""Unstructured pruners that apply per-layer sparsities: magnitude and Wanda, offline or during training.

Layers are named as :func:`farms_lightning.analyze` names them, so an allocation from
:func:`farms_lightning.policies.pruning.alpha_sparsity` (or ``uniform_sparsity``) applies directly.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping, Sequence, Union

import torch
from torch import nn

from farms_lightning.models.layers import LAYER_TYPES, LayerMatrix, discover_layers, renamed_layers

METHODS = ("magnitude", "wanda")
#: Kinds whose inputs Wanda can weigh: the weight multiplies the last dimension of the input.
WANDA_KINDS = ("Linear", "Conv1D", "MultiheadAttention")

Calibration = Union[torch.Tensor, Sequence[Any], Mapping[str, Any], Callable[[nn.Module], Any], None]


def prune_model(
    model: nn.Module,
    sparsities: Mapping[str, float],
    method: str = "magnitude",
    calibration: Calibration = None,
    *,
    split_qkv: bool = True,
) -> dict[str, float]:
    """Zero the least important weights of each named layer, in place, to its sparsity.

    Weights are set to zero (no masks, no hooks, no reparametrisation), under ``torch.no_grad()``:
    in each named matrix the ``round(sparsity * numel)`` entries (Python's ``round``: half to even)
    with the smallest scores, ties broken by position (row-major in the matrix as analysed, i.e.
    ``(out, in)``), so a matrix without zeros ends with exactly that many. Weights that are zero
    already score lowest and count among them. Layers not in ``sparsities`` are never touched.

    - ``"magnitude"``: score ``|W|`` over the whole matrix.
    - ``"wanda"``: score ``|W_ij| * ||x_j||_2`` compared within each output row ``i``, where
      ``||x_j||_2`` is the norm of input feature ``j`` over every position of every calibration
      forward pass (collected with forward pre-hooks on the dense model, one pass). To remove
      exactly ``k`` weights, every row loses ``k // rows`` and the first ``k % rows`` rows one more.
      Linear, GPT-2 ``Conv1D`` and ``MultiheadAttention`` layers (q/k/v from query/key/value).

    Args:
        model: the model; layer names as :func:`farms_lightning.analyze` gives them (any layer
            type, ``in_proj.q|k|v`` for a packed attention in-projection).
        sparsities: ``{layer name: fraction of its weights to zero}``, each in ``[0, 1]``.
        method: ``"magnitude"`` or ``"wanda"``.
        calibration: for Wanda: a tensor (``model(x)``), a tuple/list (``model(*args)``), a dict
            (``model(**kwargs)``) or a callable (``calibration(model)``). The model runs in eval
            mode under ``torch.no_grad()``; training flags are restored afterwards.
        split_qkv: name fused q/k/v projections as their parts ``<name>.q|k|v`` (default, as
            ``analyze`` does) or whole (``False``).

    Returns:
        ``{layer name: achieved sparsity}``, the fraction of exact zeros in each pruned matrix.

    Raises:
        ValueError: an unknown layer name or method, a sparsity outside ``[0, 1]``, Wanda without
            ``calibration``, on an unsupported layer kind, or on a layer the calibration never reached;
            a layer that cannot be pruned in place (a PEFT LoRA layer: ``merge_and_unload()`` first;
            parametrized, quantized, sparse or float8 weights).

    Warns:
        UserWarning: names of earlier versions (a whole fused ``c_attn``, PEFT's ``base_model.model.``
            prefix): they are pruned as the layers they became, each part with the same sparsity.

    Example::

        >>> sparsities = alpha_sparsity(analyze(model, fit="peak"), sparsity=0.5)
        >>> achieved = prune_model(model, sparsities, method="wanda", calibration=batch)
    """
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}")
    bad = {name: s for name, s in sparsities.items() if not (isinstance(s, (int, float)) and 0 <= s <= 1)}
    if bad:
        raise ValueError(f"`sparsities` must be in [0, 1], got {bad}")
    sparsities = _renamed(model, sparsities, split_qkv)
    layers = select_layers(model, sparsities, split_qkv=split_qkv)
    norms: dict[str, torch.Tensor] = {}
    if method == "wanda":
        if calibration is None:
            raise ValueError("`calibration` inputs are needed for method='wanda'")
        unsupported = [layer.name for layer in layers if layer.kind not in WANDA_KINDS or (
            layer.kind == "MultiheadAttention" and layer.name.endswith("in_proj"))]  # whole: 3 different inputs
        if unsupported:
            raise ValueError(f"method='wanda' supports {WANDA_KINDS} layers, not {unsupported[:3]}")
        norms = input_norms(model, layers, calibration)
    achieved: dict[str, float] = {}
    with torch.no_grad():
        for layer in layers:
            # A view of the parameter: filling it zeroes the stored weights in place.
            view = layer.view_of(layer.weight.detach())
            matrix = view.flatten(0, 1) if view.dim() == 3 and layer.split is not None else view
            count = round(sparsities[layer.name] * matrix.numel())
            if method == "wanda":
                drop = wanda_mask(matrix, norms[layer.name], count)
            else:
                drop = smallest(matrix.abs(), count)
            view.masked_fill_(drop.reshape(view.shape), 0)
            achieved[layer.name] = float((view == 0).sum()) / max(view.numel(), 1)
    return achieved


def _renamed(model: nn.Module, sparsities: Mapping[str, float], split_qkv: bool) -> Mapping[str, float]:
    """``sparsities`` with names of earlier versions replaced by the layers they became (warned)."""
    current = {layer.name for layer in discover_layers(model, layer_types=LAYER_TYPES, split_qkv=split_qkv)}
    renamed = renamed_layers(sparsities, current)
    if not renamed:
        return sparsities
    examples = "; ".join(f"{old} -> {', '.join(new)}" for old, new in list(renamed.items())[:3])
    warnings.warn(f"`sparsities` names {len(renamed)} layer(s) as earlier versions did (fused q/k/v are now split, "
                  f"PEFT prefixes stripped): {examples}. Each is pruned as the layers it became, with its "
                  "sparsity.", UserWarning, stacklevel=3)
    out: dict[str, float] = {}
    for name, s in sparsities.items():
        for new in renamed.get(name, [name]):
            out.setdefault(new, s)
    return out


def select_layers(model: nn.Module, names: Mapping[str, Any] | Sequence[str], *, split_qkv: bool = True
                  ) -> list[LayerMatrix]:
    """The model's matrices named in ``names`` (any layer type), each storage once, in model order.

    Raises:
        ValueError: a name that is not a layer of the model, or a layer whose weights cannot be
            changed in place (LoRA-wrapped, parametrized, quantized, sparse, float8).
    """
    found = {layer.name: layer for layer in discover_layers(model, layer_types=LAYER_TYPES, split_qkv=split_qkv)}
    unknown = [name for name in names if name not in found]
    if unknown:
        raise ValueError(f"`sparsities` names {len(unknown)} unknown layer(s), e.g. {unknown[:3]}; "
                         f"layers are named as `analyze` names them, e.g. {list(found)[:3]}")
    refused = [found[name].write_error() for name in names if found[name].write_error()]
    if refused:
        raise ValueError(refused[0] + (f" (and {len(refused) - 1} more layer(s))" if len(refused) > 1 else ""))
    seen: set[tuple] = set()
    layers = []
    for name in found:
        if name in names and found[name].identity() not in seen:  # a shared matrix is pruned once
            seen.add(found[name].identity())
            layers.append(found[name])
    return layers


def smallest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """A boolean mask of the ``count`` smallest ``scores``; ties go to the earlier flat index."""
    flat = scores.reshape(-1)
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if count > 0:
        # A stable sort keeps equal scores in index order, so ties are broken deterministically.
        order = torch.sort(flat, stable=True).indices
        mask[order[:count]] = True
    return mask.view(scores.shape)


def wanda_mask(matrix: torch.Tensor, norms: torch.Tensor, count: int) -> torch.Tensor:
    """Wanda's choice on an ``(out, in)`` matrix: per row, the smallest ``|W_ij| * norms_j``."""
    rows = matrix.shape[0]
    if matrix.numel() == 0:
        return torch.zeros_like(matrix, dtype=torch.bool)
    scores = matrix.abs().to(torch.float64) * norms.to(matrix.device, torch.float64)
    order = torch.sort(scores, dim=1, stable=True).indices
    per_row = torch.full((rows,), count // rows, device=matrix.device)
    per_row[: count % rows] += 1
    # Rank of each entry within its row, compared with that row's quota.
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(matrix.shape[1], device=matrix.device).expand_as(order))
    return ranks < per_row[:, None]


def input_norms(model: nn.Module, layers: Sequence[LayerMatrix], calibration: Calibration) -> dict[str, torch.Tensor]:
    """``||x_j||_2`` per input feature of each layer over the calibration forward passes (float64)."""
    owners = parameter_owners(model)
    sums: dict[str, torch.Tensor] = {}

    def add(name: str, x: Any) -> None:
        if isinstance(x, torch.Tensor):
            sq = x.detach().to(torch.float64).pow(2).reshape(-1, x.shape[-1]).sum(0)
            sums[name] = sums[name] + sq if name in sums else sq

    def hook_for(module_layers: list[LayerMatrix]) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            for layer in module_layers:
                # MultiheadAttention: q, k, v project the query, key and value inputs.
                if layer.kind == "MultiheadAttention":
                    position = layer.split[0] if layer.split else "qkv".index(layer.name.rsplit(".", 1)[-1][0])
                    add(layer.name, args[position] if len(args) > position else
                        kwargs.get(("query", "key", "value")[position]))
                else:
                    add(layer.name, args[0] if args else next(iter(kwargs.values()), None))
        return hook

    by_module: dict[int, tuple[nn.Module, list[LayerMatrix]]] = {}
    for layer in layers:
        module = owners[id(layer.weight)][0]
        by_module.setdefault(id(module), (module, []))[1].append(layer)
    handles = [m.register_forward_pre_hook(hook_for(ls), with_kwargs=True) for m, ls in by_module.values()]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            run_calibration(model, calibration)
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes.items():
            m.training = training
    missing = [layer.name for layer in layers if layer.name not in sums]
    if missing:
        raise ValueError(f"the calibration never reached {len(missing)} layer(s), e.g. {missing[:3]}; an "
                         f"nn.MultiheadAttention applies its out_proj without calling it: prune those by magnitude")
    return {name: s.sqrt() for name, s in sums.items()}


def run_calibration(model: nn.Module, calibration: Calibration) -> Any:
    """Run ``model`` on ``calibration``: a tensor, positional args, keyword args or a callable."""
    if callable(calibration) and not isinstance(calibration, (torch.Tensor, nn.Module)):
        return calibration(model)
    if isinstance(calibration, torch.Tensor):
        return model(calibration)
    if isinstance(calibration, Mapping):
        return model(**calibration)
    return model(*calibration)  # type: ignore[misc]


def parameter_owners(model: nn.Module) -> dict[int, tuple[nn.Module, str]]:
    """``id(parameter) -> (module, attribute name)`` for every directly owned parameter."""
    return {id(p): (m, name) for m in model.modules() for name, p in m._parameters.items() if p is not None}
