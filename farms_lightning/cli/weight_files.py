"""Reading and writing weight files for the CLI: torch state dicts, Lightning checkpoints, safetensors.

Formats are recognised from the first bytes (the extension is only a fallback). Torch files load
with ``weights_only=True`` unless the caller trusts pickles. A folder is a sharded model: its
``.safetensors`` files, else its torch files; when it has a ``*.index.json`` whose ``weight_map``
names the shards (as Hugging Face writes), that map says which shard owns which key. Every read
maps its ``OSError`` to exit 3, every write to exit 5 (:mod:`farms_lightning.files.safe_io`); outputs are
written atomically, a folder beside its target and renamed into place at the end.

``load_weights(..., lazy=True)`` reads no tensor data: its ``state_dict`` holds ``meta`` tensors
(shapes and dtypes) for streaming (:mod:`farms_lightning.cli.streaming`), and ``ties`` says which keys
read the same memory, found by key: within one torch file while all its tensors are alive, and from
the aliases a safetensors file lists in its metadata (``{"lm_head.weight": "embed.weight"}``, as
``safetensors.torch.save_model`` writes for a tied weight it stores once).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from farms_lightning.files import strict_json
from farms_lightning.files.safe_copy import copy_into
from farms_lightning.files.safe_io import (
    EXIT_INPUT,
    EXIT_OUTPUT,
    TEMP_PREFIX,
    CLIError,
    atomic_folder,
    atomic_write,
    input_errors,
    reason,
    shown,
)
from farms_lightning.files.safetensors_file import SafetensorsFile, save_safetensors

__all__ = ["EXIT_INPUT", "EXIT_OUTPUT", "CLIError", "Weights", "load_weights", "save_weights", "sniff_format"]

TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


@dataclass
class Weights:
    """Loaded tensors plus what is needed to write them back in the same format."""

    path: Path
    kind: str  # "torch" or "safetensors" (a file), "folder" (of safetensors files, else of torch files)
    state_dict: dict[str, torch.Tensor]
    container: Any = None  # torch: the loaded object, written back whole
    files: dict[str, tuple[list[str], dict[str, str] | None]] = field(default_factory=dict)  # name: keys, metadata
    containers: dict[str, Any] = field(default_factory=dict)  # a folder's torch files: name -> loaded object
    sources: list[Path] = field(default_factory=list)  # every file read: no output may be written over them
    #: key -> the first key of its file reading the same memory (tied weights, safetensors aliases).
    ties: dict[str, str] = field(default_factory=dict)
    #: key -> why it is not analysed: stored in a dtype the analysis cannot use (copied unchanged).
    unusable: dict[str, str] = field(default_factory=dict)


def load_weights(path: Path, trust_pickle: bool = False, lazy: bool = False) -> Weights:
    """Read a checkpoint, state dict, safetensors file or folder of them (exit code 3 on failure).

    With ``lazy``, tensors are ``meta`` stand-ins (no data is kept; torch files are memory-mapped
    while their keys are listed) and no torch container is kept.
    """
    with input_errors(path):
        is_dir = path.is_dir()
        is_file = not is_dir and path.is_file()
    if is_dir:
        return _load_folder(path, trust_pickle, lazy)
    if not is_file:
        raise CLIError(f"{shown(path)}: no such file or folder", EXIT_INPUT)
    kind = sniff_format(path)
    if kind == "safetensors":
        tensors, metadata, unusable = read_safetensors(path, lazy)
        weights = Weights(path, "safetensors", tensors, files={path.name: (list(tensors), metadata)}, sources=[path],
                          unusable=unusable)
        _add_aliases(weights, tensors, metadata)
        return weights
    if kind != "torch":
        raise CLIError(f"{shown(path)}: unknown format: neither a torch file (zip archive or pickle: "
                       f".ckpt/.pt/.pth/.bin) nor safetensors, nor a folder of such files", EXIT_INPUT)
    tensors, container = read_torch(path, trust_pickle, mmap=lazy)
    weights = Weights(path, "torch", tensors, container=container, sources=[path])
    if lazy:
        _make_lazy(weights, tensors)
    return weights


def _make_lazy(weights: Weights, tensors: dict[str, torch.Tensor]) -> None:
    """Replace one torch file's tensors by ``meta`` stand-ins, recording which keys share memory.

    Every tensor of the file is alive here, so equal storage addresses do mean shared memory.
    """
    first: dict[tuple, str] = {}
    for key, tensor in tensors.items():
        where = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        if tensor.numel() and first.setdefault(where, key) != key:
            weights.ties[key] = first[where]
        weights.state_dict[key] = torch.empty_like(tensor, device="meta")
    weights.container = None


def _add_aliases(weights: Weights, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> None:
    """A safetensors file's metadata aliases (``{removed key: stored key}``) as tied keys."""
    for alias, kept in (metadata or {}).items():
        if alias not in tensors and kept in tensors and alias not in weights.state_dict:
            weights.state_dict[alias] = tensors[kept]  # the same tensor object: analysed once
            weights.ties[alias] = kept


