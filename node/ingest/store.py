"""The instance store: DICOM files keyed by SOP Instance UID, written atomically."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

from node.atomic import atomic_open, fsync_folder

UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


class StoreError(OSError):
    """The store cannot take a file (disk full, not writable); nothing was kept."""

    def __init__(self, errno: int | None, strerror: str, key: str) -> None:
        super().__init__(errno, strerror)
        self.key = key

    def __str__(self) -> str:
        if self.key == ".":
            return self.strerror
        return f"cannot write {self.key} in the store: {self.strerror}"


def check_uid(value: str, name: str = "UID") -> str:
    """Return ``value`` if it is a valid DICOM UID (so it is safe as a file name), else raise."""
    if not isinstance(value, str) or len(value) > 64 or not UID_PATTERN.match(value):
        raise ValueError(f"{name} is not a valid DICOM UID: {value!r}")
    return value


SPOOL = ".spool"  # datasets being received, one folder per receiving process
FANOUT_DIGITS = 3  # 4096 folders: ten million instances is ~2,500 files a folder


class InstanceStore:
    """Files under ``root/abc/<SOPInstanceUID>.dcm``, where ``abc`` starts the UID's SHA-1.

    The hash spreads a study over many folders so none grows huge; the UID itself
    stays in the name so an administrator can find a file by hand. The folders are
    made (and synced) once, by :meth:`prepare`, so a write syncs only its own folder.
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
                (self.root / f"{index:0{FANOUT_DIGITS}x}").mkdir(exist_ok=True)
            fsync_folder(self.root)
        except OSError as exc:
            raise StoreError(
                exc.errno, f"cannot prepare the store at {self.root}: {exc.strerror}", "."
            ) from exc

    def key_for(self, sop_instance_uid: str) -> str:
        """The store key (relative path) of an instance."""
        check_uid(sop_instance_uid, "SOPInstanceUID")
        digest = hashlib.sha1(sop_instance_uid.encode("ascii")).hexdigest()
        return f"{digest[:FANOUT_DIGITS]}/{sop_instance_uid}.dcm"

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
            with atomic_open(target, mode=0o640) as out:
                for part in parts:
                    size += out.write(part)
        except OSError as exc:
            raise StoreError(exc.errno, exc.strerror or str(exc), key) from exc
        return size

    def adopt(self, key: str, spooled: Path) -> int:
        """Move a file spooled in :meth:`spool_folder` to ``key`` durably (fsync, rename,
        fsync folder): a received dataset is never copied. Returns its size.

        Raises :class:`StoreError`; the spooled file is then left to its owner.
        """
        target = self.path(key)
        try:
            self._make_folder(target.parent)
            fd = os.open(spooled, os.O_RDONLY)
            try:
                os.fsync(fd)
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
            os.replace(spooled, target)
            fsync_folder(target.parent)
        except OSError as exc:
            raise StoreError(exc.errno, exc.strerror or str(exc), key) from exc
        return size

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
        folder.mkdir(parents=True, exist_ok=True)
        # A new folder's entry lives in its parent: sync the parents so it survives a crash.
        for created in reversed(missing):
            fsync_folder(created.parent)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
