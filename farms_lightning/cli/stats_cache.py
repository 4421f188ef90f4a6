"""``--cache DIR``: each tensor's statistics on disk, keyed by its content, the settings and the version.

An interrupted analysis resumes where it stopped, and ``prune`` after ``analyze`` (same settings)
reuses the alphas instead of recomputing them. A key is the SHA-256 of the package version, the
analysis settings, the analysis device's kind, the layer's kind, dtype and shape, and the tensor's
bytes: a changed weight, setting or release never reuses an old entry. Entries are small JSON files
written atomically as each group of tensors is analysed (the cache is an output: the data-safety
rules apply, and a failed write is exit 5).

A cache is also an input, so nothing in it is trusted blindly. The folder is created ``0700`` and
entries ``0600`` whatever the umask. An entry is used only when the folder and the entry belong to
the current user and neither group nor others can write them (as ssh and git judge their files:
checked with ``fstat`` on the opened folder and entry, the entry opened relative to the folder,
never through a link, never blocking on a FIFO), and when it is strict JSON that names its own key,
matches its own checksum (an entry edited by hand) and holds statistics of the right types and
ranges (:func:`check_stats`). Anything else is a miss with a one-line warning naming the entry and
why, and the tensor is analysed again.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import math
import os
import stat
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from farms_lightning._version import __version__
from farms_lightning.engine.report import LAYER_STATUSES, LayerStats
from farms_lightning.files import strict_json
from farms_lightning.files.safe_io import (
    EXIT_OUTPUT,
    EXIT_USAGE,
    CLIError,
    atomic_write,
    output_errors,
    refuse_over_inputs,
    shown,
)
from farms_lightning.models.layers import LayerMatrix

#: Part of every key: raise it when a change alters the statistics without a new release.
CACHE_FORMAT = 4  # 2: too-small status; 3: entries name their key, checksum; 4: certified refinement
#: Failures that depend on the run (memory, device), not on the weights: never cached.
TRANSIENT = ("analysis error", "eigenvalue error")


#: An entry is a few hundred bytes; a larger file is not one.
MAX_ENTRY_BYTES = 1 << 16
_COUNTS = ("num_evals", "num_dropped", "num_params")
_POSITIVE = ("xmin", "lambda_max", "norm", "stable_rank")  # finite and > 0 where present
_FINITE = ("log_spectral_norm", "log_norm", "alpha_weighted", "log_alpha_norm", "entropy", "alpha_delta")


class StatsCache:
    """A folder of per-tensor statistics; ``hits`` and ``stored`` count this run's use of it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.hits = 0
        self.stored = 0
        self._unsafe_folder: str | None = None  # why the folder is not trusted, once known
        with output_errors(folder):
            self._fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))

    @classmethod
    def open(cls, folder: Path, inputs: Sequence[Path], reads: Sequence[Path]) -> StatsCache:
        """Check (never inside or over an input: exit 2) and create the folder ``0700`` (exit 5 if it cannot be)."""
        refuse_over_inputs(folder, inputs, reads, folder=True)
        with output_errors(folder):
            if os.path.lexists(folder) and not os.path.isdir(folder):
                raise CLIError(f"--cache {shown(folder)} exists and is not a folder", EXIT_USAGE, help_hint=False)
            if not os.path.isdir(os.path.dirname(os.path.realpath(folder))):
                raise CLIError(f"cannot write {shown(folder)}: the folder {shown(folder.parent)} does not exist",
                               EXIT_OUTPUT)
            try:
                os.mkdir(folder, 0o700)
                os.chmod(folder, 0o700)  # the umask may have taken the owner's bits too
            except FileExistsError:
                pass  # an existing cache (another rank may just have made it): judged when read
        return cls(folder)

    def key(self, layer: LayerMatrix, tensor: torch.Tensor, settings: dict[str, Any], device: torch.device) -> str:
        digest = hashlib.sha256()
        # The random baseline does not change a layer's own statistics: entries with one serve runs
        # without one (``get`` asks for it when a run needs it).
        own = {k: v for k, v in settings.items() if k != "random_baseline"}
        described = {"version": __version__, "format": CACHE_FORMAT, "settings": own, "device": device.type, "kind": layer.kind, "split": layer.split,
                     "type": layer.module_type, "dtype": str(tensor.dtype), "shape": list(tensor.shape)}
        digest.update(json.dumps(described, sort_keys=True, default=str).encode())
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        if flat.numel():
            digest.update(flat.view(torch.uint8).numpy().data)
        return digest.hexdigest()

    def get(self, key: str, name: str, needs_baseline: bool = False) -> LayerStats | None:
        """The cached statistics, or ``None``; a fitted entry without a baseline misses when one is needed.

        An entry that exists but is not trusted or not valid is a miss with a warning on stderr.
        """
        entry = f"{key}.json"
        if self._folder_unsafe():
            return None
        try:
            data = strict_json.loads(self._read_entry(entry), f"the entry {entry}")
            stats = LayerStats(**{**check_entry(data, key), "name": name})
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            _warn(f"cache entry {shown(self.folder / entry)} not used ({_why(error)}); analysing again")
            return None
        if needs_baseline and stats.status == "ok" and stats.alpha_random is None:
            return None
        self.hits += 1
        return stats

    def put(self, key: str, stats: LayerStats) -> None:
        if stats.status == "failed" and stats.reason.startswith(TRANSIENT):
            return
        if self._folder_unsafe():
            return  # nothing written where others could change it
        data = dataclasses.asdict(stats)
        del data["name"]  # tied copies and renamed checkpoints reuse the entry under their own name
        data["shape"] = list(data["shape"])
        data = strict_json.finite(data)
        text = strict_json.dumps({**data, "key": key, "checksum": _checksum(data, key)})
        entry = f"{key}.json"
        try:  # an entry that failed its checks (a link, another's file) is replaced, never written through
            os.unlink(entry, dir_fd=self._fd)
        except FileNotFoundError:
            pass
        except OSError as error:
            _warn(f"could not write the cache entry {shown(self.folder / entry)} ({_why(error)})")
            return
        try:
            atomic_write(self.folder / entry, lambda tmp: _write_private(tmp, text))
        except CLIError as error:
            if error.code == EXIT_OUTPUT:  # a failed write (full disk): the command fails, as for any output
                raise
            _warn(f"could not write the cache entry {shown(self.folder / entry)} ({error})")
            return
        self.stored += 1

    def _folder_unsafe(self) -> bool:
        """Whether the folder may not be trusted (warned once): not the user's, or writable by others."""
        if self._unsafe_folder is None:
            why = _untrusted(os.fstat(self._fd))
            self._unsafe_folder = why
            if why:
                _warn(f"cache folder {shown(self.folder)} {why}: its entries are neither used nor written "
                      f"(chmod go-w, or choose another --cache)")
        return bool(self._unsafe_folder)

    def _read_entry(self, entry: str) -> bytes:
        """The entry's bytes, opened in the checked folder without following a link or blocking."""
        try:
            fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0),
                         dir_fd=self._fd)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise ValueError("it is a symbolic link, which is never followed") from None
            raise
        with os.fdopen(fd, "rb") as file:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ValueError("it is not a regular file")
            why = _untrusted(info)
            if why:
                raise ValueError(f"the entry {why}")
            data = file.read(MAX_ENTRY_BYTES + 1)
        if len(data) > MAX_ENTRY_BYTES:
            raise ValueError(f"larger than {MAX_ENTRY_BYTES} bytes")
        return data


