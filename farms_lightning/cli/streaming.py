"""Streaming analysis of weight files: one tensor (safetensors) or one file (torch) in memory at a time.

The checkpoint is first indexed without reading tensor data (:func:`open_checkpoint`: shapes and
dtypes as ``meta`` tensors, the layers chosen by the filters, which keys are tied). The analysis then
reads the tensors shard by shard — a safetensors tensor by its offset in the file, a torch file
memory-mapped (zip format) or loaded whole (legacy format), one file at a time — analyses them in
small groups on the analysis device and drops them. Peak memory is the largest tensor (safetensors) or
the largest shard (torch), plus one group of at most :data:`GROUP_BYTES` (or ``--max-memory``), plus
the solver's batches; never the whole model. The statistics are those of
:func:`farms_lightning.analyze` on the whole state dict, exactly (the same engine, per layer).

Tied weights are found by key (:attr:`Weights.ties`), never by memory address: the addresses of
freed tensors are reused, so two tensors read at different times may share one.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from farms_lightning.cli.cli_distributed import GROUP_BYTES, gather, together
from farms_lightning.cli.weight_files import Weights, _first_line, load_weights, read_torch
from farms_lightning.engine.analysis import analyze_layers
from farms_lightning.engine.distributed import distributed_context, local_share
from farms_lightning.engine.layer_plans import skipped
from farms_lightning.engine.report import FARMSReport, LayerStats
from farms_lightning.files.safe_io import EXIT_INPUT, CLIError, input_errors, shown
from farms_lightning.files.safetensors_file import SafetensorsFile
from farms_lightning.models.layers import LAYER_TYPES, LayerMatrix, discover_layers
from farms_lightning.models.state_dict import model_from_state_dict, module_path

__all__ = ["Checkpoint", "open_checkpoint", "analyze_checkpoint", "analyze_stream", "read_tensors", "GROUP_BYTES"]

EXIT_EMPTY = 4


@dataclass
class Checkpoint:
    """A weights file or sharded folder indexed for streaming: nothing but shapes is in memory."""

    weights: Weights  # lazy: meta tensors
    trust_pickle: bool
    #: name fused q/k/v projections as their parts (``--no-split-qkv`` turns it off)
    split_qkv: bool = True
    #: every analysable matrix (all kinds), discovery order, on meta tensors
    all_layers: list[LayerMatrix] = field(default_factory=list)
    #: layer name -> its key in the state dict
    keys: dict[str, str] = field(default_factory=dict)
    #: key -> the file (name in ``weights.files``, or the input file itself) that stores it
    shard_of: dict[str, str] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.weights.path

    def shard_path(self, shard: str) -> Path:
        return self.path / shard if self.weights.kind == "folder" else self.path

    def stored_key(self, key: str) -> str:
        """The key whose data a (possibly aliased or tied) key reads."""
        while key in self.weights.ties:
            key = self.weights.ties[key]
        return key

    def is_safetensors(self, shard: str) -> bool:
        """A folder's shards are all safetensors or all torch files; a file is what it was read as."""
        kind = self.weights.kind
        return kind == "safetensors" or (kind == "folder" and self.shard_path(shard).suffix == ".safetensors")

    def shards(self) -> list[str]:
        """The files, in reading order."""
        return list(self.weights.files) if self.weights.files else [self.path.name]


def open_checkpoint(path: Path, trust_pickle: bool, split_qkv: bool = True) -> Checkpoint:
    """Index ``path`` without keeping tensor data (exit 3 for unreadable input, 4 for no matrix)."""
    weights = load_weights(path, trust_pickle, lazy=True)
    checkpoint = Checkpoint(weights, trust_pickle, split_qkv)
    try:
        model = model_from_state_dict(weights.state_dict)
    except Exception as error:  # noqa: BLE001 - e.g. keys that are not valid module names
        raise CLIError(f"cannot interpret the keys of {shown(path)} as layers: {_first_line(error)}",
                       EXIT_INPUT) from None
    checkpoint.all_layers = discover_layers(model, layer_types=LAYER_TYPES, split_qkv=split_qkv)
    checkpoint.keys = _layer_keys(model, weights.state_dict, checkpoint.all_layers)
    checkpoint.all_layers = _unusable_skipped(checkpoint, checkpoint.all_layers)
    for name, (keys, _) in weights.files.items():
        checkpoint.shard_of.update(dict.fromkeys(keys, name))
    if not weights.files:  # one torch file
        checkpoint.shard_of = dict.fromkeys(weights.state_dict, path.name)
    if not checkpoint.all_layers:
        raise CLIError(f"{shown(path)} has no weight matrices (floating-point tensors of 2 to 5 dimensions "
                       f"whose key ends in 'weight')", EXIT_EMPTY)
    return checkpoint


