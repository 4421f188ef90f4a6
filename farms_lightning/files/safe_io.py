"""Data-safe file I/O for the command line: exit codes per operation, atomic writes, no output over an input.

Every read and every write says which side it is on, so any ``OSError`` (a missing permission, a full
disk, a name too long) becomes one line and the documented exit code: :func:`input_errors` maps it to
3, :func:`output_errors` to 5 (also the safetensors and torch writers' own disk errors). Mapping per
operation, not in one global handler, keeps the codes right where reads and writes interleave.

Every output goes through :func:`atomic_write` (a temporary file in the target's folder, flushed and
fsynced, then renamed over the target: a failure leaves the previous file intact and no temporary file
behind) or :func:`atomic_folder` (a folder built beside the target and renamed into place at the end;
its steps :func:`new_folder_beside`, :func:`commit_folder` and :func:`discard` can be called apart).
A write lands on a regular file or a new name, never through a link and never on a device, FIFO or
socket (:class:`UnsafeTarget`). :func:`check_output` refuses, before any work, an output that would
land on one of the inputs, that is a link or a special file, or that cannot be made
(:func:`refuse_over_inputs` is the overlap rule alone), and removes what a killed run left beside it
(:func:`~farms_lightning.files.temp_files.remove_stale_temps`); :func:`write_stdout` prints.

Example (a command that writes a figure)::

    check_output(out, [args.path], weights.sources, report=True)   # exit 2 if out is an input
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png"))  # exit 5 on failure, old file kept
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import sys
from pathlib import Path
from typing import Callable, Iterator, Sequence

from farms_lightning.files.temp_files import TEMP_PREFIX, create_temp, file_kind, remove_stale_temps, remove_temp

__all__ = ["EXIT_INPUT", "EXIT_OUTPUT", "EXIT_USAGE", "TEMP_PREFIX", "CLIError", "UnsafeTarget", "atomic_folder",
           "atomic_write", "check_output", "check_target", "commit_folder", "discard", "input_errors",
           "new_folder_beside", "output_errors", "reason", "refuse_over_inputs", "shown", "write_stdout",
           "write_text"]

EXIT_USAGE, EXIT_INPUT, EXIT_OUTPUT = 2, 3, 5


class CLIError(Exception):
    """A clear, expected failure: its message goes to stderr and ``code`` becomes the exit status."""

    def __init__(self, message: str, code: int, *, help_hint: bool | None = None) -> None:
        super().__init__(message)
        self.code = code
        #: Point to ``--help`` after the message (default: for usage errors).
        self.help_hint = code == EXIT_USAGE if help_hint is None else help_hint


class UnsafeTarget(CLIError):
    """The target of a write is a link, or exists and is not a regular file: nothing is written.

    Exit code 2. A caller for which the target is optional (a cache entry) catches it and goes on.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_USAGE, help_hint=False)


def check_target(target: Path | str, *, label: Path | str | None = None, folder: bool = False) -> os.stat_result | None:
    """The ``lstat`` of a write's target, or ``None`` when it does not exist.

    Raises:
        UnsafeTarget: ``target`` is a symbolic link (dangling or not: it is never followed), or
            exists and is not a regular file (with ``folder``: not a folder).
    """
    try:
        info = os.lstat(target)
    except FileNotFoundError:
        return None
    name = shown(label or target)
    if stat.S_ISLNK(info.st_mode):
        raise UnsafeTarget(f"{name} is a symbolic link: refusing to write through it (remove the link or "
                           f"choose another name)")
    if not (stat.S_ISDIR(info.st_mode) if folder else stat.S_ISREG(info.st_mode)):
        raise UnsafeTarget(f"{name} exists and is a {file_kind(info.st_mode)}, not a "
                           f"{'folder' if folder else 'regular file'}: refusing to replace it")
    return info


def shown(path: Path | str) -> str:
    """``path`` as printable text: bytes that are not UTF-8 (kept by Python as surrogates) as ``\\xNN``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def reason(error: BaseException) -> str:
    """A short description of an I/O error: the OS's words for it where there are some."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = str(error)
    code = re.search(r"os error (\d+)", text)  # safetensors (Rust) reports "... (os error 28)"
    if code:
        return os.strerror(int(code.group(1)))
    if "inline_container" in text or "PytorchStreamWriter" in text:  # torch's zip writer: a short write
        return f"the torch writer failed, e.g. the disk is full or a file size limit was reached ({_line(text)})"
    return _line(text) or type(error).__name__


