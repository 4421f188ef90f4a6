"""Analysis split across the ranks of a distributed job, gathered into one identical report."""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from farms_lightning.engine.analysis import analyze_layers
from farms_lightning.engine.report import FARMSReport, LayerStats
from farms_lightning.models.layers import LayerMatrix, discover_layers


def assign_layers(layers: list[LayerMatrix], world_size: int) -> list[int]:
    """The rank that analyses each layer: largest layers first, each to the least loaded rank.

    Deterministic, so every rank computes the same assignment from the same model.
    """
    load = [0] * world_size
    owner = [0] * len(layers)
    for i in sorted(range(len(layers)), key=lambda i: (-layers[i].num_params, i)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owner[i] = rank
        load[rank] += layers[i].num_params
    return owner


def local_share(layers: list[LayerMatrix]) -> tuple[list[int], int]:
    """Positions of the layers this rank analyses, and the world size (all layers outside DDP)."""
    rank, world_size = distributed_context()
    return [i for i, r in enumerate(assign_layers(layers, world_size)) if r == rank], world_size


def distributed_context() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, or ``(0, 1)`` outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def analyze_distributed(
    model: nn.Module,
    settings: dict[str, Any],
    include: Any = None,
    exclude: Any = None,
    layer_types: Any = None,
    keep_eigenvalues: bool = False,
    frozen_cache: dict | None = None,
    split_qkv: bool = True,
    lora: str = "merged",
    whole_matrix: bool = True,
    warm_starts: dict[str, list[torch.Tensor]] | None = None,
) -> tuple[FARMSReport, float]:
    """Like :func:`~farms_lightning.analyze`, with the layers split across ranks.

    Every rank holds the full weights (DDP), analyses its share and takes part in one
    ``all_gather_object``; all ranks return the same report (and the same eigenvalues, when
    kept) and the same wall time: the slowest rank's analysis. Outside a process group this is a
    plain analysis. ``whole_matrix=False`` leaves the whole-matrix metrics out (``None``).
    ``warm_starts`` (a dict the caller keeps, see :func:`~farms_lightning.engine.analysis.analyze_layers`)
    is updated with the new ``lambda_max`` vectors of every layer, whichever rank analysed it: they
    travel in the same ``all_gather_object``, so every rank ends with the same dict.
    """
    start = time.perf_counter()
    layers = discover_layers(model, layer_types, include, exclude, split_qkv=split_qkv, lora=lora)
    mine, world_size = local_share(layers)
    starts = None if warm_starts is None else dict(warm_starts)
    stats, eigenvalues = analyze_layers(layers, settings, assigned=mine, keep_eigenvalues=keep_eigenvalues,
                                        frozen_cache=frozen_cache, whole_matrix=whole_matrix, warm_starts=starts)
    # The entries analyze_layers replaced (it puts in new lists, never changes a list in place).
    before = warm_starts or {}
    found = {name: v for name, v in (starts or {}).items() if before.get(name) is not v}
    seconds = time.perf_counter() - start
    if world_size > 1:
        local = ({i: stats[i] for i in mine}, eigenvalues, seconds, found)
        gathered: list[tuple[dict[int, LayerStats], dict, float, dict] | None] = [None] * world_size
        dist.all_gather_object(gathered, local)
        parts = [part for part in gathered if part]
        merged = {i: s for part in parts for i, s in part[0].items()}
        stats = [merged[i] for i in range(len(layers))]
        eigenvalues = {name: ev for part in parts for name, ev in part[1].items()}
        seconds = max(part[2] for part in parts)
        found = {name: v for part in parts for name, v in part[3].items()}
    if warm_starts is not None:
        warm_starts.update(found)
    return FARMSReport(stats, settings, eigenvalues), seconds  # type: ignore[arg-type]

