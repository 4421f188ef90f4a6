"""Layer discovery: which weight matrices of a model are analysed, and under which stable names."""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from dataclasses import dataclass
from typing import Callable, Collection, Iterable, Iterator, Sequence, Union

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from farms_lightning.models.layer_sources import (
    LORA_MODES,
    fused_qkv_split,
    is_lora_layer,
    is_parametrized,
    lora_adapters,
    lora_base,
    lora_reader,
    lora_variant_reason,
    modules_to_save_choice,
    parametrized_original,
    parametrized_reader,
    peft_prefixes,
    quantized_kind,
    quantized_reader,
)

#: Layer kinds that can be selected with ``layer_types`` (module classes with these names also work).
LAYER_TYPES = ("Linear", "Conv1d", "Conv2d", "Conv3d", "MultiheadAttention", "Conv1D", "Embedding")
#: The paper analyses Linear and conv layers; embeddings are opt-in.
DEFAULT_LAYER_TYPES = ("Linear", "Conv1d", "Conv2d", "Conv3d", "MultiheadAttention", "Conv1D")
#: Name components added by wrappers (torch.compile, FSDP, activation checkpointing).
WRAPPER_COMPONENTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})

LayerTypes = Union[str, type, Sequence[Union[str, type]], None]
Patterns = Union[str, Sequence[str], None]


@dataclass(frozen=True)
class LayerMatrix:
    """One analysable weight matrix: where it lives and how to read it (never a stored copy).

    ``weight`` is the stored tensor that identifies the layer (a LoRA layer's base weight, a
    parametrization's original, a quantized module's packed weight); ``reader``, when set, gives
    the value analysed instead (effective LoRA weight, parametrized or dequantized weight), and
    ``origin`` names it (``"lora"``, ``"parametrized"``, ``"quantized"``; ``""`` for plain weights).
    ``split = (part, heads)`` selects q, k or v (part 0, 1, 2) of a fused projection whose rows are
    ``(heads, 3, head_dim)`` (``heads = 1``: contiguous thirds). ``groups`` is a conv's group count.
    ``skip_reason`` is set when discovery already knows the layer cannot be analysed; ``note`` is a
    remark on how an analysable layer is read (it becomes the ``reason`` of a fitted row).
    """

    name: str
    module_type: str
    kind: str
    weight: torch.Tensor
    transposed: bool = False
    split: tuple[int, int] | None = None
    groups: int = 1
    module: nn.Module | None = None
    reader: Callable[[], torch.Tensor] | None = None
    origin: str = ""
    skip_reason: str = ""
    note: str = ""

    @property
    def is_conv(self) -> bool:
        return self.kind in ("Conv1d", "Conv2d", "Conv3d")

    @property
    def is_lazy(self) -> bool:
        return is_lazy(self.weight)

    @property
    def shape(self) -> tuple[int, ...]:
        """The stored shape (a split q/k/v matrix: its own part, in the stored orientation)."""
        if self.is_lazy:
            return ()
        shape = list(self.weight.shape)
        if self.split is not None:
            shape[1 if self.transposed else 0] //= 3
        return tuple(shape)

    @property
    def num_params(self) -> int:
        return 0 if self.is_lazy else math.prod(self.shape)

    def value(self) -> torch.Tensor:
        """The weight as analysed, in the stored layout: read through ``reader``, densified if sparse."""
        w = self.reader() if self.reader is not None else self.weight.detach()
        if w.layout != torch.strided:
            w = w.to_dense()
        return w

    def view_of(self, tensor: torch.Tensor) -> torch.Tensor:
        """This layer's part of a tensor of the stored shape, ``(out, in)``-oriented, as a view.

        A head-interleaved q/k/v part is ``(heads, head_dim, in)``; everything else is 2-D (or the
        stored conv tensor). Pruning writes through this view.
        """
        t = tensor.T if self.transposed else tensor
        if self.split is None:
            return t
        part, heads = self.split
        v = t.unflatten(0, (heads, 3, -1))[:, part]
        return v[0] if heads == 1 else v

    def oriented(self) -> torch.Tensor:
        """The matrix as analysed: ``(out, in)`` (GPT-2 ``Conv1D`` transposed, q/k/v parts cut out), the
        stored tensor for convolutions."""
        v = self.view_of(self.value())
        return v.flatten(0, 1) if v.dim() == 3 and self.split is not None else v

    def matrix(self) -> torch.Tensor:
        """Alias of :meth:`oriented` (kept for callers of earlier versions)."""
        return self.oriented()

    def write_error(self) -> str:
        """Why this layer's weights cannot be changed in place through :meth:`view_of`, or ``""``."""
        if self.origin == "lora":
            return (f"layer {self.name!r} is wrapped by a PEFT LoRA adapter: call merge_and_unload() first, then "
                    "prune the merged model")
        if self.origin == "parametrized":
            return (f"layer {self.name!r} is parametrized: call torch.nn.utils.parametrize.remove_parametrizations() "
                    "first")
        if self.origin == "quantized":
            return f"layer {self.name!r} holds quantized weights, which cannot be pruned in place"
        if self.weight.layout != torch.strided:
            return f"layer {self.name!r} has sparse weights ({self.weight.layout}): prune a dense copy"
        if self.weight.is_floating_point() and self.weight.dtype.itemsize == 1:
            return f"layer {self.name!r} has {self.weight.dtype} weights, which cannot be pruned in place"
        return ""

    def identity(self) -> tuple:
        """A key equal for two layers reading the same memory (tied or shared weights)."""
        w = self.weight
        if self.origin == "quantized":
            base: tuple = ("module", id(self.module))
        elif self.is_lazy or w.is_meta or w.layout != torch.strided:
            base = ("object", id(w))
        else:
            base = (w.device, w.untyped_storage().data_ptr(), w.storage_offset(), tuple(w.shape), w.stride())
        return base + (self.split, self.origin)


