"""TempBalance (docs/method.md): layer-wise learning-rate factors from alphas, and which parameters they scale.

Pure functions: alphas in, factors out; a model in, the parameters of each tuned layer out. The
mechanism that applies factors to optimizers lives in :mod:`farms_lightning.policies.lr_scaling`.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Sequence

import torch
from torch import nn

from farms_lightning.engine.report import FARMSReport
from farms_lightning.models.layer_sources import lora_trainable_parameters
from farms_lightning.models.layers import LAYER_TYPES, LayerMatrix, discover_layers, stored_weight

LR_MAPPINGS = ("tb_linear_map", "tb_sqrt", "tb_log2", "tb_step")
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def validate_mapping_args(method: str, lr_min_ratio: float, lr_max_ratio: float) -> None:
    if method not in LR_MAPPINGS:
        raise ValueError(f"`lr_balance_method` must be one of {LR_MAPPINGS}, got {method!r}")
    if not (0 < lr_min_ratio <= lr_max_ratio) or not math.isfinite(lr_max_ratio):
        raise ValueError(f"`lr_min_ratio` and `lr_max_ratio` must satisfy 0 < lr_min_ratio <= lr_max_ratio, "
                         f"got {lr_min_ratio!r} and {lr_max_ratio!r}")


def lr_factors(
    alphas: Sequence[float], method: str = "tb_linear_map", lr_min_ratio: float = 0.5, lr_max_ratio: float = 1.5
) -> list[float]:
    """Learning-rate factors of the tuned layers from their alphas (higher alpha -> larger factor).

    ``tb_linear_map``: ``s1 + (s2 - s1)·(a - a_min)/(a_max - a_min)``, ``(s1 + s2)/2`` for all when
    every alpha is equal (the reference's ``np.interp`` gives ``s2``); ``tb_sqrt``:
    ``n·√a / Σ√a``; ``tb_log2``: ``n·log2 a / Σ log2 a``; ``tb_step``: rank ``r`` (0 = smallest
    alpha, ties in layer order) gets ``s1 + (s2 - s1)·r/n``.

    Example::

        >>> lr_factors([2.0, 3.0, 4.0])
        [0.5, 1.0, 1.5]
    """
    validate_mapping_args(method, lr_min_ratio, lr_max_ratio)
    n = len(alphas)
    if n == 0:
        return []
    s1, s2 = lr_min_ratio, lr_max_ratio
    if method == "tb_linear_map":
        low, high = min(alphas), max(alphas)
        if high == low:
            return [(s1 + s2) / 2] * n
        return [s1 + (s2 - s1) * (a - low) / (high - low) for a in alphas]
    if method == "tb_sqrt":
        roots = [math.sqrt(a) for a in alphas]
        return [n * r / sum(roots) for r in roots]
    if method == "tb_log2":
        logs = [math.log2(a) for a in alphas]
        return [n * v / sum(logs) for v in logs]
    order = sorted(range(n), key=lambda i: (alphas[i], i))
    factors = [0.0] * n
    for rank, i in enumerate(order):
        factors[i] = s1 + (s2 - s1) * rank / n
    return factors


def tuned_units(
    report: FARMSReport,
    layer_params: dict[str, list[torch.Tensor]],
    remove_first_layer: bool = True,
    remove_last_layer: bool = True,
) -> list[list[str]]:
    """Fitted layers in model order (embeddings never), grouped by the parameter they live in
    (the q/k/v of one MHA in-projection are one unit), minus the first and the last unit.

    Layers too small to judge (``status="too_small"``, e.g. a 2-class head) keep their place in that
    order, so that the layer before such a head is not taken for the last one, but are not tuned:
    their learning rate keeps factor 1, as the first and last layers' does.
    """
    units: dict[int, list[str]] = {}
    small: set[int] = set()
    for s in report.layers:
        if s.status in ("ok", "too_small") and s.type != "Embedding" and layer_params.get(s.name):
            unit = id(layer_params[s.name][0])
            units.setdefault(unit, []).append(s.name)
            if s.status == "too_small":
                small.add(unit)
    ordered = list(units.items())
    start = 1 if remove_first_layer else 0
    stop = len(ordered) - 1 if remove_last_layer else len(ordered)
    return [names for unit, names in ordered[start:max(start, stop)] if unit not in small]


def layer_parameters(model: nn.Module, pair_norm_layers: bool = True, **discovery: object) -> dict[str, list[torch.Tensor]]:
    """For every analysable layer name, the parameters its learning-rate factor applies to.

    The weight and bias of the layer's module (an MHA in-projection: ``in_proj_weight`` and
    ``in_proj_bias``, shared by its q/k/v matrices; a fused q/k/v projection: its one weight, so
    q, k and v are one unit), plus, with ``pair_norm_layers``, the BatchNorm that directly follows
    it with matching features or whose name is the layer's with ``bn`` for ``conv``. A PEFT LoRA
    layer's factor applies to its trainable ``lora_A``/``lora_B`` parameters (the base weight is
    frozen); a quantized layer has none. ``discovery`` are
    :func:`~farms_lightning.models.layers.discover_layers` options.
    """
    layers = discover_layers(model, **discovery)  # type: ignore[arg-type]
    modules = dict(model.named_modules())
    by_weight = {id(layer.weight): layer for layer in layers}
    params: dict[str, list[torch.Tensor]] = {layer.name: _own_parameters(layer) for layer in layers}
    if pair_norm_layers:
        for norm_name, norm_layer in _norm_pairs(model, by_weight).items():
            if params[norm_layer]:
                params[norm_layer].extend(p for p in modules[norm_name].parameters(recurse=False))
    return params


def _own_parameters(layer: LayerMatrix) -> list[torch.Tensor]:
    module = layer.module
    if layer.origin == "lora":
        return lora_trainable_parameters(module)  # type: ignore[arg-type]
    if layer.origin == "quantized" or module is None:
        return []
    if layer.origin == "parametrized":  # every original (weight_norm: the direction and the magnitude)
        originals = [p for p in module.parametrizations["weight"].parameters()]  # type: ignore[index, union-attr]
        first = [p for p in originals if p is layer.weight]
        bias = getattr(module, "bias", None)
        return first + [p for p in originals if p is not layer.weight] + ([bias] if isinstance(bias, nn.Parameter) else [])
    if isinstance(module, nn.MultiheadAttention):
        bias = module.in_proj_bias if module.in_proj_weight is layer.weight else None
    else:
        bias = getattr(module, "bias", None)
    return [layer.weight] + ([bias] if isinstance(bias, nn.Parameter) else [])


def _norm_pairs(model: nn.Module, by_weight: dict[int, LayerMatrix]) -> dict[str, str]:
    """BatchNorm module name -> the name of the analysed layer it belongs to."""
    pairs: dict[str, str] = {}
    names = {layer.name for layer in by_weight.values()}
    previous: tuple[LayerMatrix, int] | None = None
    for name, module in model.named_modules():
        weight = stored_weight(module)
        layer = by_weight.get(id(weight)) if weight is not None else None
        if layer is not None and weight is not None:
            previous = (layer, weight.shape[0])
        elif isinstance(module, NORM_TYPES):
            by_name = name.replace("bn", "conv")
            if by_name != name and by_name in names:
                pairs[name] = by_name
            elif previous is not None and module.num_features == previous[1]:
                pairs[name] = previous[0].name
            previous = None
    return pairs


def parameter_factors(
    report: FARMSReport,
    layer_params: dict[str, list[torch.Tensor]],
    method: str = "tb_linear_map",
    lr_min_ratio: float = 0.5,
    lr_max_ratio: float = 1.5,
    remove_first_layer: bool = True,
    remove_last_layer: bool = True,
) -> tuple[dict[str, float], dict[int, float]]:
    """Factors by tuned layer name and by parameter ``id`` (matrices sharing a parameter: mean alpha)."""
    units = tuned_units(report, layer_params, remove_first_layer, remove_last_layer)
    # A parameter holding several matrices (MHA q/k/v) uses the mean of their alphas.
    alphas = [statistics.fmean(report[n].alpha for n in names) for names in units]  # type: ignore[misc]
    unit_factors = lr_factors(alphas, method, lr_min_ratio, lr_max_ratio)
    layer_factor = {n: f for names, f in zip(units, unit_factors) for n in names}
    param_factor = {id(p): layer_factor[name] for name in layer_factor for p in layer_params[name]}
    return layer_factor, param_factor


def farms_param_groups(
    model: nn.Module,
    weight_decay: float | None = None,
    no_decay_on_bias_and_norm: bool = False,
    pair_norm_layers: bool = True,
    **options: Any,
) -> list[dict[str, Any]]:
    """Optimizer param groups with one group per analysable layer, for ``configure_optimizers``.

    Each layer's group (``"name"``: the layer's name; an MHA in-projection is one group) holds its
    weight, bias and paired BatchNorm; everything else goes to a last group named ``"other"``. With
    ``no_decay_on_bias_and_norm`` every group is split in two, the 1-D parameters getting
    ``weight_decay=0`` (``"<name>.no_decay"``). ``options`` (``lr``, ``momentum``, ...) are copied
    into every group. :class:`~farms_lightning.FARMSLRBalancer` finds the groups by parameter
    identity, so their order does not matter.

    Example::

        >>> def configure_optimizers(self):
        ...     groups = farms_param_groups(self, weight_decay=5e-4, no_decay_on_bias_and_norm=True)
        ...     return torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    """
    base = dict(options)
    if weight_decay is not None:
        base["weight_decay"] = weight_decay
    groups: list[dict[str, Any]] = []
    seen: set[int] = set()

    def add(name: str, params: list[torch.Tensor]) -> None:
        params = [p for p in params if id(p) not in seen]
        seen.update(id(p) for p in params)
        if not no_decay_on_bias_and_norm:
            if params:
                groups.append({**base, "name": name, "params": params})
            return
        decay = [p for p in params if p.dim() > 1]
        no_decay = [p for p in params if p.dim() <= 1]
        if decay:
            groups.append({**base, "name": name, "params": decay})
        if no_decay:
            groups.append({**base, "name": f"{name}.no_decay", "params": no_decay, "weight_decay": 0.0})

    layers = {layer.name: layer for layer in discover_layers(model, layer_types=LAYER_TYPES)}
    for name, params in layer_parameters(model, pair_norm_layers, layer_types=LAYER_TYPES).items():
        layer = layers[name]
        add(name.rsplit(".", 1)[0] if layer.split is not None else name, params)
    add("other", list(model.parameters()))
    return groups
