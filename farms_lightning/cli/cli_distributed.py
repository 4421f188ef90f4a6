"""The command line's run-time: analysis device, memory bound, and running under ``torchrun``.

Under ``torchrun --nproc-per-node N`` (``WORLD_SIZE > 1`` in the environment) the CLI joins a process
group (gloo on CPU, nccl on GPU), each rank analyses its share of the layers (the rule of
:func:`farms_lightning.engine.distributed.local_share`), the statistics are gathered, and rank 0 writes the
report. Every step that can fail is followed by :func:`together`: the ranks all-reduce an error flag
(the largest exit code) behind a barrier, so a failure on any rank makes every rank stop with the same
exit code, and none waits forever. Without ``torchrun`` all of this is a plain single process.

SIGINT and SIGTERM (:func:`stop_on_signals`) raise :class:`Interrupted` where the command is, so every
cleanup runs (temporary files and folders removed) and the command exits ``128 +`` the signal's
number, as shells report it: 130 for SIGINT, 143 for SIGTERM. A rank whose peer stopped (killed,
crashed) gets an error from the collective: one line (:class:`RankLost`, exit 1), not a traceback.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import threading
import traceback
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

from farms_lightning.engine.distributed import distributed_context
from farms_lightning.files.safe_io import EXIT_USAGE, CLIError

T = TypeVar("T")
#: Environment variable naming the default ``--device`` (e.g. ``cpu`` on a shared GPU machine).
DEVICE_VARIABLE = "FARMS_LIGHTNING_DEVICE"
EXIT_INTERNAL = 1
#: Weights analysed together at most (one tensor when larger): enough to keep threads busy on small layers.
GROUP_BYTES = 32 << 20
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class RankFailed(CLIError):
    """Another rank failed: this rank stops with its exit code (the failing rank printed why)."""


class RankLost(CLIError):
    """A collective failed because another rank is gone (killed or crashed): exit 1, one line."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived. A ``BaseException``, like ``KeyboardInterrupt``: no ``except
    Exception`` stops it, every ``except BaseException`` cleanup and ``finally`` runs on its way out."""

    def __init__(self, signum: int) -> None:
        self.code = 128 + signum  # 130 for SIGINT, 143 for SIGTERM, as shells report them
        self.help_hint = False
        super().__init__(f"stopped by {signal.Signals(signum).name} (exit code {self.code}); temporary files "
                         f"removed, no partial output left")


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Inside, SIGINT and SIGTERM raise :class:`Interrupted`; the previous handlers are restored after.

    Only the first signal raises: one arriving during the cleanup it started is ignored, so the
    cleanup completes. Outside the main thread (where handlers cannot be set) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def handler(signum: int, frame: object) -> None:
        if not received:
            received.append(signum)
            raise Interrupted(signum)

    previous = {number: signal.signal(number, handler) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


@contextlib.contextmanager
def _collective() -> Iterator[None]:
    """A failed collective (gloo/nccl raise ``RuntimeError`` when a peer is gone) as one line."""
    try:
        yield
    except RuntimeError as error:
        rank, _ = distributed_context()
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        raise RankLost(f"rank {rank}: lost contact with another rank (stopped or crashed), so this one stops "
                       f"too; nothing was written ({first})", EXIT_INTERNAL) from None


def parse_size(text: str) -> int:
    """``"8GiB"``, ``"512MiB"``, ``"1.5GB"`` or plain bytes, as bytes (``ValueError`` otherwise)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"not a size: {text!r} (e.g. 8GiB, 512MiB, 2GB)")
    size = int(float(match.group(1)) * _UNITS[unit])  # type: ignore[index]
    if size <= 0:
        raise ValueError(f"not a positive size: {text!r}")
    return size