def clean_name(raw: str, prefixes: dict[str, str] | None = None) -> str:
    """The user's own module name: PEFT prefixes collapsed (``prefixes``, from
    :func:`~farms_lightning.models.layer_sources.peft_prefixes`), wrapper components and a leading DDP
    ``module.`` removed."""
    ordered = sorted(prefixes or {}, key=len, reverse=True)
    for _ in range(len(ordered)):  # nested wrappers: collapse the innermost first, then again
        prefix = next((p for p in ordered if raw == p or raw.startswith(p + ".")), None)
        if prefix is None:
            break
        raw = (prefixes or {})[prefix] + raw[len(prefix):]
    parts = [p for p in raw.split(".") if p and p not in WRAPPER_COMPONENTS]
    while parts and parts[0] == "module":
        parts.pop(0)
    return ".".join(parts)


def resolve_layer_types(layer_types: LayerTypes) -> frozenset[str]:
    """Validate ``layer_types`` (names or classes) and return the set of kind names."""
    if layer_types is None:
        return frozenset(DEFAULT_LAYER_TYPES)
    items = [layer_types] if isinstance(layer_types, (str, type)) else list(layer_types)
    kinds = set()
    for item in items:
        name = item.__name__ if isinstance(item, type) else item
        if name not in LAYER_TYPES:
            raise ValueError(f"`layer_types` entries must be among {LAYER_TYPES}, got {item!r}")
        kinds.add(name)
    return frozenset(kinds)


def resolve_patterns(patterns: Patterns, argument: str) -> tuple[str, ...]:
    if patterns is None:
        return ()
    items = (patterns,) if isinstance(patterns, str) else tuple(patterns)
    if not all(isinstance(p, str) for p in items):
        raise ValueError(f"`{argument}` must be a glob string or a list of them, got {patterns!r}")
    return items


def stored_weight(module: nn.Module) -> torch.Tensor | None:
    """``module``'s stored weight tensor, read without running a parametrization (its original)."""
    if is_parametrized(module):
        return parametrized_original(module)
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, torch.Tensor) else None