def _load_folder(path: Path, trust_pickle: bool, lazy: bool = False) -> Weights:
    """A sharded model: every key from exactly one shard (exit 3 for a key in two, or against the index)."""
    with input_errors(path):
        # A temporary file left by a killed run (their names start with TEMP_PREFIX) is no shard.
        entries = sorted(p for p in path.iterdir() if not p.name.startswith(TEMP_PREFIX))
        safetensors = [p for p in entries if p.suffix == ".safetensors" and p.is_file()]
        torch_files = [p for p in entries if p.suffix in TORCH_SUFFIXES and p.is_file()]
    if not safetensors and not torch_files:
        raise CLIError(f"{shown(path)} is a folder without .safetensors or torch ({', '.join(TORCH_SUFFIXES)}) "
                       f"files", EXIT_INPUT)
    shards = safetensors or torch_files
    index, index_files = _read_index(entries, (".safetensors",) if safetensors else TORCH_SUFFIXES)
    weights = Weights(path, "folder", {}, sources=list(index_files))
    listed = set(index.values()) if index is not None else {p.name for p in shards}
    missing = sorted(listed - {p.name for p in shards})
    if missing:
        raise CLIError(f"{shown(index_files[0].name)} names the shard {missing[0]}, which is not in {shown(path)}",
                       EXIT_INPUT)
    owner: dict[str, str] = {}
    for file in shards:
        try:
            tensors, metadata, container, unusable = _read_shard(file, trust_pickle, lazy)
        except CLIError:
            if file.name not in listed and file.suffix != ".safetensors":
                continue  # a torch file the index does not name and that is no state dict (training_args.bin)
            raise
        if file.name not in listed:
            if tensors:
                raise CLIError(f"{shown(file)} holds tensors but {shown(index_files[0].name)} does not list it; "
                               f"remove the file or add its keys to the index", EXIT_INPUT)
            continue
        for key in tensors:
            if key in owner:
                raise CLIError(f"{shown(path)}: the key {key!r} is in two shards, {shown(owner[key])} and "
                               f"{shown(file.name)}", EXIT_INPUT)
            if index is not None and index.get(key) != file.name:
                where = f"maps it to {shown(index[key])}" if key in index else "does not list it"
                raise CLIError(f"{shown(file)} holds {key!r} but {shown(index_files[0].name)} {where}", EXIT_INPUT)
            owner[key] = file.name
        weights.files[file.name] = (list(tensors), metadata)
        weights.unusable.update(unusable)
        if lazy and container is not None:
            _make_lazy(weights, tensors)
            container = None
        else:
            weights.state_dict.update(tensors)
        _add_aliases(weights, tensors, metadata)
        if container is not None:
            weights.containers[file.name] = container
        weights.sources.append(file)
    absent = [key for key in index or {} if key not in owner]
    if index is not None and absent:
        raise CLIError(f"{shown(index_files[0].name)} maps {absent[0]!r} to {shown(index[absent[0]])}, which does not "
                       f"hold it", EXIT_INPUT)
    return weights


