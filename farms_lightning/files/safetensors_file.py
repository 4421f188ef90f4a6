"""safetensors files on Python's own file I/O: any file name, one tensor at a time, one error path.

The ``safetensors`` package's reader takes a file name it must decode as UTF-8 (so it refuses names
that are not) and raises its own error type for I/O failures. The format is simple — an 8-byte
little-endian header length, a JSON header ``{name: {"dtype", "shape", "data_offsets"}, "__metadata__":
{...}}``, then the raw little-endian bytes — so it is read here directly: every ``OSError`` comes from
Python's ``open``/``read`` (the caller maps it to an exit code) and a malformed file is a
:class:`ValueError`. Tensors are read one at a time, so a caller can stream a large file.
:func:`save_safetensors` writes the same format, one tensor at a time (no copy of the whole file in
memory), readable by ``safetensors.torch.load_file``.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Callable, Mapping

import torch

#: safetensors dtype names; the unsigned and float8 kinds only where this torch has them.
DTYPES: dict[str, torch.dtype] = {name: getattr(torch, attr) for name, attr in {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "U16": "uint16", "U32": "uint32", "U64": "uint64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}.items() if hasattr(torch, attr)}
MAX_HEADER = 100_000_000  # the safetensors package's own limit on the JSON header


class SafetensorsFile:
    """An open safetensors file: ``keys()`` (sorted, as ``safetensors.safe_open`` gives them),
    ``metadata()`` and ``get_tensor(key)`` (a fresh CPU tensor). Use as a context manager.

    Raises:
        OSError: the file cannot be opened or read.
        ValueError: the file is not a well-formed safetensors file (truncated, corrupt header).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: io.BufferedReader = open(path, "rb")  # noqa: SIM115 - closed by close()/__exit__
        try:
            self._entries, self._metadata, self._start = self._read_header()
        except BaseException:
            self._file.close()
            raise

    def _read_header(self) -> tuple[dict[str, dict], dict[str, str] | None, int]:
        size = os.fstat(self._file.fileno()).st_size
        head = self._file.read(8)
        if len(head) < 8:
            raise ValueError("shorter than the 8-byte header length")
        length = int.from_bytes(head, "little")
        if length > min(MAX_HEADER, size - 8):
            raise ValueError(f"header length {length} exceeds the file ({size} bytes)")
        try:
            header = json.loads(self._file.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"the header is not valid JSON ({error})") from None
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        metadata = header.pop("__metadata__", None)
        if metadata is not None and not (isinstance(metadata, dict)
                                         and all(isinstance(v, str) for v in metadata.values())):
            raise ValueError("__metadata__ is not a mapping of strings")
        data = size - 8 - length
        for key, entry in header.items():
            dtype, shape, offsets = (entry.get(k) if isinstance(entry, dict) else None
                                     for k in ("dtype", "shape", "data_offsets"))
            if dtype not in DTYPES:
                raise ValueError(f"tensor {key!r}: unknown dtype {dtype!r}")
            if not (isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)
                    and isinstance(offsets, list) and len(offsets) == 2
                    and all(isinstance(n, int) for n in offsets) and 0 <= offsets[0] <= offsets[1]):
                raise ValueError(f"tensor {key!r}: malformed shape or data_offsets")
            if offsets[1] - offsets[0] != math.prod(shape) * DTYPES[dtype].itemsize:
                raise ValueError(f"tensor {key!r}: data_offsets do not match its shape and dtype")
            if offsets[1] > data:
                raise ValueError(f"tensor {key!r} ends after the end of the file (truncated?)")
        return header, metadata, 8 + length

    def keys(self) -> list[str]:
        return sorted(self._entries)

    def metadata(self) -> dict[str, str] | None:
        return None if self._metadata is None else dict(self._metadata)

    def spec(self, key: str) -> torch.Tensor:
        """The tensor's shape and dtype as a ``meta`` tensor: nothing is read."""
        entry = self._entries[key]
        return torch.empty(entry["shape"], dtype=DTYPES[entry["dtype"]], device="meta")

    def get_tensor(self, key: str) -> torch.Tensor:
        entry = self._entries[key]
        dtype, shape, (begin, end) = DTYPES[entry["dtype"]], entry["shape"], entry["data_offsets"]
        if begin == end:
            return torch.empty(shape, dtype=dtype)
        buffer = bytearray(end - begin)
        self._file.seek(self._start + begin)
        if self._file.readinto(buffer) != len(buffer):
            raise ValueError(f"tensor {key!r} is cut off (truncated?)")
        # The format is little-endian, as is every platform torch ships for: the bytes are the values.
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path,
                     metadata: Mapping[str, str] | None = None,
                     load: Callable[[str], torch.Tensor] | None = None) -> None:
    """Write ``tensors`` to ``path`` as safetensors, one tensor at a time; ``OSError`` on failure.

    Tensors are laid out by decreasing element size, then by name (as the ``safetensors`` package
    does, so every tensor is aligned to its element size); the header is padded to 8 bytes. With
    ``load``, ``tensors`` only give shapes and dtypes (e.g. ``meta`` tensors) and each tensor's data
    is ``load(key)``, asked for just before it is written: a streaming writer holds one tensor.
    """
    names = {v: k for k, v in DTYPES.items()}
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key in order:
        tensor = tensors[key]
        if tensor.dtype not in names:
            raise ValueError(f"tensor {key!r}: safetensors cannot store {tensor.dtype}")
        size = tensor.numel() * tensor.element_size()
        header[key] = {"dtype": names[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as file:
        file.write(len(text).to_bytes(8, "little"))
        file.write(text)
        for key in order:
            tensor = tensors[key] if load is None else load(key)
            if tensor.shape != tensors[key].shape or tensor.dtype != tensors[key].dtype:
                raise ValueError(f"tensor {key!r}: loaded {tensor.dtype} {tuple(tensor.shape)}, the header says "
                                 f"{tensors[key].dtype} {tuple(tensors[key].shape)}")
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            if flat.numel():
                file.write(flat.view(torch.uint8).numpy().data)
