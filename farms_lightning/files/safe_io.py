"""Data-safe file I/O for the command line: exit codes per operation, atomic writes, no output over an input.

Every read and every write says which side it is on, so any ``OSError`` (a missing permission, a full
disk, a name too long) becomes one line and the documented exit code: :func:`input_errors` maps it to
3, :func:`output_errors` to 5 (also the safetensors and torch writers' own disk errors). Mapping per
operation, not in one global handler, keeps the codes right where reads and writes interleave.

Every output goes through :func:`atomic_write` (a temporary file in the target's folder, flushed and
fsynced, then renamed over the target: a failure leaves the previous file intact and no temporary file
behind) or :func:`atomic_folder` (a folder built beside the target and renamed into place at the end;
its steps :func:`new_folder_beside`, :func:`commit_folder` and :func:`discard` can be called apart).
:func:`check_output` refuses, before any work, an output that would land on one of the inputs or that
cannot be made (:func:`refuse_over_inputs` is the overlap rule alone); :func:`write_stdout` prints.

Example (a command that writes a figure)::

    check_output(out, [args.path], weights.sources, report=True)   # exit 2 if out is an input
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png"))  # exit 5 on failure, old file kept
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import stat
import sys
from pathlib import Path
from typing import Callable, Iterator, Sequence

EXIT_USAGE, EXIT_INPUT, EXIT_OUTPUT = 2, 3, 5
#: Prefix of temporary files and folders: short, ASCII, so the name fits however long the target's is.
TEMP_PREFIX = ".farms-tmp-"
_CHUNK = 1 << 20


class CLIError(Exception):
    """A clear, expected failure: its message goes to stderr and ``code`` becomes the exit status."""

    def __init__(self, message: str, code: int, *, help_hint: bool | None = None) -> None:
        super().__init__(message)
        self.code = code
        #: Point to ``--help`` after the message (default: for usage errors).
        self.help_hint = code == EXIT_USAGE if help_hint is None else help_hint


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
        exists = os.path.lexists(output)
        if not os.path.isdir(target.parent):
            raise CLIError(f"cannot write {shown(output)}: the folder {shown(target.parent)} does not exist",
                           EXIT_OUTPUT)
        if folder and exists and not (os.path.isdir(target) and not os.listdir(target)):
            raise CLIError(f"--output {shown(output)} already exists: the output folder must be new or empty "
                           f"(nothing in an existing folder is replaced)", EXIT_USAGE, help_hint=False)
        if not folder and os.path.isdir(target):
            raise CLIError(f"--output {shown(output)} is a folder; give a file name", EXIT_USAGE, help_hint=False)


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

    The temporary file has a short ASCII name (``.farms-tmp-<hex><suffix>``, the target's suffix kept
    when short, for writers that read the format from it) and the permissions a plain write would
    give: those of the file it replaces, else ``0666`` less the umask. A symlink at ``target`` is
    followed, so the file it points to is replaced. ``label`` names the output in error messages.

    Raises:
        CLIError: exit 5 when anything fails; the previous ``target`` is intact, nothing is left over.
    """
    with output_errors(label or target):
        final = Path(os.path.realpath(target))
        tmp = _create_temp(final.parent, final.suffix)
        try:
            write(tmp)
            with contextlib.suppress(FileNotFoundError):  # after writing: the old mode may be read-only
                os.chmod(tmp, stat.S_IMODE(os.stat(final).st_mode))
            _fsync(tmp)
            os.replace(tmp, final)
        except BaseException:
            _remove(tmp)
            raise
        _sync_folder(final.parent)


def write_text(target: Path, text: str) -> None:
    """:func:`atomic_write` of UTF-8 text."""
    atomic_write(target, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_stdout(text: str) -> None:
    """Print ``text``; a closed pipe (``... | head``) or a full disk behind a redirection exits 5."""
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
        return _create_temp(Path(os.path.realpath(target)).parent, "", folder=True)


def commit_folder(tmp: Path, target: Path) -> None:
    """Rename the filled folder ``tmp`` to ``target`` (an empty folder there is replaced; exit 5 else)."""
    with output_errors(target):
        final = Path(os.path.realpath(target))
        _sync_folder(tmp)
        os.replace(tmp, final)  # replaces an empty folder; a non-empty one is an error (ENOTEMPTY)
        _sync_folder(final.parent)


def discard(tmp: Path) -> None:
    """Remove a temporary file or folder, quietly (it is being given up after another error)."""
    _remove(tmp)


def copy_into(source: Path, destination: Path, *, label: Path | None = None) -> None:
    """Copy a file or folder tree (following links); reads map to exit 3, writes to exit 5."""
    with input_errors(source):
        is_dir = source.is_dir()
    if is_dir:
        with output_errors(label or destination):
            os.mkdir(destination)
        with input_errors(source):
            children = sorted(source.iterdir())
        for child in children:
            copy_into(child, destination / child.name, label=(label or destination) / child.name)
        return
    with input_errors(source), open(source, "rb") as reader:
        with output_errors(label or destination), open(destination, "wb") as writer:
            while True:
                with input_errors(source):
                    chunk = reader.read(_CHUNK)
                if not chunk:
                    break
                with output_errors(label or destination):
                    writer.write(chunk)
            with output_errors(label or destination):
                writer.flush()
                os.fsync(writer.fileno())
    with output_errors(label or destination):
        shutil.copystat(source, destination)


def _create_temp(parent: Path, suffix: str, *, folder: bool = False) -> Path:
    """A new file (or folder) in ``folder`` with a unique short name, permissions from the umask."""
    suffix = suffix if suffix.isascii() and len(suffix) <= 16 else ""
    for _ in range(100):
        path = parent / f"{TEMP_PREFIX}{secrets.token_hex(4)}{suffix}"
        try:
            if folder:
                os.mkdir(path, 0o777)  # the umask applies, as to a plain mkdir
            else:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(parent))


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


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)
