"""Temporary names, opening files without trusting a name, and cleaning up after a killed run.

The lowest layer of the files wing: plain ``OSError`` only (:mod:`~farms_lightning.files.safe_io`
turns them into exit codes).

- :func:`create_temp` makes a new file inside a new private folder (mode ``0700``, created with
  ``mkdir``, which never follows a link) beside a target: nobody else can swap the file for a link
  between its creation and the writer opening it by name. ``create_temp(..., folder=True)`` makes a
  plain new folder, for outputs that are folders.
- Temporary names carry the host and the process id (``.farms-tmp-<host>-<pid>-<random>``), so
  :func:`remove_stale_temps` can tell a killed run's leftovers (its process is gone, or they are a
  day old) from a concurrent run's work in progress, and removes only the former.
- :func:`open_regular` opens a file to read without blocking (a FIFO named ``vocab.txt``), optionally
  without following a link, and checks what was opened, not what the name pointed to a moment ago.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import re
import secrets
import shutil
import socket
import stat
import time
from pathlib import Path

#: Prefix of temporary files and folders: short, ASCII, so the name fits however long the target's is.
TEMP_PREFIX = ".farms-tmp-"
#: A leftover of another host, or of a process id in use again, is removed once this old (seconds).
STALE_AFTER_S = 24 * 3600
#: The name of the file inside a private temporary folder (the target's suffix is added).
_INNER = "w"
# ``.farms-tmp-<host>-<pid>-<random>[suffix]``; earlier versions wrote ``.farms-tmp-<random>[suffix]``.
_NAME = re.compile(re.escape(TEMP_PREFIX) + r"(?:([0-9a-f]{6})-(\d+)-)?[0-9a-f]{8}(?:\.[^/]*)?")
_KINDS = ((stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
          (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"), (stat.S_ISLNK, "symbolic link"))


def file_kind(mode: int) -> str:
    """What a ``st_mode`` is, in words: ``"regular file"``, ``"folder"``, ``"FIFO"``, ``"symbolic link"``..."""
    return next((name for test, name in _KINDS if test(mode)), "regular file" if stat.S_ISREG(mode) else "special file")


def host_tag() -> str:
    """Six hex digits naming this host (a process id means something on its own host only)."""
    return hashlib.sha256(socket.gethostname().encode("utf-8", "surrogateescape")).hexdigest()[:6]


def temp_name(suffix: str = "") -> str:
    """A new temporary name: the prefix, the host, the process id, 8 random hex digits, ``suffix``."""
    suffix = suffix if suffix.isascii() and len(suffix) <= 16 and "/" not in suffix else ""
    return f"{TEMP_PREFIX}{host_tag()}-{os.getpid()}-{secrets.token_hex(4)}{suffix}"


def create_temp(parent: Path, suffix: str, *, folder: bool = False) -> Path:
    """A new temporary file (or, with ``folder``, folder) in ``parent``; never an existing name.

    A file is made with ``O_CREAT | O_EXCL | O_NOFOLLOW`` inside a new private folder, so its name
    stays this process's until it is renamed away; permissions ``0666`` (folder ``0777``) less the
    umask, as a plain write gives. Remove it with :func:`remove_temp`.
    """
    for _ in range(100):
        path = parent / temp_name()  # a folder either way: the file inside gets the suffix
        try:
            os.mkdir(path, 0o777 if folder else 0o700)  # the umask applies, as to a plain mkdir
        except FileExistsError:
            continue
        if folder:
            return path
        inner = path / (_INNER + (suffix if suffix.isascii() and len(suffix) <= 16 else ""))
        try:
            os.close(os.open(inner, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666))
        except BaseException:
            remove_tree(path)
            raise
        return inner
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(parent))


def remove_temp(path: Path) -> None:
    """Remove what :func:`create_temp` made (a file with its private folder, or a folder), quietly."""
    if path.parent.name.startswith(TEMP_PREFIX) and path.name.startswith(_INNER):
        path = path.parent
    remove_tree(path)


def remove_tree(path: Path) -> None:
    """Remove a file, a link (not what it points to) or a folder tree, quietly (links inside are
    removed, never followed: :func:`shutil.rmtree` works on file descriptors)."""
    with contextlib.suppress(OSError):
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)


def remove_stale_temps(folder: Path, now: float | None = None) -> list[Path]:
    """Remove the temporary files and folders a killed run of this package left in ``folder``.

    Removed: names of this package's form, owned by the current user, whose process (on this host)
    no longer runs, or which have not changed for :data:`STALE_AFTER_S`. A concurrent run's
    temporaries (its process alive) are kept. Best effort: a folder that cannot be listed is skipped.

    Returns:
        The paths removed.
    """
    now = time.time() if now is None else now
    removed: list[Path] = []
    try:
        entries = [entry for entry in os.scandir(folder) if _NAME.fullmatch(entry.name)]
    except OSError:
        return removed
    here = host_tag()
    for entry in entries:
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if info.st_uid != os.geteuid():
            continue
        host, pid = _NAME.fullmatch(entry.name).groups()  # type: ignore[union-attr]
        dead = host == here and pid is not None and not _alive(int(pid))
        if dead or now - info.st_mtime > STALE_AFTER_S:
            remove_tree(Path(entry.path))
            removed.append(Path(entry.path))
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it runs, as another user
        return True
    return True


class NotRegularFile(OSError):
    """:func:`open_regular` found a FIFO, device, socket or folder where a file was expected."""


def open_regular(path: Path, *, follow: bool = True) -> io.BufferedReader:
    """Open ``path`` to read, refusing (``OSError``) anything but a regular file, without blocking.

    ``O_NONBLOCK`` keeps a FIFO from blocking the open; the check is on the opened descriptor
    (``fstat``), so a name swapped for a FIFO or a device after a check is still refused. With
    ``follow=False`` a link is refused too (``O_NOFOLLOW``).
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as error:
        if error.errno == errno.ELOOP and not follow:
            raise OSError(errno.ELOOP, "a symbolic link, not followed", str(path)) from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(errno.EINVAL, f"not a regular file but a {file_kind(mode)}", str(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