def resolve_device(text: str | None) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``; under torchrun ``cuda`` is the rank's local GPU. A CUDA
    device without CUDA is a usage error (exit 2). Default: the ``FARMS_LIGHTNING_DEVICE``
    environment variable, else cuda when available."""
    if text is None:
        text = os.environ.get(DEVICE_VARIABLE) or ("cuda" if torch.cuda.is_available() else "cpu")
    match = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", text)
    if match is None or (match.group(1) == "cpu" and match.group(2)):
        raise CLIError(f"--device must be cpu, cuda or cuda:N, got {text!r}", EXIT_USAGE)
    if match.group(1) == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise CLIError(f"--device {text}: CUDA is not available here (this torch build or machine has no "
                       f"GPU); use --device cpu", EXIT_USAGE)
    index = int(match.group(2)) if match.group(2) else int(os.environ.get("LOCAL_RANK", "0"))
    if index >= torch.cuda.device_count():
        raise CLIError(f"--device {text}: there are {torch.cuda.device_count()} CUDA device(s)", EXIT_USAGE)
    return torch.device("cuda", index)


def group_budget(device: torch.device, max_memory: int | None, largest: int) -> int:
    """Bytes of weights to hold on ``device`` at once, so that with the solver's batches the working
    set stays within ``max_memory`` (default on a GPU: 90% of its free memory; on CPU: no bound
    beyond the default group). Exit 2 when even the largest tensor does not fit."""
    from farms_lightning.engine.spectra import SOLVER_BYTES_PER_WORKER

    workers = torch.get_num_threads() if device.type == "cpu" else 1
    # Per batch: the windows in the weights' dtype, in float64, the Gram matrices and eigvalsh's workspace.
    solver = SOLVER_BYTES_PER_WORKER * workers
    if max_memory is None and device.type == "cuda":
        max_memory = int(0.9 * torch.cuda.mem_get_info(device)[0])
    if max_memory is None:
        return GROUP_BYTES
    budget = max_memory - solver
    if budget < largest:
        raise CLIError(f"--max-memory {max_memory} bytes is too small: the largest tensor takes {largest} bytes "
                       f"and the solver's batches {solver}; give at least {largest + solver} bytes "
                       f"(e.g. {-(-(largest + solver) // 2**20)}MiB)", EXIT_USAGE)
    return budget if device.type == "cuda" else min(budget, max(GROUP_BYTES, largest))


@contextlib.contextmanager
def process_group(device_text: str | None) -> Iterator[None]:
    """Join torchrun's process group when launched by it (gloo on CPU, nccl on GPU); else nothing."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        yield
        return
    device = resolve_device(device_text)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        with contextlib.suppress(Exception):  # after a lost rank the group may be broken already
            dist.destroy_process_group()


def together(step: Callable[[], T]) -> T:
    """Run ``step`` on every rank; when it fails on any rank, every rank raises.

    The failing rank raises its own error; the others a :class:`RankFailed` with the same exit code.
    An unexpected exception prints its traceback on its rank and counts as exit code 1.
    """
    rank, world_size = distributed_context()
    if world_size == 1:
        return step()
    code, error = 0, None
    try:
        result = step()
    except CLIError as failure:
        code, error = failure.code, failure
    except Exception as failure:  # noqa: BLE001 - reported here, then every rank stops
        traceback.print_exc()
        code, error = EXIT_INTERNAL, CLIError(f"rank {rank}: internal error: {failure!r}", EXIT_INTERNAL)
    flag = torch.tensor([code], device=_collective_device())
    with _collective():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        dist.barrier()
    worst = int(flag.item())
    if error is not None:
        raise error
    if worst:
        raise RankFailed(f"another rank failed (exit code {worst}); nothing was written", worst)
    return result


def gather(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order (``[value]`` outside a process group)."""
    _, world_size = distributed_context()
    if world_size == 1:
        return [value]
    out: list[Any] = [None] * world_size
    with _collective():
        dist.all_gather_object(out, value)
    return out


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    _, world_size = distributed_context()
    if world_size == 1:
        return value
    box = [value]
    with _collective():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def print_error(prog: str, error: CLIError | Interrupted) -> None:
    """One line on stderr; under torchrun prefixed by the rank, and nothing for :class:`RankFailed`
    except on rank 0."""
    rank, world_size = distributed_context()
    if isinstance(error, RankFailed) and rank != 0:
        return
    where = f"[rank {rank}] " if world_size > 1 else ""
    hint = f" (see {prog} --help)" if error.help_hint else ""
    print(f"{where}{prog}: error: {error}{hint}", file=sys.stderr)