def _layer_keys(model: nn.Module, state_dict: dict[str, torch.Tensor], layers: list[LayerMatrix]) -> dict[str, str]:
    """Layer name -> state-dict key, as :func:`model_from_state_dict` turned keys into modules.

    The q, k and v parts of a fused projection all read their module's one key.
    """
    key_of_path = {module_path(key): key for key in state_dict}
    path_of_module = {id(module): raw for raw, module in model.named_modules()}
    keys: dict[str, str] = {}
    for layer in layers:
        key = key_of_path[path_of_module[id(layer.module)]]
        if keys.setdefault(layer.name, key) != key:
            raise CLIError(f"the keys {keys[layer.name]!r} and {key!r} give the same layer name {layer.name!r}",
                           EXIT_INPUT)
    return keys


def read_tensors(checkpoint: Checkpoint, keys: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(key, CPU tensor)`` for ``keys``, shard by shard in file order; one torch file open at a time."""
    wanted = {checkpoint.stored_key(k) for k in keys}
    for shard in checkpoint.shards():
        mine = [k for k in _shard_keys(checkpoint, shard) if k in wanted]
        if not mine:
            continue
        path = checkpoint.shard_path(shard)
        if checkpoint.is_safetensors(shard):
            try:
                with input_errors(path), SafetensorsFile(path) as file:
                    for key in mine:
                        with input_errors(path):
                            tensor = file.get_tensor(key)
                        yield key, tensor
                        del tensor
            except ValueError as error:
                raise CLIError(f"cannot read {shown(path)} as safetensors (truncated or corrupt?): {error}",
                               EXIT_INPUT) from None
        else:
            tensors, _ = read_torch(path, checkpoint.trust_pickle, mmap=True)
            for key in mine:
                yield key, tensors[key]
            del tensors


def _shard_keys(checkpoint: Checkpoint, shard: str) -> list[str]:
    files = checkpoint.weights.files
    return list(files[shard][0]) if shard in files else list(checkpoint.weights.state_dict)


@functools.lru_cache(maxsize=1)
def _glibc() -> Any:
    """The C library when it is glibc (``malloc_trim`` and ``mallopt`` exist), else ``None``."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:  # not glibc: nothing to do
        return None


#: glibc's ``mallopt`` parameter ``M_MMAP_THRESHOLD``, and the threshold the command line sets.
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 4 << 20


def return_large_blocks_when_freed() -> None:
    """Have glibc map every block of at least :data:`MMAP_THRESHOLD` bytes apart, so freeing it
    gives it back to the system at once (the command line calls this; nothing else does).

    By default glibc raises its threshold (up to 32 MiB) as large blocks are freed, and then keeps
    freed windows and Gram matrices in its per-thread heaps while a tensor is analysed: a streaming
    ``--preset llm`` analysis of one float16 4096x4096 matrix peaked at 1470 MiB of anonymous memory
    that way and at 547 MiB with the fixed threshold (``benchmarks/llm_stream_memory.py``).
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def release_freed_memory() -> None:
    """Give freed heap memory back to the system after a shard or group.

    glibc keeps freed blocks of the sort and read buffers in its heap, so without this the
    resident memory grows with the number of shards even though nothing is kept.
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def select(checkpoint: Checkpoint, layer_types: Any, include: Any, exclude: Any) -> list[LayerMatrix]:
    """The matrices chosen by the filters (``ValueError`` for a bad filter; exit 4 when none)."""
    model = model_from_state_dict(checkpoint.weights.state_dict)
    layers = discover_layers(model, layer_types, include, exclude, split_qkv=checkpoint.split_qkv)
    if not layers:
        raise CLIError(f"no layer of {shown(checkpoint.path)} is selected by --include/--exclude/--layer-types",
                       EXIT_EMPTY)
    return _heads_follow_embeddings(checkpoint, _unusable_skipped(checkpoint, layers))


def _unusable_skipped(checkpoint: Checkpoint, layers: list[LayerMatrix]) -> list[LayerMatrix]:
    """Layers stored in a dtype the analysis cannot use (e.g. ``C64``) are skipped with the reason."""
    unusable = checkpoint.weights.unusable
    return [dataclasses.replace(layer, skip_reason=unusable[key])
            if (key := checkpoint.keys.get(layer.name)) in unusable else layer for layer in layers]


def _heads_follow_embeddings(checkpoint: Checkpoint, layers: list[LayerMatrix]) -> list[LayerMatrix]:
    """A matrix tied to an embedding that is not analysed is skipped, as :func:`discover_layers` does for
    live models; here the tie is known by key (meta tensors have no storage to compare)."""
    def stored(layer: LayerMatrix) -> str:
        return checkpoint.stored_key(checkpoint.keys[layer.name])

    embeddings: dict[str, str] = {}
    for layer in checkpoint.all_layers:
        if layer.kind == "Embedding":
            embeddings.setdefault(stored(layer), layer.name)
    analysed = {stored(layer) for layer in layers if layer.kind == "Embedding"}
    return [dataclasses.replace(layer, skip_reason=f"shares weights with {embeddings[key]}")
            if (key := stored(layer)) in embeddings and key not in analysed and layer.kind != "Embedding"
            and not layer.skip_reason else layer for layer in layers]


def tied_owners(checkpoint: Checkpoint, layers: list[LayerMatrix]) -> dict[int, str]:
    """Position -> owner name for each layer whose weights an earlier selected layer already reads."""
    first: dict[str, str] = {}
    shared = {}
    for i, layer in enumerate(layers):
        # The q, k and v parts of one fused tensor read different rows: they are not tied.
        owner = first.setdefault(f"{checkpoint.stored_key(checkpoint.keys[layer.name])}\0{layer.split}", layer.name)
        if owner != layer.name:
            shared[i] = owner
    return shared


@dataclass
class StreamOptions:
    """How the streaming analysis runs (none of it changes the numbers)."""

    device: torch.device = torch.device("cpu")
    group_bytes: int = GROUP_BYTES
    cache: Any = None  # a StatsCache, or None
    #: ``progress(layer, done)``: ``done`` (0 to 1, rising) of the layer's work is finished: its
    #: windows as they are solved (up to :data:`WINDOW_SHARE`), then 1 when its statistics are in.
    #: Called from worker threads too.
    progress: Callable[[LayerMatrix, float], None] | None = None


#: The part of a layer's work that its windows stand for in the progress (the fit, the whole-matrix
#: metrics and the baseline are the rest).
WINDOW_SHARE = 0.9


def analyze_stream(checkpoint: Checkpoint, layers: list[LayerMatrix], settings: dict[str, Any],
                   options: StreamOptions) -> tuple[dict[int, LayerStats], int]:
    """Statistics of this rank's share of ``layers`` (all of them outside torch.distributed).

    Returns ``({position: stats}, number of layers analysed here)``: the rest were tied to an
    earlier layer or found in the cache.
    """
    mine, _ = local_share(layers)
    shared = tied_owners(checkpoint, layers)
    stats: dict[int, LayerStats] = {i: skipped(layers[i], f"shares weights with {shared[i]}")
                                    for i in mine if i in shared}
    todo: dict[str, list[int]] = {}  # stored key -> the layers reading it (q, k and v of a fused tensor)
    for i in mine:
        if layers[i].skip_reason and i not in shared:  # nothing to read (e.g. a dtype the analysis cannot use)
            stats[i] = skipped(layers[i], layers[i].skip_reason)
            if options.progress:
                options.progress(layers[i], 1.0)
        elif i not in shared:
            todo.setdefault(checkpoint.stored_key(checkpoint.keys[layers[i].name]), []).append(i)
    group: list[tuple[int, torch.Tensor, Any]] = []
    size = 0
    analysed = 0

    def flush() -> None:
        nonlocal group, size, analysed
        if not group:
            return
        real = [dataclasses.replace(layers[i], weight=tensor) for i, tensor, _ in group]
        results = analyze_layers(real, settings, on_windows=_window_progress(group, layers, options))[0]
        for (i, _, entry), result in zip(group, results):
            assert result is not None
            stats[i] = result
            if options.cache is not None:
                options.cache.put(entry, result)
            if options.progress:
                options.progress(layers[i], 1.0)
        analysed += len(group)
        group, size = [], 0
        release_freed_memory()

    with torch.no_grad():
        for key, tensor in read_tensors(checkpoint, list(todo)):
            for i in todo[key]:
                entry = options.cache.key(layers[i], tensor, settings, options.device) if options.cache else None
                hit = (options.cache.get(entry, layers[i].name, settings.get("random_baseline", True))
                       if entry is not None else None)
                if hit is not None:
                    stats[i] = hit
                    if options.progress:
                        options.progress(layers[i], 1.0)
                    continue
                nbytes = tensor.numel() * tensor.element_size()
                if group and size + nbytes > options.group_bytes:
                    flush()
                group.append((i, tensor.to(options.device), entry))
                size += nbytes
            del tensor
        flush()
    return stats, analysed


def _window_progress(group: list[tuple[int, torch.Tensor, Any]], layers: list[LayerMatrix],
                     options: StreamOptions) -> Callable[[int, int, int], None] | None:
    """``analyze_layers``' window hook for a group: each layer's solved share, told to ``options.progress``."""
    progress = options.progress
    if progress is None:
        return None
    solved = [0] * len(group)
    lock = threading.Lock()

    def on_windows(j: int, count: int, total: int) -> None:
        with lock:  # told in order, so the shares rise
            solved[j] += count
            progress(layers[group[j][0]], WINDOW_SHARE * min(solved[j], total) / total)

    return on_windows


def largest_tensor(layers: list[LayerMatrix]) -> int:
    """Bytes of the largest weight among ``layers`` (meta tensors: nothing is read)."""
    return max((layer.weight.numel() * layer.weight.element_size() for layer in layers), default=0)


def analyze_checkpoint(checkpoint: Checkpoint, layers: list[LayerMatrix], settings: dict[str, Any],
                       options: StreamOptions, progress: bool = True) -> tuple[FARMSReport, int]:
    """The report of ``layers``, streamed, split across ranks under torchrun and gathered on all.

    ``settings`` gain ``world_size`` and ``device``. A progress bar over this rank's tensors (weights
    as the unit, so its ETA follows the work) shows on rank 0's interactive stderr. Returns the
    report and how many tensors were analysed (not tied, not found in the cache), over all ranks.
    """
    from tqdm import tqdm

    rank, world_size = distributed_context()
    shared = tied_owners(checkpoint, layers)
    work = [layers[i] for i in local_share(layers)[0] if i not in shared]
    # disable=None: the bar shows on an interactive stderr only, never in pipes or logs.
    with tqdm(total=sum(layer.num_params for layer in work), desc="FARMS", unit="w", unit_scale=True,
              file=sys.stderr, disable=None if progress and rank == 0 else True, leave=False) as bar:
        shown: dict[str, float] = {}  # layer name -> share of it already on the bar
        finished = [0]
        lock = threading.Lock()

        def step(layer: LayerMatrix, done: float) -> None:
            # A big layer moves the bar as its windows are solved, so the ETA never waits a whole tensor.
            with lock:
                before = shown.get(layer.name, 0.0)
                if done <= before:
                    return
                shown[layer.name] = done
                if done >= 1.0:
                    finished[0] += 1
                    bar.set_postfix_str(f"{finished[0]}/{len(work)} tensors", refresh=False)
                bar.update(round(layer.num_params * done) - round(layer.num_params * before))

        options.progress = step
        local, analysed = together(lambda: analyze_stream(checkpoint, layers, settings, options))
    merged = {i: stats for part in gather(local) for i, stats in part.items()}
    report = FARMSReport([merged[i] for i in range(len(layers))],
                         {**settings, "world_size": world_size, "device": str(options.device)})
    return report, sum(gather(analysed))
