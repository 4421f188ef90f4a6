"""safetensors files on Python's own file I/O: any file name, one tensor at a time, one error path.

Why not ``safetensors.safe_open`` (measured with safetensors 0.8.0): it refuses a file name that is
not UTF-8 ("Path ... is not valid UTF-8"), accepts a tensor key written twice (the later entry wins,
silently) and a shape ``[2**63, 0]`` (whose ``get_tensor`` then raises ``TypeError``), and opens by
name, so nothing ties its read to a descriptor checked with ``fstat``. Its memory map saves copying
(about 10 ms per 64 MiB), which is nothing beside the seconds one such matrix takes to analyse, and
reading with ``readinto`` turns a file truncated while it is read into a short read (a
:class:`ValueError`), where a memory map would end the process with ``SIGBUS``.

The reader refuses everything the reference refuses, and the cases above: the header is strict JSON
(:mod:`farms_lightning.files.strict_json`: depth bound, no duplicate key, no byte-order mark, no
``NaN``); ``data_offsets`` must tile the data area exactly (sorted, each tensor starting where the one
before ends, the last ending at the end of the file: no overlap, gap or trailing bytes); sizes must
match shape and dtype (sub-byte dtypes end on a byte boundary); shapes are lists of non-negative
integers (not ``true``) whose running product fits a 64-bit count; at most :data:`MAX_TENSORS`
tensors. Every dtype the reference knows is parsed; those the analysis cannot use (complex, 4- and
6-bit floats, and any this torch lacks) are listed by :meth:`SafetensorsFile.unusable` with a reason
and can still be copied byte for byte (:meth:`SafetensorsFile.get_raw`). Every ``OSError`` comes from
Python's ``open``/``read`` (the caller maps it to an exit code) and a malformed file is a
:class:`ValueError` with one line. :func:`save_safetensors` writes the same format, one tensor at a
time (no copy of the whole file in memory), readable by ``safetensors.torch.load_file``.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from farms_lightning.files import strict_json
from farms_lightning.files.temp_files import NotRegularFile, open_regular

#: Bits per element of every dtype the reference (safetensors 0.7+) knows.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "F64": 64, "I64": 64,
    "U64": 64, "C64": 64}
#: The dtypes read as torch tensors; the unsigned and float8 kinds only where this torch has them.
DTYPES: dict[str, torch.dtype] = {name: getattr(torch, attr) for name, attr in {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "U16": "uint16", "U32": "uint32", "U64": "uint64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
    "C64": "complex64"}.items() if hasattr(torch, attr)}
#: Read (and copied byte for byte) but never analysed, with what they hold.
NOT_ANALYSED = {"C64": "complex numbers", "F8_E8M0": "exponent-only block scales", "F4": "packed 4-bit floats",
                "F6_E2M3": "packed 6-bit floats", "F6_E3M2": "packed 6-bit floats"}
MAX_HEADER = 100_000_000  # the safetensors package's own limit on the JSON header
#: Most tensors one file may hold. Indexing costs about 0.3-0.7 ms and 13 KB per weight tensor (a
#: module is built for each), so this bounds a file's cost at about 45 s and 850 MB whatever its
#: header says; the largest real single files hold a few tens of thousands (an unsharded MoE model).
MAX_TENSORS = 65_536
_COUNT_LIMIT = 1 << 63  # torch sizes are signed 64-bit


def unusable_reason(dtype: str) -> str | None:
    """Why a tensor stored as ``dtype`` cannot be analysed, or ``None`` when it can be read as a tensor."""
    if dtype in NOT_ANALYSED:
        return f"stored as {dtype} ({NOT_ANALYSED[dtype]}), which the analysis cannot use"
    if dtype not in DTYPES:
        return f"stored as {dtype}, which this version of torch cannot hold"
    return None


class SafetensorsFile:
    """An open safetensors file: ``keys()`` (sorted, as ``safetensors.safe_open`` gives them),
    ``metadata()``, ``spec(key)`` (shape and dtype, nothing read), ``get_tensor(key)`` (a fresh CPU
    tensor), ``unusable()`` and ``get_raw(key)``. Use as a context manager.

    Raises:
        OSError: the file cannot be opened or read.
        ValueError: not a regular file, or not a well-formed safetensors file (one line saying why).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        # A FIFO put where a file was expected must not hang the open; the check is on the descriptor
        # that is then read, not on what the name pointed to before.
        try:
            self._file: io.BufferedReader = open_regular(path)
        except NotRegularFile:
            raise ValueError("not a regular file") from None
        try:
            self._entries, self._metadata, self._start = self._read_header()
        except BaseException:
            self._file.close()
            raise

    def _read_header(self) -> tuple[dict[str, tuple[str, tuple[int, ...], int, int]], dict[str, str] | None, int]:
        size = os.fstat(self._file.fileno()).st_size
        head = self._file.read(8)
        if len(head) < 8:
            raise ValueError("shorter than the 8-byte header length")
        length = int.from_bytes(head, "little")
        if length > MAX_HEADER:
            raise ValueError(f"header length {length} exceeds the limit of {MAX_HEADER} bytes")
        if length > size - 8:
            raise ValueError(f"header length {length} exceeds the file ({size} bytes)")
        text = self._file.read(length)
        if len(text) < length:
            raise ValueError("the header is cut off (truncated?)")
        header = strict_json.loads(text, "the header")
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        metadata = header.pop("__metadata__", None)
        if metadata is not None and not (isinstance(metadata, dict)
                                         and all(isinstance(v, str) for v in metadata.values())):
            raise ValueError("__metadata__ is not a mapping of strings")
        if len(header) > MAX_TENSORS:  # before any work per entry
            raise ValueError(f"the header lists {len(header)} tensors (at most {MAX_TENSORS} per file)")
        entries = {key: _entry(key, value) for key, value in header.items()}
        # As the reference: sorted by offsets, the tensors tile the data area exactly.
        data, position = size - 8 - length, 0
        for key, (_, _, begin, end) in sorted(entries.items(), key=lambda item: item[1][2:]):
            if begin != position:
                where = "overlap the tensor before them" if begin < position else "leave a gap before them"
                raise ValueError(f"tensor {key!r}: data_offsets [{begin}, {end}] {where}")
            position = end
        if position > data:
            raise ValueError(f"the tensors need {position} data bytes, the file holds {data} (truncated?)")
        if position < data:
            raise ValueError(f"{data - position} bytes follow the last tensor")
        return entries, metadata, 8 + length

    def keys(self) -> list[str]:
        return sorted(self._entries)

    def metadata(self) -> dict[str, str] | None:
        return None if self._metadata is None else dict(self._metadata)

    def unusable(self) -> dict[str, str]:
        """``{key: reason}`` for the tensors stored in a dtype the analysis cannot use."""
        reasons = {key: unusable_reason(entry[0]) for key, entry in self._entries.items()}
        return {key: why for key, why in reasons.items() if why}

    def stored(self, key: str) -> tuple[str, list[int]]:
        """The dtype name and shape the header gives for ``key``."""
        dtype, shape, _, _ = self._entries[key]
        return dtype, list(shape)

    def spec(self, key: str) -> torch.Tensor:
        """The tensor's shape and dtype as a ``meta`` tensor: nothing is read.

        A tensor listed by :meth:`unusable` gets a ``float32`` stand-in of its shape, so that layer
        discovery sees the matrix and reports it skipped with the reason.
        """
        dtype, shape, _, _ = self._entries[key]
        usable = unusable_reason(dtype) is None
        return torch.empty(shape, dtype=DTYPES[dtype] if usable else torch.float32, device="meta")

    def get_tensor(self, key: str) -> torch.Tensor:
        dtype, shape, begin, end = self._entries[key]
        if dtype not in DTYPES:
            raise ValueError(f"tensor {key!r}: {unusable_reason(dtype)}")
        if begin == end:
            return torch.empty(shape, dtype=DTYPES[dtype])
        # The format is little-endian, as is every platform torch ships for: the bytes are the values.
        return torch.frombuffer(self._read(key, begin, end), dtype=DTYPES[dtype]).reshape(shape)

    def get_raw(self, key: str) -> torch.Tensor:
        """The stored bytes of ``key`` as a flat ``uint8`` tensor (any dtype: to copy it unchanged)."""
        _, _, begin, end = self._entries[key]
        return torch.frombuffer(self._read(key, begin, end), dtype=torch.uint8) if end > begin else \
            torch.empty(0, dtype=torch.uint8)

    def _read(self, key: str, begin: int, end: int) -> bytearray:
        buffer = bytearray(end - begin)
        self._file.seek(self._start + begin)
        if self._file.readinto(buffer) != len(buffer):
            raise ValueError(f"tensor {key!r} is cut off (truncated?)")
        return buffer

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _entry(key: str, entry: Any) -> tuple[str, tuple[int, ...], int, int]:
    """One header entry checked: ``(dtype, shape, begin, end)``; work linear in its size."""
    dtype, shape, offsets = (entry.get(k) if isinstance(entry, dict) else None
                             for k in ("dtype", "shape", "data_offsets"))
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise ValueError(f"tensor {key!r}: unknown dtype {dtype!r}")
    # type() is int, not isinstance: JSON's true and false are Python bools, which are ints.
    if not (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)):
        raise ValueError(f"tensor {key!r}: the shape is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise ValueError(f"tensor {key!r}: data_offsets is not a pair of integers [begin, end], begin <= end")
    count = 1
    for n in shape:  # the running product, as the reference's checked multiplication
        count *= n
        if n >= _COUNT_LIMIT or count >= _COUNT_LIMIT:
            raise ValueError(f"tensor {key!r}: the shape {_short(shape)} has more elements than a 64-bit count holds")
    bits = count * DTYPE_BITS[dtype]
    if bits % 8:
        raise ValueError(f"tensor {key!r}: {count} elements of {dtype} do not end on a byte boundary")
    if offsets[1] - offsets[0] != bits // 8:
        raise ValueError(f"tensor {key!r}: data_offsets do not match its shape and dtype")
    return dtype, tuple(shape), offsets[0], offsets[1]


def _short(shape: list[int]) -> str:
    text = str(shape)
    return text if len(text) <= 80 else text[:77] + "..."


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path,
                     metadata: Mapping[str, str] | None = None,
                     load: Callable[[str], torch.Tensor] | None = None,
                     raw: Mapping[str, tuple[str, list[int]]] | None = None) -> None:
    """Write ``tensors`` to ``path`` as safetensors, one tensor at a time; ``OSError`` on failure.

    Tensors are laid out by decreasing element size, then by name (as the ``safetensors`` package
    does, so every tensor is aligned to its element size); the header is padded to 8 bytes. With
    ``load``, ``tensors`` only give shapes and dtypes (e.g. ``meta`` tensors) and each tensor's data
    is ``load(key)``, asked for just before it is written: a streaming writer holds one tensor.
    ``raw`` gives ``(dtype name, shape)`` for keys copied as stored bytes (``load`` returns them as
    ``uint8``, e.g. :meth:`SafetensorsFile.get_raw`): dtypes the analysis cannot use pass through.
    """
    names = {v: k for k, v in DTYPES.items()}
    raw = raw or {}

    def width(key: str) -> int:
        return max(1, DTYPE_BITS[raw[key][0]] // 8) if key in raw else tensors[key].element_size()

    order = sorted(tensors, key=lambda k: (-width(k), k))
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key in order:
        if key in raw:
            dtype, shape = raw[key]
            size = _raw_size(dtype, shape)
        else:
            tensor = tensors[key]
            if tensor.dtype not in names:
                raise ValueError(f"tensor {key!r}: safetensors cannot store {tensor.dtype}")
            dtype, shape, size = names[tensor.dtype], list(tensor.shape), tensor.numel() * tensor.element_size()
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as file:
        file.write(len(text).to_bytes(8, "little"))
        file.write(text)
        for key in order:
            tensor = tensors[key] if load is None else load(key)
            if key in raw:
                expected = (torch.uint8, (_raw_size(*raw[key]),))
                if (tensor.dtype, tuple(tensor.reshape(-1).shape)) != expected:
                    raise ValueError(f"tensor {key!r}: loaded {tensor.numel()} {tensor.dtype} values, "
                                     f"the header needs {expected[1][0]} bytes")
            elif tensor.shape != tensors[key].shape or tensor.dtype != tensors[key].dtype:
                raise ValueError(f"tensor {key!r}: loaded {tensor.dtype} {tuple(tensor.shape)}, the header says "
                                 f"{tensors[key].dtype} {tuple(tensors[key].shape)}")
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            if flat.numel():
                file.write(flat.view(torch.uint8).numpy().data)


def _raw_size(dtype: str, shape: list[int]) -> int:
    count = 1
    for n in shape:
        count *= n
    return count * DTYPE_BITS[dtype] // 8
