"""Copying a model folder's other files (config, tokenizer, index) into an output, safely.

What is copied, and what is skipped with a warning on stderr, never followed nor opened:

- a regular file: copied (content, permissions, times);
- a link to a regular file: its content is copied (Hugging Face cache snapshots link every file to
  ``../../blobs``); the copy is a regular file;
- a folder: copied entry by entry, by the same rules;
- a link to a folder (``tz -> /usr/share/zoneinfo`` would copy files from outside the model), a
  dangling link, a FIFO (opening one to read blocks), a socket or a device: skipped;
- a temporary file or folder of this package (a killed run's): skipped silently.

Reads map to exit 3, writes to exit 5 (:mod:`farms_lightning.files.safe_io`).
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from pathlib import Path
from typing import Callable

from farms_lightning.files.safe_io import input_errors, output_errors, shown
from farms_lightning.files.temp_files import TEMP_PREFIX, file_kind, open_regular

_CHUNK = 1 << 20


def warn_skipped(label: Path, why: str) -> None:
    """The default report of a skipped entry: one line on stderr."""
    print(f"farms-lightning: warning: {shown(label)} not copied: {why}", file=sys.stderr)


def copy_into(source: Path, destination: Path, *, label: Path | None = None,
              skipped: Callable[[Path, str], None] = warn_skipped) -> None:
    """Copy a file or folder tree to the new name ``destination`` by the rules of this module.

    Args:
        source: the file, link or folder to copy.
        destination: a name that does not exist yet (inside a folder this command created).
        label: ``destination`` as the user should read it in messages (the final output's name).
        skipped: called with ``(label, reason)`` for every entry not copied.
    """
    label = label or destination
    with input_errors(source):
        info = os.lstat(source)
    if stat.S_ISLNK(info.st_mode):
        try:
            pointed = os.stat(source)
        except OSError:
            skipped(label, "a symbolic link whose target is missing or unreadable")
            return
        if not stat.S_ISREG(pointed.st_mode):
            skipped(label, f"a symbolic link to a {file_kind(pointed.st_mode)} (links to anything but a file are "
                           f"not followed)")
            return
        _copy_file(source, destination, label, follow=True, skipped=skipped)
    elif stat.S_ISDIR(info.st_mode):
        with output_errors(label):
            os.mkdir(destination)
        with input_errors(source):
            children = sorted(entry.name for entry in os.scandir(source))
        for name in children:
            if not name.startswith(TEMP_PREFIX):
                copy_into(source / name, destination / name, label=label / name, skipped=skipped)
    elif stat.S_ISREG(info.st_mode):
        _copy_file(source, destination, label, follow=False, skipped=skipped)
    else:
        skipped(label, f"a {file_kind(info.st_mode)}, not a regular file")


def _copy_file(source: Path, destination: Path, label: Path, *, follow: bool,
               skipped: Callable[[Path, str], None]) -> None:
    """Copy one regular file's content; the source is checked once opened (it may have been swapped)."""
    try:
        reader = open_regular(source, follow=follow)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.EINVAL):  # swapped for a link, a FIFO, a device meanwhile
            skipped(label, error.strerror or str(error))
            return
        with input_errors(source):
            raise
    with reader:
        info = os.fstat(reader.fileno())
        with output_errors(label):
            fd = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as writer:
            while True:
                with input_errors(source):
                    chunk = reader.read(_CHUNK)
                if not chunk:
                    break
                with output_errors(label):
                    writer.write(chunk)
            with output_errors(label):
                writer.flush()
                os.fchmod(writer.fileno(), stat.S_IMODE(info.st_mode))
                os.fsync(writer.fileno())
    with output_errors(label):
        os.utime(destination, ns=(info.st_atime_ns, info.st_mtime_ns), follow_symlinks=False)
