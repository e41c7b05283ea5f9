"""The instance store: DICOM files keyed by SOP Instance UID, written atomically."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from node.atomic import atomic_open, fsync_folder

UID_PATTERN = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
FOLDER_MODE = 0o700  # the store holds PHI: only the node's own user may enter it
FILE_MODE = 0o600  # as the spooled files that become instances (mkstemp makes them 0600)


class StoreError(OSError):
    """The store cannot take a file (disk full, not writable); nothing was kept."""

    def __init__(self, errno: int | None, strerror: str, key: str) -> None:
        super().__init__(errno, strerror)
        self.key = key

    def __str__(self) -> str:
        if self.key == ".":
            return self.strerror
        return f"cannot write {self.key} in the store: {self.strerror}"


def is_uid(value: object) -> bool:
    """Whether ``value`` is a valid DICOM UID (PS3.5 9.1): digits and dots, at most 64."""
    return isinstance(value, str) and len(value) <= 64 and UID_PATTERN.fullmatch(value) is not None


def check_uid(value: str, name: str = "UID") -> str:
    """Return ``value`` if it is a valid DICOM UID (so it is safe as a file name), else raise."""
    if not is_uid(value):
        raise ValueError(f"{name} is not a valid DICOM UID: {value!r}")
    return value


SPOOL = ".spool"  # datasets being received, one folder per receiving process
TEMPORARY_PREFIX = ".tmp-"  # node.atomic's temporary sibling of a file being written
FANOUT_DIGITS = 3  # 4096 folders: ten million instances is ~2,500 files a folder


class InstanceStore:
    """Files under ``root/abc/<SOPInstanceUID>.dcm``, where ``abc`` starts the UID's SHA-1.

    The hash spreads a study over many folders so none grows huge; the UID itself
    stays in the name so an administrator can find a file by hand. A SOP Instance UID
    that is not a valid DICOM UID (a UUID string, an over-long UID: some PACS hold
    them) is never part of a path: its file is ``root/abc/h<SHA-256 of the UID>.dcm``.
    The folders are made (and synced) once, by :meth:`prepare`, so a write syncs only
    its own folder; every folder is private (0700) and every file 0600.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def prepare(self) -> None:
        """Create the root and its fan-out folders durably (idempotent, run at start-up)."""
        if (self.root / ("f" * FANOUT_DIGITS)).is_dir():
            return
        try:
            self._make_folder(self.root)
            for index in range(16**FANOUT_DIGITS):
                (self.root / f"{index:0{FANOUT_DIGITS}x}").mkdir(FOLDER_MODE, exist_ok=True)
            fsync_folder(self.root)
        except OSError as exc:
            raise StoreError(
                exc.errno, f"cannot prepare the store at {self.root}: {exc.strerror}", "."
            ) from exc

    def key_for(self, sop_instance_uid: str) -> str:
        """The store key (relative path) of an instance: its UID as the file name when it
        is a valid DICOM UID, else a hash of it (``h`` and hex digits: never a UID)."""
        if not sop_instance_uid:
            raise ValueError("an instance without a SOPInstanceUID has no store key")
        encoded = sop_instance_uid.encode("utf-8", "surrogatepass")
        digest = hashlib.sha1(encoded).hexdigest()
        if is_uid(sop_instance_uid):
            return f"{digest[:FANOUT_DIGITS]}/{sop_instance_uid}.dcm"
        return f"{digest[:FANOUT_DIGITS]}/h{hashlib.sha256(encoded).hexdigest()}.dcm"

    def path(self, key: str) -> Path:
        """The absolute path of a store key."""
        if ".." in Path(key).parts or Path(key).is_absolute():
            raise ValueError(f"not a store key: {key!r}")
        return self.root / key

    def exists(self, key: str) -> bool:
        """Whether a file is stored under ``key``."""
        return self.path(key).is_file()

    def read(self, key: str) -> bytes:
        """The stored bytes under ``key``."""
        return self.path(key).read_bytes()

    def write(self, key: str, parts: list[bytes]) -> int:
        """Write ``parts`` under ``key`` durably (temp file, fsync, rename, fsync folder).

        Returns the number of bytes written. Raises :class:`StoreError` when the
        file cannot be written; no partial file is left behind.
        """
        target = self.path(key)
        try:
            self._make_folder(target.parent)
            size = 0
            with atomic_open(target, mode=FILE_MODE) as out:
                for part in parts:
                    size += out.write(part)
        except OSError as exc:
            raise StoreError(exc.errno, exc.strerror or str(exc), key) from exc
        return size

    def settle(self, key: str, spooled: Path) -> int:
        """Make a file spooled in :meth:`spool_folder` durable where it is (fsync) and
        private (0600), before :meth:`adopt` moves it to ``key``. Returns its size.

        Raises :class:`StoreError`; the spooled file is then left to its owner.
        """
        try:
            fd = os.open(spooled, os.O_RDONLY)
            try:
                os.fchmod(fd, FILE_MODE)
                os.fsync(fd)
                return os.fstat(fd).st_size
            finally:
                os.close(fd)
        except OSError as exc:
            raise StoreError(exc.errno, exc.strerror or str(exc), key) from exc

    def adopt(self, key: str, spooled: Path) -> None:
        """Move a spooled file made ready by :meth:`settle` to ``key`` durably (rename, fsync
        folder), replacing what is there: a received dataset is never copied.

        The caller must hold the instance's row undecided (its uncommitted insert) so
        that no other copy's file can be under ``key``. Raises :class:`StoreError`; the
        spooled file is then left to its owner.
        """
        target = self.path(key)
        try:
            self._make_folder(target.parent)
            os.replace(spooled, target)
            fsync_folder(target.parent)
        except OSError as exc:
            raise StoreError(exc.errno, exc.strerror or str(exc), key) from exc

    def spool_folder(self) -> Path:
        """A private folder for this process's incoming datasets, on the store's file system
        (so that keeping one is a rename). Folders left by processes of this host that are
        gone (a crash mid-receive) are removed."""
        spool = self.root / SPOOL
        host = socket.gethostname()
        try:
            self._make_folder(spool)
            for left in spool.iterdir():
                owner_host, _, rest = left.name.rpartition("~")
                pid = rest.split("-", 1)[0]
                if owner_host == host and pid.isdigit() and not _process_alive(int(pid)):
                    shutil.rmtree(left, ignore_errors=True)
            return Path(tempfile.mkdtemp(prefix=f"{host}~{os.getpid()}-", dir=spool))
        except OSError as exc:
            raise StoreError(
                exc.errno, f"cannot make a spool folder in {spool}: {exc.strerror}", "."
            ) from exc

    def remove(self, key: str) -> None:
        """Remove the file under ``key`` if present."""
        self.path(key).unlink(missing_ok=True)

    def orphan_temporaries(self, before: float) -> Iterator[tuple[Path, int]]:
        """(path, size) of the temporary files a crash left in the store, last modified
        before ``before`` (a POSIX time): a write's ``.tmp-*`` sibling (``node.atomic``) in
        the root or a fan-out folder, and a spooled ``.part`` dataset (``node.dicom.spool``)
        in a spool folder. Live ones are younger: a write or a receive touches its file."""
        folders = [self.root]
        folders += sorted(Path(e.path) for e in self._entries(self.root) if _is_fanout(e.name))
        spool = self.root / SPOOL
        spooling = (e for e in self._entries(spool) if e.is_dir(follow_symlinks=False))
        folders += sorted(Path(e.path) for e in spooling)
        for folder in folders:
            for entry in self._entries(folder):
                name = entry.name
                temporary = name.startswith(TEMPORARY_PREFIX) or (
                    folder.parent == spool and name.startswith(".") and name.endswith(".part")
                )
                if not temporary or not entry.is_file(follow_symlinks=False):
                    continue
                try:
                    stat = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # finished (renamed) meanwhile
                if stat.st_mtime < before:
                    yield Path(entry.path), stat.st_size

    @staticmethod
    def _entries(folder: Path) -> list[os.DirEntry]:
        try:
            with os.scandir(folder) as entries:
                return list(entries)
        except (FileNotFoundError, NotADirectoryError):
            return []

    def free_bytes(self) -> int:
        """Free bytes on the file system that holds the store."""
        probe = self.root
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        return shutil.disk_usage(probe).free

    def _make_folder(self, folder: Path) -> None:
        if folder.is_dir():
            return
        missing = []
        probe = folder
        while not probe.exists():
            missing.append(probe)
            probe = probe.parent
        for created in reversed(missing):
            created.mkdir(FOLDER_MODE, exist_ok=True)
        # A new folder's entry lives in its parent: sync the parents so it survives a crash.
        for created in reversed(missing):
            fsync_folder(created.parent)


def _is_fanout(name: str) -> bool:
    return len(name) == FANOUT_DIGITS and all(c in "0123456789abcdef" for c in name)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
