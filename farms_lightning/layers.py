"""Layer discovery: which weight matrices of a model are analysed, and under which stable names."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence, Union

import torch
from torch import nn
from torch.nn.parameter import is_lazy

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
    """One analysable weight matrix: where it lives and how to read it (never a stored copy)."""

    name: str
    module_type: str
    kind: str
    weight: torch.Tensor
    rows: slice | None = None
    transposed: bool = False

    @property
    def is_conv(self) -> bool:
        return self.kind in ("Conv1d", "Conv2d", "Conv3d")

    @property
    def is_lazy(self) -> bool:
        return is_lazy(self.weight)

    @property
    def shape(self) -> tuple[int, ...]:
        """The stored shape (a split in-projection matrix: its own ``(E, E)`` slice)."""
        if self.is_lazy:
            return ()
        return tuple(self.matrix().shape)

    @property
    def num_params(self) -> int:
        return 0 if self.is_lazy else self.matrix().numel()

    def matrix(self) -> torch.Tensor:
        """The weight as analysed: ``(out, in)`` for matrices, the stored tensor for convolutions."""
        w = self.weight.detach()
        if self.rows is not None:
            w = w[self.rows]
        return w

    def oriented(self) -> torch.Tensor:
        """Like :meth:`matrix`, with GPT-2 ``Conv1D`` weights turned from ``(in, out)`` to ``(out, in)``."""
        return self.matrix().T if self.transposed else self.matrix()

    def identity(self) -> tuple:
        """A key equal for two layers reading the same memory (tied or shared weights)."""
        w = self.weight
        if self.is_lazy or w.is_meta:
            base: tuple = ("object", id(w))
        else:
            base = (w.device, w.untyped_storage().data_ptr(), w.storage_offset(), tuple(w.shape), w.stride())
        return base + ((self.rows.start, self.rows.stop) if self.rows is not None else (None,),)


def clean_name(raw: str) -> str:
    """The user's own module name: wrapper components and leading DDP ``module.`` removed."""
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


def layer_kind(module: nn.Module) -> str | None:
    """The kind of a module whose weights can be analysed, or ``None``."""
    for cls in (nn.MultiheadAttention, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.Embedding):
        if isinstance(module, cls):
            return cls.__name__
    # GPT-2 style Conv1D: weight stored (in, out) with `nf` output features; no transformers import.
    weight = getattr(module, "weight", None)
    nf = getattr(module, "nf", None)
    if isinstance(weight, torch.Tensor) and isinstance(nf, int) and weight.dim() == 2 and weight.shape[1] == nf:
        return "Conv1D"
    return None


def _module_matrices(name: str, module: nn.Module, kind: str) -> Iterator[LayerMatrix]:
    module_type = type(module).__name__
    if kind == "MultiheadAttention":
        assert isinstance(module, nn.MultiheadAttention)
        if module._qkv_same_embed_dim:
            e = module.embed_dim
            for i, part in enumerate("qkv"):
                yield LayerMatrix(_join(name, f"in_proj.{part}"), module_type, kind, module.in_proj_weight,
                                  rows=slice(i * e, (i + 1) * e))
        else:
            for part in "qkv":
                yield LayerMatrix(_join(name, f"{part}_proj"), module_type, kind, getattr(module, f"{part}_proj_weight"))
        return
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        yield LayerMatrix(name, module_type, kind, weight, transposed=kind == "Conv1D")


def _join(name: str, suffix: str) -> str:
    return f"{name}.{suffix}" if name else suffix


def discover_layers(
    model: nn.Module,
    layer_types: LayerTypes = None,
    include: Patterns = None,
    exclude: Patterns = None,
) -> list[LayerMatrix]:
    """Weight matrices of ``model`` in ``named_modules()`` order, filtered by kind and name globs.

    A module registered under two names appears twice (the analysis reports the second as sharing
    weights). ``include``/``exclude`` are ``fnmatch`` globs on the layer names.
    """
    kinds = resolve_layer_types(layer_types)
    includes, excludes = resolve_patterns(include, "include"), resolve_patterns(exclude, "exclude")
    found = []
    for raw_name, module in model.named_modules(remove_duplicate=False):
        kind = layer_kind(module)
        if kind is None or kind not in kinds:
            continue
        for layer in _module_matrices(clean_name(raw_name), module, kind):
            if _selected(layer.name, includes, excludes):
                found.append(layer)
    return found


def _selected(name: str, includes: Iterable[str], excludes: Iterable[str]) -> bool:
    if includes and not any(fnmatch.fnmatchcase(name, p) for p in includes):
        return False
    return not any(fnmatch.fnmatchcase(name, p) for p in excludes)