def layer_kind(module: nn.Module) -> str | None:
    """The kind of a module whose weights can be analysed, or ``None``."""
    for cls in (nn.MultiheadAttention, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.Embedding):
        if isinstance(module, cls):
            return cls.__name__
    quantized = quantized_kind(module)
    if quantized is not None:
        return quantized
    # GPT-2 style Conv1D: weight stored (in, out) with `nf` output features; no transformers import.
    weight = stored_weight(module)
    nf = getattr(module, "nf", None)
    if isinstance(weight, torch.Tensor) and isinstance(nf, int) and weight.dim() == 2 and weight.shape[1] == nf:
        return "Conv1D"
    return None


def _module_matrices(name: str, module: nn.Module, kind: str, parent: nn.Module | None, split_qkv: bool,
                     lora: str) -> Iterator[LayerMatrix]:
    module_type = type(module).__name__
    if kind == "MultiheadAttention":
        assert isinstance(module, nn.MultiheadAttention)
        if module._qkv_same_embed_dim:
            whole = LayerMatrix(_join(name, "in_proj"), module_type, kind, module.in_proj_weight, module=module)
            if not split_qkv:
                yield whole
                return
            for i, part in enumerate("qkv"):
                yield dataclasses.replace(whole, name=_join(name, f"in_proj.{part}"), split=(i, 1))
        else:
            for part in "qkv":
                yield LayerMatrix(_join(name, f"{part}_proj"), module_type, kind, getattr(module, f"{part}_proj_weight"),
                                  module=module)
        return
    owner = module
    layer: LayerMatrix | None = None
    if is_lora_layer(module):
        owner = lora_base(module)
        module_type = type(owner).__name__
        weight = stored_weight(owner)
        if weight is None:
            return
        reason = lora_variant_reason(module) or ("" if lora_adapters(module) or lora == "merged"
                                                 else "no active LoRA adapter (lora='delta')")
        layer = LayerMatrix(name, module_type, kind, weight, module=module, reader=lora_reader(module, lora),
                            origin="lora", skip_reason=reason)
    elif quantized_kind(module) is not None:
        layer = LayerMatrix(name, module_type, kind, module.weight(), module=module,  # type: ignore[operator]
                            reader=quantized_reader(module), origin="quantized")
    elif is_parametrized(module):
        layer = LayerMatrix(name, module_type, kind, parametrized_original(module), module=module,
                            reader=parametrized_reader(module), origin="parametrized")
    else:
        weight = stored_weight(module)
        if weight is None:
            return
        # State-dict shells of LoRA adapter tensors carry their reason (see state_dict.py).
        reason = getattr(module, "farms_skip_reason", "")
        layer = LayerMatrix(name, module_type, kind, weight, module=module, skip_reason=reason,
                            origin="lora" if reason else "")
    transposed = kind == "Conv1D"
    groups = getattr(owner, "groups", 1) if layer.is_conv else 1
    layer = dataclasses.replace(layer, transposed=transposed, groups=groups if isinstance(groups, int) else 1)
    if split_qkv and kind in ("Linear", "Conv1D") and not layer.is_lazy and layer.weight.dim() == 2:
        rows, cols = layer.weight.shape[::-1] if transposed else layer.weight.shape
        fused = fused_qkv_split(name, module, parent, rows, cols)
        if fused is not None:
            heads, reason = fused
            if heads == 0:
                yield dataclasses.replace(layer, note=reason)
                return
            for i, part in enumerate("qkv"):
                yield dataclasses.replace(layer, name=_join(name, part), split=(i, heads))
            return
    yield layer


def _join(name: str, suffix: str) -> str:
    return f"{name}.{suffix}" if name else suffix