def _read_index(entries: list[Path], suffixes: tuple[str, ...]) -> tuple[dict[str, str] | None, list[Path]]:
    """The merged ``weight_map`` of the folder's ``*.index.json`` files for shards with ``suffixes``.

    An index is an input like any other: one that is not strict JSON, not an object, has no
    ``weight_map`` object, or maps a key to anything but a shard file name of this folder is exit 3
    with the reason (an index of the other format, all its names ending so, is left to that format).
    """
    weight_map: dict[str, str] = {}
    used = []
    for file in entries:
        if not file.name.endswith(".index.json"):
            continue
        with input_errors(file):
            text = file.read_bytes()
        try:
            data = strict_json.loads(text, "the file")
        except ValueError as error:
            raise CLIError(f"cannot read {shown(file)} as a shard index: {error}", EXIT_INPUT) from None
        mapping = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(mapping, dict) or not mapping:
            what = "is not a JSON object" if not isinstance(data, dict) else "has no weight_map object (or it is empty)"
            raise CLIError(f"cannot read {shown(file)} as a shard index: it {what}", EXIT_INPUT)
        kinds = {_shard_kind(file, key, shard) for key, shard in mapping.items()}
        if len(kinds) > 1:
            raise CLIError(f"{shown(file)} maps keys to both safetensors and torch shards", EXIT_INPUT)
        if kinds != {"safetensors" if ".safetensors" in suffixes else "torch"}:
            continue  # the index of the other format (a folder may ship both)
        for key, shard in mapping.items():
            if weight_map.setdefault(key, shard) != shard:
                raise CLIError(f"{shown(file)} maps {key!r} to {shard}, another index to {weight_map[key]}",
                               EXIT_INPUT)
        used.append(file)
    return (weight_map if used else None), used


def _shard_kind(index: Path, key: str, shard: Any) -> str:
    """``"safetensors"`` or ``"torch"`` for a plain shard file name; exit 3 for anything else."""
    if isinstance(shard, str) and shard not in ("", ".", "..") and "/" not in shard and "\\" not in shard \
            and "\0" not in shard:
        suffix = Path(shard).suffix
        if suffix == ".safetensors":
            return "safetensors"
        if suffix in TORCH_SUFFIXES:
            return "torch"
    raise CLIError(f"{shown(index)} maps {key!r} to {shard!r}, which is not a shard file name in its folder "
                   f"(a name ending in .safetensors or {'/'.join(TORCH_SUFFIXES)})", EXIT_INPUT)


def _read_shard(file: Path, trust_pickle: bool, lazy: bool = False
                ) -> tuple[dict[str, torch.Tensor], dict[str, str] | None, Any, dict[str, str]]:
    if file.suffix == ".safetensors":
        tensors, metadata, unusable = read_safetensors(file, lazy)
        return tensors, metadata, None, unusable
    tensors, container = read_torch(file, trust_pickle, mmap=lazy)
    return tensors, None, container, {}


def read_torch(path: Path, trust_pickle: bool, mmap: bool = False) -> tuple[dict[str, torch.Tensor], Any]:
    """The tensors of a torch state dict file (or of its ``"state_dict"``) and the loaded object.

    With ``mmap``, a zip-format file whose name is valid UTF-8 is memory-mapped (copy-on-write:
    the file is never modified), so its tensors cost no anonymous memory until they are written to.
    """
    with input_errors(path):
        file = open(path, "rb")  # opened here: any file name, and its OSError is an input error
    with file:
        try:
            with input_errors(path):
                mapped = mmap and file.read(4) == b"PK\x03\x04" and _utf8(path)
                file.seek(0)
            source: Any = str(path) if mapped else file  # torch maps only a file named by a path
            obj = torch.load(source, map_location="cpu", weights_only=not trust_pickle, mmap=bool(mapped))
        except OSError as error:
            raise CLIError(f"cannot read {shown(path)}: {reason(error)}", EXIT_INPUT) from None
        except Exception as error:  # noqa: BLE001 - any reader failure is a clear input error
            if "weights only" in str(error).lower() or "weights_only" in str(error):
                raise CLIError(f"{shown(path)} holds Python objects that weights_only loading refuses; if you "
                               f"trust the file, rerun with --trust-pickle ({_first_line(error)})",
                               EXIT_INPUT) from None
            raise CLIError(f"cannot read {shown(path)} as a torch file (truncated or corrupt?): "
                           f"{_first_line(error)}", EXIT_INPUT) from None
    inner = obj.state_dict() if isinstance(obj, torch.nn.Module) else obj
    if isinstance(inner, dict) and isinstance(inner.get("state_dict"), dict):
        inner = inner["state_dict"]
    if not isinstance(inner, dict):
        raise CLIError(f"{shown(path)} holds a {type(obj).__name__}, not a state dict", EXIT_INPUT)
    return {k: v for k, v in inner.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}, obj