def _line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0][:200]


def _is_write_error(error: BaseException) -> bool:
    """Errors the weight writers raise for a failed write (not programming errors)."""
    if isinstance(error, OSError):
        return True
    if type(error).__name__ == "SafetensorError":  # safetensors' writer: "I/O error: No space left ..."
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        mark in text for mark in ("inline_container", "PytorchStreamWriter", "file write failed", "unexpected pos"))


@contextlib.contextmanager
def input_errors(path: Path | str) -> Iterator[None]:
    """An ``OSError`` inside (reading ``path``) becomes :class:`CLIError` with exit code 3."""
    try:
        yield
    except OSError as error:
        raise CLIError(f"cannot read {shown(path)}: {reason(error)}", EXIT_INPUT) from None


@contextlib.contextmanager
def output_errors(path: Path | str) -> Iterator[None]:
    """A failed write inside (of ``path``) becomes :class:`CLIError` with exit code 5."""
    try:
        yield
    except CLIError:
        raise
    except Exception as error:  # noqa: BLE001 - narrowed by _is_write_error, everything else re-raised
        if not _is_write_error(error):
            raise
        raise CLIError(f"cannot write {shown(path)}: {reason(error)}", EXIT_OUTPUT) from None


def check_output(output: Path, inputs: Sequence[Path], reads: Sequence[Path] = (), *, folder: bool = False,
                 report: bool = False) -> None:
    """Refuse, before any work, an output that would write over an input, or that cannot be made.

    Args:
        output: the file (or, with ``folder=True``, the folder) the command will write.
        inputs: the paths the user named (files or folders).
        reads: every file the command reads (the shards of a folder, its index).
        folder: the output is a folder; it must not exist, or be an empty folder.
        report: a report may lie inside an input folder (``analyze dir -o dir/report.json``),
            though never on a file that is read; other outputs may not.

    Raises:
        CLIError: exit 2 for an output that is, links to or lies inside an input (or holds one) or
            has the wrong kind; exit 5 when its folder does not exist or cannot be examined.
    """
    refuse_over_inputs(output, inputs, reads, folder=folder, report=report)
    with output_errors(output):
        target = Path(os.path.realpath(output))
        info = os.lstat(output) if os.path.lexists(output) else None
        if not os.path.isdir(target.parent):
            raise CLIError(f"cannot write {shown(output)}: the folder {shown(target.parent)} does not exist",
                           EXIT_OUTPUT)
        if info is not None and stat.S_ISLNK(info.st_mode):
            raise CLIError(f"--output {shown(output)} is a symbolic link: refusing to write through it (remove the "
                           f"link or give another name)", EXIT_USAGE, help_hint=False)
        if folder and info is not None and not (stat.S_ISDIR(info.st_mode) and not os.listdir(output)):
            raise CLIError(f"--output {shown(output)} already exists: the output folder must be new or empty "
                           f"(nothing in an existing folder is replaced)", EXIT_USAGE, help_hint=False)
        if not folder and info is not None and stat.S_ISDIR(info.st_mode):
            raise CLIError(f"--output {shown(output)} is a folder; give a file name", EXIT_USAGE, help_hint=False)
        if not folder and info is not None and not stat.S_ISREG(info.st_mode):
            raise CLIError(f"--output {shown(output)} is a {file_kind(info.st_mode)}, not a regular file: refusing "
                           f"to replace it (to print, leave out --output)", EXIT_USAGE, help_hint=False)
    remove_stale_temps(Path(output).parent)  # what a killed run (SIGKILL) left beside this output


def refuse_over_inputs(output: Path, inputs: Sequence[Path], reads: Sequence[Path] = (), *, folder: bool = False,
                       report: bool = False) -> None:
    """The overlap rule of :func:`check_output` alone (e.g. for a cache folder that may exist already).

    Raises:
        CLIError: exit 2 when ``output`` is, links to or lies inside an input, or (``folder``) holds one.
    """
    with output_errors(output):
        target = Path(os.path.realpath(output))  # follows symlinks, also of the output itself
        for source in inputs:
            real = Path(os.path.realpath(source))
            if real == target:
                _refuse(output, f"is the input {shown(source)}")
            if os.path.isdir(real) and real in target.parents and not report:
                _refuse(output, f"lies inside the input folder {shown(source)}")
            if folder and target in real.parents:
                _refuse(output, f"holds the input {shown(source)}")
        if os.path.exists(output):
            for source in reads:
                if os.path.samefile(output, source):  # the same file by another name: a link, a hard link
                    _refuse(output, f"is the same file as the input {shown(source)}")