def check_entry(data: Any, key: str) -> dict[str, Any]:
    """The :class:`LayerStats` fields (without ``name``) of a parsed entry, or ``ValueError`` saying why not."""
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    data = dict(data)
    claimed, checksum = data.pop("key", None), data.pop("checksum", None)
    if claimed != key:
        raise ValueError(f"it claims the key {str(claimed)[:80]!r}, not its own")
    if checksum != _checksum(data, key):
        raise ValueError("its checksum does not match: edited or damaged")
    fields = {f.name for f in dataclasses.fields(LayerStats)} - {"name"}
    if set(data) != fields:
        odd = sorted(set(data) ^ fields)[:3]
        raise ValueError(f"its fields differ from a layer's statistics ({', '.join(map(str, odd))})")
    check_stats(data)
    return {**data, "shape": tuple(data["shape"])}


def check_stats(data: dict[str, Any]) -> None:
    """Types and ranges of one layer's statistics (``ValueError`` naming the first wrong field)."""
    def number(field: str, low: float | None = None, above: bool = True) -> None:
        value = data[field]
        if value is None:
            return
        if type(value) not in (int, float) or not math.isfinite(value):
            raise ValueError(f"{field} is {_short(value)}, not a finite number")
        if low is not None and (value <= low if above else value < low):
            raise ValueError(f"{field} is {value}, not {'>' if above else '>='} {low}")

    if not isinstance(data["type"], str) or not isinstance(data["reason"], str):
        raise ValueError("type and reason must be strings")
    if data["status"] not in LAYER_STATUSES:
        raise ValueError(f"status is {_short(data['status'])}, not one of {', '.join(LAYER_STATUSES)}")
    shape = data["shape"]
    if not (isinstance(shape, list) and len(shape) <= 8 and all(type(n) is int and n >= 0 for n in shape)):
        raise ValueError(f"shape is {_short(shape)}, not a list of non-negative integers")
    for field in _COUNTS:
        if type(data[field]) is not int or data[field] < 0:
            raise ValueError(f"{field} is {_short(data[field])}, not a non-negative integer")
    if (data["alpha"] is None) == (data["status"] == "ok"):
        raise ValueError(f"alpha is {_short(data['alpha'])} for status {data['status']!r}")
    number("alpha", 1.0)
    number("alpha_random", 1.0)
    number("alpha_random_spread", 0.0, above=False)
    number("D", 0.0, above=False)
    if data["D"] is not None and data["D"] > 1:
        raise ValueError(f"D is {data['D']}, not a distance between 0 and 1")
    for field in _POSITIVE:
        number(field, 0.0)
    for field in _FINITE:
        number(field)


def _checksum(data: dict[str, Any], key: str) -> str:
    """SHA-256 of the entry's canonical text: finds an entry edited by hand (a forger who may write
    the folder could recompute it; that is what the ownership check is for)."""
    text = json.dumps({**data, "key": key}, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _untrusted(info: os.stat_result) -> str:
    """Why a folder or entry with this ``fstat`` may not be trusted, or ``""``."""
    if info.st_uid != os.geteuid():
        return f"belongs to another user (uid {info.st_uid})"
    writers = [who for who, bit in (("its group", stat.S_IWGRP), ("others", stat.S_IWOTH)) if info.st_mode & bit]
    return f"is writable by {' and '.join(writers)}" if writers else ""


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to the new temporary file ``path``, ``0600`` before any byte is in it."""
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW)
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        os.fchmod(fd, 0o600)
        file.write(text)


def _why(error: BaseException) -> str:
    return error.strerror if isinstance(error, OSError) and error.strerror else str(error)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _warn(message: str) -> None:
    print(f"farms-lightning: warning: {message}", file=sys.stderr)