def _utf8(path: Path) -> bool:
    try:
        str(path).encode("utf-8")
        return True
    except UnicodeEncodeError:  # a name with bytes that are not UTF-8 (kept as surrogates)
        return False


def sniff_format(path: Path) -> str | None:
    """``"torch"`` or ``"safetensors"`` from the file's first bytes; ``None`` when neither."""
    with input_errors(path), open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch zip archive / legacy pickle
        return "torch"
    if len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 1 << 40:
        return "safetensors"  # an 8-byte little-endian header length, then the JSON header
    return "safetensors" if path.suffix.lower() == ".safetensors" else None  # e.g. a truncated header


def read_safetensors(path: Path, lazy: bool = False
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str] | None, dict[str, str]]:
    """Every tensor of a safetensors file (``lazy``: ``meta`` stand-ins), its metadata and
    ``{key: reason}`` for tensors in a dtype the analysis cannot use (exit 3 on failure)."""
    try:
        with input_errors(path), SafetensorsFile(path) as f:
            tensors = {key: f.spec(key) if lazy else f.get_tensor(key) for key in f.keys()}
            return tensors, f.metadata(), f.unusable()
    except ValueError as error:
        raise CLIError(f"cannot read {shown(path)} as safetensors (truncated or corrupt?): {error}",
                       EXIT_INPUT) from None


def save_weights(weights: Weights, out: Path) -> None:
    """Write ``weights`` (pruned in place) in their input format; other files of a folder are copied.

    A file is replaced atomically; a folder is built beside ``out`` and renamed into place at the end,
    so a failure (exit 5) leaves no partial output.
    """
    if weights.kind == "torch":
        atomic_write(out, lambda tmp: _save_torch(weights.container, tmp))
        return
    if weights.kind == "safetensors":
        keys, metadata = next(iter(weights.files.values()))
        atomic_write(out, lambda tmp: save_safetensors({k: weights.state_dict[k] for k in keys}, tmp, metadata))
        return
    with atomic_folder(out) as folder:
        with input_errors(weights.path):
            others = sorted(p for p in weights.path.iterdir()
                            if p.name not in weights.files and not p.name.startswith(TEMP_PREFIX))
        for other in others:  # config, tokenizer, index, sub-folders: keep the copy usable
            copy_into(other, folder / other.name, label=out / other.name)
        for name, (keys, metadata) in weights.files.items():
            if name in weights.containers:  # torch shards: pruned in place, written whole
                atomic_write(folder / name, lambda tmp: _save_torch(weights.containers[name], tmp), label=out / name)
            else:
                atomic_write(folder / name, lambda tmp: save_safetensors({k: weights.state_dict[k] for k in keys},
                                                                         tmp, metadata), label=out / name)


def _save_torch(obj: Any, path: Path) -> None:
    with open(path, "wb") as file:  # through a Python file, torch's write errors are OSErrors
        torch.save(obj, file)


def _first_line(error: BaseException) -> str:
    """The first sentence of an error message (the torch reader's run on for several)."""
    text = (str(error).strip() or type(error).__name__).splitlines()[0]
    return text.split(". ")[0][:200]
