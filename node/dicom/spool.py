"""Incoming C-STORE datasets written to disk as they arrive, on the store's own file system.

pynetdicom can write a C-STORE dataset to a file fragment by fragment instead of
holding it in memory (``_config.STORE_RECV_CHUNKED_DATASET``), but it always
uses ``tempfile.NamedTemporaryFile()`` in the system temp folder and its own
File Meta Information. For the node that would mean a copy across file systems
for every instance, files of unlimited size, and files left behind by an
association that breaks mid-dataset. So, for associations of an AE that carries
a :class:`Spool`, the two names pynetdicom's decoder looks up are pointed here:

- the spool file lives in the store's private spool folder (keeping it is a
  rename), stops taking bytes past the node's size limit, and is tracked so that
  one left by a broken association is removed when the connection closes;
- the File Meta Information names the node's implementation and the sending AE
  (Source Application Entity Title).

Any other AE in the process gets pynetdicom's own behaviour unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import tempfile
import threading
from pathlib import Path

from pydicom.dataset import FileMetaDataset
from pynetdicom import _config, dimse_messages
from pynetdicom.dsutils import create_file_meta as pynetdicom_file_meta

from node.dicom.network import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

log = logging.getLogger(__name__)

_pynetdicom_temp_file = dimse_messages.NamedTemporaryFile
_install_lock = threading.Lock()


class SpoolFile:
    """A spooled dataset: the file object pynetdicom writes to, with a size cap.

    Nothing it does raises into pynetdicom's reader thread (that would abort the
    association): a full or read-only disk, or a dataset over the limit, is noted
    and the C-STORE handler answers it with a status.
    """

    def __init__(self, spool: Spool) -> None:
        self.limit = spool.max_bytes
        self.size = 0
        self.too_large = False
        self.error: OSError | None = None
        self.file = self  # pynetdicom flushes ``file.file`` after each fragment
        self._out = None
        try:
            spool.folder.mkdir(parents=True, exist_ok=True)  # removed by hand meanwhile?
            fd, self.name = tempfile.mkstemp(prefix=".", suffix=".part", dir=spool.folder)
            self._out = os.fdopen(fd, "wb")
        except OSError as exc:
            self.error = exc
            self.name = str(spool.folder / f".unwritable-{secrets.token_hex(4)}.part")

    def write(self, data: bytes) -> int:
        """Append ``data``; past the limit (or a failed write) keep nothing more."""
        self.size += len(data)
        if self._out is None or self.too_large or self.error:
            return len(data)
        try:
            if self.size > self.limit:
                self.too_large = True
                self._out.truncate(0)  # give the disk back now; the handler refuses it
            else:
                self._out.write(data)
        except OSError as exc:
            self._fail(exc)
        return len(data)

    def flush(self) -> None:
        """Hand what was written to the OS (pynetdicom calls this after each fragment)."""
        if self._out is not None and not self.error:
            try:
                self._out.flush()
            except OSError as exc:
                self._fail(exc)

    def _fail(self, exc: OSError) -> None:
        self.error = exc
        with contextlib.suppress(OSError):
            self._out.truncate(0)

    def close(self) -> None:
        """Close the file (pynetdicom closes it after the C-STORE handler)."""
        if self._out is not None:
            with contextlib.suppress(OSError):
                self._out.close()


class Spool:
    """The spool of one AE: its folder, size limit and the files of open associations."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._open: dict[int, set[SpoolFile]] = {}

    def new_file(self, association) -> SpoolFile:
        """A spool file for a C-STORE arriving on ``association``."""
        spooled = SpoolFile(self)
        with self._lock:
            self._open.setdefault(id(association), set()).add(spooled)
        return spooled

    def file_for(self, association, path: Path) -> SpoolFile | None:
        """The spool file behind ``path`` on ``association`` (None when not ours)."""
        with self._lock:
            for spooled in self._open.get(id(association), ()):
                if spooled.name == str(path):
                    return spooled
        return None

    def done(self, association, spooled: SpoolFile) -> None:
        """The handler has taken ``spooled`` (kept or refused)."""
        with self._lock:
            self._open.get(id(association), set()).discard(spooled)

    def discard_association(self, association) -> int:
        """Remove what an association left half-received; returns how many files."""
        with self._lock:
            left = self._open.pop(id(association), set())
        for spooled in left:
            spooled.close()
            Path(spooled.name).unlink(missing_ok=True)
        return len(left)


def _current_association():
    """The association whose DUL thread is decoding (pynetdicom decodes in that thread)."""
    return getattr(threading.current_thread(), "assoc", None)


def _spool_of(association) -> Spool | None:
    ae = getattr(association, "ae", None)
    return getattr(ae, "spool", None)


def _temp_file(*args, **kwargs):
    association = _current_association()
    spool = _spool_of(association)
    if spool is None:
        return _pynetdicom_temp_file(*args, **kwargs)
    return spool.new_file(association)


def _file_meta(*, sop_class_uid, sop_instance_uid, transfer_syntax, **kwargs) -> FileMetaDataset:
    association = _current_association()
    if _spool_of(association) is None:
        return pynetdicom_file_meta(
            sop_class_uid=sop_class_uid,
            sop_instance_uid=sop_instance_uid,
            transfer_syntax=transfer_syntax,
            **kwargs,
        )
    meta = pynetdicom_file_meta(
        sop_class_uid=sop_class_uid,
        sop_instance_uid=sop_instance_uid,
        transfer_syntax=transfer_syntax,
        implementation_uid=IMPLEMENTATION_CLASS_UID,
        implementation_version=IMPLEMENTATION_VERSION_NAME,
    )
    sender = association.requestor if association.is_acceptor else association.acceptor
    if sender.ae_title:
        meta.SourceApplicationEntityTitle = sender.ae_title.strip()
    return meta


def install() -> None:
    """Receive C-STORE datasets to disk, and point pynetdicom's decoder here (idempotent)."""
    with _install_lock:
        _config.STORE_RECV_CHUNKED_DATASET = True
        dimse_messages.NamedTemporaryFile = _temp_file
        dimse_messages.create_file_meta = _file_meta
