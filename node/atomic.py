"""Atomic file writes: a file is either the old one or the whole new one, never half.

The one helper every part of the project uses to write a file in place (bundles, shards,
reports, uploads, keys, manifests): a private temporary sibling, written and fsynced, is
renamed over the target and the folder is fsynced, so a crash or a full disk leaves the
previous file (or none) and no temporary behind. Standard library only: any layer may
import it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO


def fsync_folder(folder: Path) -> None:
    """Make a rename or a new entry in ``folder`` survive a crash."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary(path: Path) -> Path:
    """A hidden sibling whose name ends with the whole target name, so every suffix is kept
    (Keras and Matplotlib choose the format by it; Keras wants ``….weights.h5`` whole)."""
    return path.with_name(f".tmp-{secrets.token_hex(4)}-{path.name}")


@contextlib.contextmanager
def atomic_open(path: Path | str, mode: int = 0o644) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through: it replaces ``path`` (permissions ``mode``)
    only when the block ends without an exception, fsynced with its folder."""
    path = Path(path)
    temp = _temporary(path)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask does not narrow what was asked for
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def write_bytes(path: Path | str, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically."""
    with atomic_open(path, mode) as out:
        out.write(data)


def write_text(path: Path | str, text: str, mode: int = 0o644) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically."""
    write_bytes(path, text.encode("utf-8"), mode)


def write_with(path: Path | str, write: Callable[[Path], None], mode: int = 0o644) -> None:
    """Replace ``path`` with what ``write(temp_path)`` writes, for libraries that insist on
    a file name of their own (Keras, Matplotlib); the result is fsynced and renamed."""
    path = Path(path)
    temp = _temporary(path)
    try:
        write(temp)
        os.chmod(temp, mode)
        fd = os.open(temp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)
