"""Warm starts of ``lambda_max`` kept between analyses: their form, checked where they are loaded.

A warm-start dict maps a layer name to one vector per whole matrix of the layer (one, or one per
conv group): the top singular vector the last analysis found, on the matrix's smaller side
(:func:`~farms_lightning.engine.matrix_metrics.lambda_max_with_vector`). The engine only ever *adds*
such a vector to its fixed random start, so a stale vector costs steps, never accuracy; a vector of
the wrong length is ignored. What a loader must refuse is a state that is not of this form at all.
"""

from __future__ import annotations

import math
from typing import Any

import torch

WarmStarts = dict[str, list[torch.Tensor]]

#: The longest vector accepted: the smaller side of a matrix (LLM hidden sizes are ~1e4 to 1e5).
MAX_VECTOR_LENGTH = 1 << 22
#: The most vectors of one layer (a depthwise convolution has one per channel).
MAX_VECTORS_PER_LAYER = 1 << 16
#: The most numbers in all vectors together (about 2 GiB in float64).
MAX_TOTAL_ELEMENTS = 1 << 28


def validate_warm_starts(value: Any, what: str = "the warm starts") -> WarmStarts:
    """``value`` checked to be a warm-start dict: ``{layer name: [1-D finite float tensor, ...]}``.

    Returns:
        A new dict of new lists holding each vector as a contiguous float64 CPU tensor (not copied
        where it already is one: the bits of a saved float64 vector are kept).

    Raises:
        ValueError: not a dict of str -> list of 1-D floating-point tensors, a non-finite value, or a
            size beyond :data:`MAX_VECTOR_LENGTH`, :data:`MAX_VECTORS_PER_LAYER` or
            :data:`MAX_TOTAL_ELEMENTS`. The message (one line) starts with ``what``.

    Example::

        >>> validate_warm_starts({"fc": [torch.ones(3)]}, "checkpoint warm starts")["fc"][0].dtype
        torch.float64
        >>> validate_warm_starts({"fc": torch.ones(3)}, "checkpoint warm starts")
        Traceback (most recent call last):
        ValueError: checkpoint warm starts: layer 'fc' holds a Tensor, not a list of vectors
    """
    if not isinstance(value, dict):
        raise ValueError(f"{what} is a {type(value).__name__}, not a dict of layer name -> vectors")
    out: WarmStarts = {}
    total = 0
    for name, vectors in value.items():
        if not isinstance(name, str):
            raise ValueError(f"{what}: layer name {name!r} is not a string")
        if not isinstance(vectors, (list, tuple)):
            raise ValueError(f"{what}: layer {name!r} holds a {type(vectors).__name__}, not a list of vectors")
        if len(vectors) > MAX_VECTORS_PER_LAYER:
            raise ValueError(f"{what}: layer {name!r} holds {len(vectors)} vectors (at most {MAX_VECTORS_PER_LAYER})")
        checked = []
        for k, vector in enumerate(vectors):
            where = f"{what}: layer {name!r} vector {k}"
            if not isinstance(vector, torch.Tensor) or vector.layout != torch.strided or vector.is_meta:
                raise ValueError(f"{where} is a {type(vector).__name__}, not a dense tensor")
            if vector.dim() != 1 or not vector.is_floating_point():
                raise ValueError(f"{where} is a {vector.dim()}-D {vector.dtype} tensor, not a 1-D float vector")
            if len(vector) > MAX_VECTOR_LENGTH:
                raise ValueError(f"{where} has {len(vector)} entries (at most {MAX_VECTOR_LENGTH})")
            total += len(vector)
            if total > MAX_TOTAL_ELEMENTS:
                raise ValueError(f"{what} hold more than {MAX_TOTAL_ELEMENTS} numbers")
            vector = vector.detach().to("cpu", torch.float64).contiguous()
            if len(vector) and not math.isfinite(float(vector.abs().max())):
                raise ValueError(f"{where} holds a non-finite value")
            checked.append(vector)
        out[name] = checked
    return out
