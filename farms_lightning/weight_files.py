"""Reading and writing weight files for the CLI: torch state dicts, Lightning checkpoints, safetensors.

Formats are recognised from the first bytes (the extension is only a fallback). Torch files load
with ``weights_only=True`` unless the caller trusts pickles. Failures raise :class:`CLIError` with
the exit code the command line returns (3 for input, 5 for output).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

EXIT_INPUT, EXIT_OUTPUT = 3, 5
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class CLIError(Exception):
    """A clear, expected failure: its message goes to stderr and ``code`` becomes the exit status."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Weights:
    """Loaded tensors plus what is needed to write them back in the same format."""

    path: Path
    kind: str  # "torch" or "safetensors" (a file), "folder" (of safetensors files, else of torch files)
    state_dict: dict[str, torch.Tensor]
    container: Any = None  # torch: the loaded object, written back whole
    files: dict[str, tuple[list[str], dict[str, str] | None]] = field(default_factory=dict)  # name: keys, metadata
    containers: dict[str, Any] = field(default_factory=dict)  # a folder's torch files: name -> loaded object


def load_weights(path: Path, trust_pickle: bool = False) -> Weights:
    """Read a checkpoint, state dict, safetensors file or folder of them (exit code 3 on failure)."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".safetensors" and p.is_file())
        torch_files = sorted(p for p in path.iterdir() if p.suffix in TORCH_SUFFIXES and p.is_file())
        if not files and not torch_files:
            raise CLIError(f"{path} is a folder without .safetensors or torch ({', '.join(TORCH_SUFFIXES)}) files",
                           EXIT_INPUT)
        weights = Weights(path, "folder", {})
        for file in files or torch_files:  # a sharded model: safetensors shards, else torch shards
            if files:
                tensors, metadata = _read_safetensors(file)
            else:
                tensors, weights.containers[file.name] = _read_torch(file, trust_pickle)
                metadata = None
            weights.state_dict.update(tensors)
            weights.files[file.name] = (list(tensors), metadata)
        return weights
    if not path.is_file():
        raise CLIError(f"{path}: no such file or folder", EXIT_INPUT)
    kind = sniff_format(path)
    if kind == "safetensors":
        tensors, metadata = _read_safetensors(path)
        return Weights(path, "safetensors", tensors, files={path.name: (list(tensors), metadata)})
    if kind != "torch":
        raise CLIError(f"{path}: unknown format: neither a torch file (zip archive or pickle: .ckpt/.pt/.pth/.bin) "
                       f"nor safetensors, nor a folder of such files", EXIT_INPUT)
    tensors, container = _read_torch(path, trust_pickle)
    return Weights(path, "torch", tensors, container=container)


def _read_torch(path: Path, trust_pickle: bool) -> tuple[dict[str, torch.Tensor], Any]:
    """The tensors of a torch state dict file (or of its ``"state_dict"``) and the loaded object."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as error:  # noqa: BLE001 - any reader failure is a clear input error
        if "weights only" in str(error).lower() or "weights_only" in str(error):
            raise CLIError(f"{path} holds Python objects that weights_only loading refuses; if you trust the "
                           f"file, rerun with --trust-pickle ({_first_line(error)})", EXIT_INPUT) from None
        raise CLIError(f"cannot read {path} as a torch file (truncated or corrupt?): {_first_line(error)}",
                       EXIT_INPUT) from None
    inner = obj.state_dict() if isinstance(obj, torch.nn.Module) else obj
    if isinstance(inner, dict) and isinstance(inner.get("state_dict"), dict):
        inner = inner["state_dict"]
    if not isinstance(inner, dict):
        raise CLIError(f"{path} holds a {type(obj).__name__}, not a state dict", EXIT_INPUT)
    return {k: v for k, v in inner.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}, obj


def sniff_format(path: Path) -> str | None:
    """``"torch"`` or ``"safetensors"`` from the file's first bytes; ``None`` when neither."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch zip archive / legacy pickle
        return "torch"
    if len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 1 << 40:
        return "safetensors"  # an 8-byte little-endian header length, then the JSON header
    return "safetensors" if path.suffix.lower() == ".safetensors" else None  # e.g. a truncated header


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}, f.metadata()
    except Exception as error:  # noqa: BLE001
        raise CLIError(f"cannot read {path} as safetensors (truncated or corrupt?): {_first_line(error)}",
                       EXIT_INPUT) from None


def save_weights(weights: Weights, out: Path) -> None:
    """Write ``weights`` (pruned in place) in their input format; other files of a folder are copied."""
    try:
        if weights.kind == "torch":
            _atomic(out, lambda tmp: torch.save(weights.container, tmp))
            return
        from safetensors.torch import save_file

        if weights.kind == "folder":
            out.mkdir(parents=True, exist_ok=True)
            for other in weights.path.iterdir():  # config, tokenizer, sub-folders: keep the copy usable
                if other.is_dir():
                    shutil.copytree(other, out / other.name, dirs_exist_ok=True)
                elif other.name not in weights.files:
                    shutil.copy2(other, out / other.name)
        for name, container in weights.containers.items():  # torch shards: pruned in place, written whole
            _atomic(out / name, lambda tmp: torch.save(container, tmp))
        for name, (keys, metadata) in weights.files.items():
            if name in weights.containers:
                continue
            target = out / name if weights.kind == "folder" else out
            tensors = {k: weights.state_dict[k].contiguous() for k in keys}
            _atomic(target, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    except OSError as error:
        raise CLIError(f"cannot write {out}: {error}", EXIT_OUTPUT) from None


def _atomic(target: Path, write: Callable[[str], None]) -> None:
    """Write through a temporary file in the target's folder, so a failure leaves no partial file."""
    if not target.parent.is_dir():
        raise OSError(f"the folder {target.parent} does not exist")
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _first_line(error: BaseException) -> str:
    """The first sentence of an error message (the torch reader's run on for several)."""
    text = (str(error).strip() or type(error).__name__).splitlines()[0]
    return text.split(". ")[0][:200]
