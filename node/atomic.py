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


def create_exclusive(path: Path | str, data: bytes, mode: int = 0o600) -> bool:
    """Create ``path`` holding ``data`` (permissions ``mode`` from the start, whatever the
    umask) unless it exists; returns whether this call created it.

    For a file made once and then only read (a secret key, a salt): when several processes
    start at once, the first to link its whole, fsynced file wins and the others read that
    one; a reader never sees it empty or half written, and no one replaces it.
    """
    path = Path(path)
    temp = _temporary(path)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        try:
            os.link(temp, path)  # fails if the file exists: never replaces it
        except FileExistsError:
            return False
    finally:
        temp.unlink(missing_ok=True)
    fsync_folder(path.parent)
    return True


def private_folder(path: Path | str, mode: int = 0o700) -> Path:
    """Make the folder ``path`` (and missing parents) if missing; the folder itself gets
    ``mode`` (private to the node's user by default) whatever the umask. An existing folder
    keeps its permissions: the operator may have chosen them."""
    path = Path(path)
    if not path.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            path.mkdir(mode)
        except FileExistsError:
            return path  # made meanwhile by another process, with its own mode
        os.chmod(path, mode)  # the umask does not narrow what was asked for
        fsync_folder(path.parent)
    return path


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