def _refuse(output: Path, why: str) -> None:
    raise CLIError(f"--output {shown(output)} {why}: refusing to write over an input", EXIT_USAGE, help_hint=False)


def atomic_write(target: Path, write: Callable[[Path], object], *, label: Path | None = None) -> None:
    """Write ``target`` by ``write(temporary path)`` in its folder, then fsync and rename it into place.

    The temporary file (created exclusively, in a new private folder beside ``target``, see
    :func:`~farms_lightning.files.temp_files.create_temp`) keeps the target's suffix when short, for
    writers that read the format from it, and gets the permissions a plain write would give: those of
    the file it replaces, else ``0666`` less the umask. The rename is onto the name ``target`` in its
    own folder: a link is never followed, and a target that is a link or not a regular file is
    refused before anything is written. ``label`` names the output in error messages.

    Raises:
        UnsafeTarget: exit 2, ``target`` is a link or a special file (see :func:`check_target`).
        CLIError: exit 5 when anything else fails; the previous ``target`` is intact, nothing is left over.
    """
    target = Path(target)
    with output_errors(label or target):
        old = check_target(target, label=label)
        tmp: Path | None = None
        try:
            tmp = create_temp(target.parent, target.suffix)
            write(tmp)
            if old is not None:  # after writing: the old mode may be read-only
                os.chmod(tmp, stat.S_IMODE(old.st_mode))
            _fsync(tmp)
            os.replace(tmp, target)
        except BaseException:
            if tmp is not None:
                remove_temp(tmp)
            raise
        remove_temp(tmp.parent)  # the private folder, empty now
        _sync_folder(target.parent)


def write_text(target: Path, text: str) -> None:
    """:func:`atomic_write` of UTF-8 text; what UTF-8 cannot encode (a lone surrogate in a tensor
    name) is written as a backslash escape, ``\\udce9``."""
    atomic_write(target, lambda tmp: tmp.write_text(text, encoding="utf-8", errors="backslashreplace"))


def write_stdout(text: str) -> None:
    """Print ``text``; a closed pipe (``... | head``) or a full disk behind a redirection exits 5."""
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    text = text.encode(encoding, "backslashreplace").decode(encoding)  # e.g. a lone surrogate in a tensor name
    try:
        with output_errors("the standard output"):
            sys.stdout.write(text)
            sys.stdout.flush()
    except CLIError:
        # Nothing more can reach the reader: send what is left in the buffer nowhere, so that
        # Python's own flush at exit does not fail again with a traceback.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise


@contextlib.contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """A new folder beside ``target`` to fill; renamed to ``target`` at the end, removed on any failure.

    ``target`` must not exist or be an empty folder (see :func:`check_output`). Built from
    :func:`new_folder_beside`, :func:`commit_folder` and :func:`discard`, for callers that must
    split the steps (e.g. several processes filling one folder, one of them renaming it).

    Raises:
        CLIError: exit 5 when the folder cannot be made or renamed into place.
    """
    tmp = new_folder_beside(target)
    try:
        yield tmp
        commit_folder(tmp, target)
    except BaseException:
        discard(tmp)
        raise


def new_folder_beside(target: Path) -> Path:
    """A new empty temporary folder in ``target``'s folder (same file system: the rename is atomic)."""
    with output_errors(target):
        return create_temp(Path(target).parent, "", folder=True)


def commit_folder(tmp: Path, target: Path) -> None:
    """Rename the filled folder ``tmp`` to ``target`` (an empty folder there is replaced; exit 5 else)."""
    with output_errors(target):
        check_target(target, folder=True)  # a link put there meanwhile is replaced by no rename, never followed
        _sync_folder(tmp)
        os.replace(tmp, target)  # replaces an empty folder; a non-empty one is an error (ENOTEMPTY)
        _sync_folder(Path(target).parent)


def discard(tmp: Path) -> None:
    """Remove a temporary file or folder, quietly (it is being given up after another error)."""
    remove_temp(tmp)


def _fsync(path: Path) -> None:
    """Flush a file's data to the disk (a failure here is a failed write)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_folder(path: Path) -> None:
    """Flush a folder's entries (the rename) to the disk, where the system allows it (best effort:
    some file systems refuse, and a folder without read permission cannot be opened)."""
    with contextlib.suppress(OSError):
        _fsync(path)
