"""The second streaming pass of ``prune``: read, prune and write one shard at a time, ranks in parallel.

A safetensors file is written tensor by tensor (each read by its offset, pruned, written, dropped); a
torch file is memory-mapped, its matrices pruned in place (copy-on-write: the input is never
modified) and the container written whole. Pruning is :func:`farms_lightning.policies.pruners.prune_model` on
the shard's own tensors, so the result is that of pruning the whole model in memory.

A folder is written into one temporary folder beside the target, named by rank 0; each rank writes
its shards (and rank 0 the other files: config, tokenizer, index), all ranks agree on success
(:func:`~farms_lightning.cli.cli_distributed.together`), and only then does rank 0 rename it into place.
On a failure anywhere the temporary folder is removed: nothing is left behind.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import torch

from farms_lightning.cli.cli_distributed import broadcast, gather, together
from farms_lightning.cli.streaming import Checkpoint, release_freed_memory
from farms_lightning.cli.weight_files import _save_torch, read_torch
from farms_lightning.engine.distributed import distributed_context
from farms_lightning.files.safe_copy import copy_into
from farms_lightning.files.safe_io import (
    EXIT_INPUT,
    TEMP_PREFIX,
    CLIError,
    atomic_write,
    commit_folder,
    discard,
    input_errors,
    new_folder_beside,
    shown,
)
from farms_lightning.files.safetensors_file import SafetensorsFile, save_safetensors
from farms_lightning.models.state_dict import model_from_state_dict
from farms_lightning.policies.pruners import prune_model, select_layers


def prune_stream(checkpoint: Checkpoint, sparsities: dict[str, float], out: Path) -> dict[str, float]:
    """Write the pruned copy of ``checkpoint`` to ``out``; returns ``{layer name: achieved sparsity}``.

    ``sparsities`` names the layers to prune, tied copies left out (pruning the owner prunes them).
    Every rank returns the same result.
    """
    by_shard: dict[str, dict[str, float]] = {}
    for name, sparsity in sparsities.items():
        key = checkpoint.stored_key(checkpoint.keys[name])
        by_shard.setdefault(checkpoint.shard_of[key], {})[name] = sparsity
    rank, world_size = distributed_context()
    if checkpoint.weights.kind != "folder":
        shard = checkpoint.shards()[0]
        achieved = together(lambda: _write_file(checkpoint, shard, by_shard.get(shard, {}), out) if rank == 0 else {})
        return broadcast(achieved)
    mine = [s for s, r in zip(checkpoint.shards(), _assign(checkpoint)) if r == rank]
    made: list[Path] = []  # rank 0's temporary folder, known to the cleanup from the moment it exists

    def make_folder() -> Path | None:
        if rank == 0:
            made.append(new_folder_beside(out))
        return made[0] if made else None

    try:
        tmp = broadcast(together(make_folder))

        def write_mine() -> dict[str, float]:
            if rank == 0:
                _copy_others(checkpoint, tmp, out)
            done: dict[str, float] = {}
            for shard in mine:
                done.update(_write_file(checkpoint, shard, by_shard.get(shard, {}), tmp / shard, label=out / shard))
                release_freed_memory()
            return done

        parts = gather(together(write_mine))
        together(lambda: commit_folder(tmp, out) if rank == 0 else None)
    except BaseException:  # a failure on any rank, SIGINT or SIGTERM (cli_distributed.Interrupted)
        if made:  # rank 0; every rank has stopped writing: together() ends behind a barrier
            discard(made[0])
        raise
    merged = {name: value for part in parts for name, value in part.items()}
    return {name: merged[name] for name in sparsities if name in merged}


def check_prunable(checkpoint: Checkpoint, sparsities: dict[str, float]) -> None:
    """Raise ``ValueError`` (as :func:`prune_model` would, before anything is written) for a layer
    that cannot be pruned in place, e.g. LoRA adapter tensors."""
    select_layers(model_from_state_dict(checkpoint.weights.state_dict), sparsities, split_qkv=checkpoint.split_qkv)


def _assign(checkpoint: Checkpoint) -> list[int]:
    """The rank writing each shard: largest first, each to the least loaded rank (by file size)."""
    _, world_size = distributed_context()
    sizes = []
    for shard in checkpoint.shards():
        with input_errors(checkpoint.shard_path(shard)):
            sizes.append(os.path.getsize(checkpoint.shard_path(shard)))
    load, owner = [0] * world_size, [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owner[i], load[rank] = rank, load[rank] + sizes[i]
    return owner


def _write_file(checkpoint: Checkpoint, shard: str, sparsities: dict[str, float], target: Path,
                label: Path | None = None) -> dict[str, float]:
    """Prune one file's matrices and write it to ``target`` atomically."""
    source = checkpoint.shard_path(shard)
    names: dict[str, list[str]] = {}  # stored key -> its layers (q, k and v of a fused tensor)
    for name in sparsities:
        names.setdefault(checkpoint.stored_key(checkpoint.keys[name]), []).append(name)
    achieved: dict[str, float] = {}
    if checkpoint.is_safetensors(shard):
        keys, metadata = checkpoint.weights.files[shard]
        specs = {key: checkpoint.weights.state_dict[key] for key in keys}
        with input_errors(source), _changed(source):
            file = SafetensorsFile(source)
        with file:
            # Dtypes the analysis cannot use (C64, F4, ...) are copied as their stored bytes, unpruned.
            with input_errors(source), _changed(source):
                raw = {key: file.stored(key) for key in keys if key in checkpoint.weights.unusable}

            def load(key: str) -> torch.Tensor:
                with input_errors(source), _changed(source):
                    tensor = file.get_raw(key) if key in raw else file.get_tensor(key)
                    if key not in raw and (tensor.dtype != specs[key].dtype or tensor.shape != specs[key].shape):
                        raise ValueError(f"tensor {key!r} is now {tensor.dtype} {tuple(tensor.shape)}")
                if key in names and key not in raw:
                    parts = names[key]
                    # Under the layers' own key (a tied alias names the stored tensor differently).
                    shell = model_from_state_dict({checkpoint.keys[parts[0]]: tensor})
                    achieved.update(prune_model(shell, {name: sparsities[name] for name in parts},
                                                split_qkv=checkpoint.split_qkv))
                    release_freed_memory()  # the sort's buffers
                return tensor

            atomic_write(target, lambda tmp: save_safetensors(specs, tmp, metadata, load=load, raw=raw),
                         label=label)
        return achieved
    tensors, container = read_torch(source, checkpoint.trust_pickle, mmap=True)
    for key in names:  # the file may have been replaced since the first pass read it
        with _changed(source):
            expected, found = checkpoint.weights.state_dict[key], tensors[key]
            if found.dtype != expected.dtype or found.shape != expected.shape:
                raise ValueError(f"tensor {key!r} is now {found.dtype} {tuple(found.shape)}")
    # The shard's own tensors: tied keys share memory here, and the pruner prunes each memory once.
    # Pruned in place, copy-on-write: the shard's pruned matrices are what this costs in memory.
    model = model_from_state_dict(tensors)
    for name, sparsity in sparsities.items():
        achieved.update(prune_model(model, {name: sparsity}, split_qkv=checkpoint.split_qkv))
        release_freed_memory()  # the sort's buffers, before the next matrix
    atomic_write(target, lambda tmp: _save_torch(container, tmp), label=label)
    return achieved


def _copy_others(checkpoint: Checkpoint, folder: Path, out: Path) -> None:
    """Config, tokenizer, index, sub-folders: copied, so the pruned folder is usable as it is."""
    path = checkpoint.path
    with input_errors(path):
        others = sorted(p for p in path.iterdir()  # a killed run's temporary files are not copied
                        if p.name not in checkpoint.weights.files and not p.name.startswith(TEMP_PREFIX))
    for other in others:
        copy_into(other, folder / other.name, label=out / other.name)


@contextlib.contextmanager
def _changed(source: Path) -> Iterator[None]:
    """The reader's ``ValueError`` in the second pass: the file changed since the first (exit 3)."""
    try:
        yield
    except (ValueError, KeyError) as error:
        if isinstance(error, KeyError):
            error = ValueError(f"the tensor {error.args[0]!r} is gone")
        raise CLIError(f"{shown(source)} changed while it was being pruned (truncated or replaced since it was "
                       f"analysed?): {error}; nothing was written", EXIT_INPUT) from None