def discover_layers(
    model: nn.Module,
    layer_types: LayerTypes = None,
    include: Patterns = None,
    exclude: Patterns = None,
    *,
    split_qkv: bool = True,
    lora: str = "merged",
) -> list[LayerMatrix]:
    """Weight matrices of ``model`` in ``named_modules()`` order, filtered by kind and name globs.

    A module registered under two names appears twice (the analysis reports the second as sharing
    weights). ``include``/``exclude`` are ``fnmatch`` globs on the layer names. Fused q/k/v
    projections are split into ``<name>.q|k|v`` unless ``split_qkv=False``. A PEFT LoRA layer is
    one matrix under the wrapped layer's own name: its effective weight (``lora="merged"``) or
    the adapters' update (``lora="delta"``). A Linear sharing its weight with an embedding that
    is not analysed itself is skipped with the reason ``shares weights with <embedding>``.

    Raises:
        ValueError: a bad ``layer_types``, ``include``/``exclude``, ``split_qkv`` or ``lora``.
    """
    kinds = resolve_layer_types(layer_types)
    includes, excludes = resolve_patterns(include, "include"), resolve_patterns(exclude, "exclude")
    validate_discovery_args(split_qkv, lora)
    prefixes = peft_prefixes(model)
    parents: dict[str, nn.Module] = {}
    ignored: list[str] = []
    embeddings: dict[tuple, str] = {}
    found = []
    for raw_name, module in model.named_modules(remove_duplicate=False):
        parents[raw_name] = module
        if any(raw_name.startswith(p) if p.endswith(".") else raw_name == p for p in ignored):
            continue  # inside a LoRA layer (read through it), or a PEFT copy the forward pass does not use
        choice = modules_to_save_choice(module)
        if choice is not None:  # PEFT modules_to_save: the copy in use, under the wrapper's name
            used, unused = choice
            prefixes[_join(raw_name, used)] = raw_name
            ignored.extend(_join(raw_name, name) + "." for name in unused)
            ignored.extend(_join(raw_name, name) for name in unused)
            continue
        lora_layer = is_lora_layer(module)
        if lora_layer:
            ignored.append(raw_name + ".")
        kind = layer_kind(lora_base(module) if lora_layer else module)
        table = stored_weight(module) if kind == "Embedding" and not lora_layer else None
        if table is not None:  # for heads tied to it (a parametrized table is not evaluated)
            embeddings.setdefault(LayerMatrix("", "", "Embedding", table).identity(), clean_name(raw_name, prefixes))
        if kind is None or kind not in kinds:
            continue
        parent = parents.get(raw_name.rsplit(".", 1)[0] if "." in raw_name else "")
        for layer in _module_matrices(clean_name(raw_name, prefixes), module, kind, parent, split_qkv, lora):
            if _selected(layer.name, includes, excludes):
                found.append(layer)
    analysed = {layer.identity() for layer in found if layer.kind == "Embedding"}
    return [dataclasses.replace(layer, skip_reason=f"shares weights with {embeddings[key]}")
            if (key := layer.identity()) in embeddings and key not in analysed and layer.kind != "Embedding"
            and not layer.skip_reason else layer for layer in found]


def validate_discovery_args(split_qkv: bool, lora: str) -> None:
    if not isinstance(split_qkv, bool):
        raise ValueError(f"`split_qkv` must be True or False, got {split_qkv!r}")
    if lora not in LORA_MODES:
        raise ValueError(f"`lora` must be one of {LORA_MODES}, got {lora!r}")


def _selected(name: str, includes: Iterable[str], excludes: Iterable[str]) -> bool:
    if includes and not any(fnmatch.fnmatchcase(name, p) for p in includes):
        return False
    return not any(fnmatch.fnmatchcase(name, p) for p in excludes)


def renamed_layers(names: Iterable[str], current: Collection[str]) -> dict[str, list[str]]:
    """Names from earlier versions that no longer name a layer -> the layers they became.

    Fused q/k/v projections are now split (``h.0.attn.c_attn`` -> ``h.0.attn.c_attn.q|k|v``) and
    PEFT names lost ``base_model.model.`` and ``.base_layer``. Names that match nothing either
    way are left out.
    """
    out: dict[str, list[str]] = {}
    for name in names:
        if name in current:
            continue
        parts = [p for p in name.split(".") if p != "base_layer"]
        if parts[:2] == ["base_model", "model"]:
            parts = parts[2:]
        stripped = ".".join(parts)
        split = [_join(stripped, p) for p in "qkv"]
        if all(p in current for p in split):
            out[name] = split
        elif stripped != name and stripped in current:
            out[name] = [stripped]
    return out
