"""node.atomic: a target is the old file or the whole new one, never half, and no temporary
is left behind."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from node import atomic


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_write_bytes_replaces_the_target_whole(tmp_path):
    target = tmp_path / "data.bin"
    target.write_bytes(b"an old and much longer content " * 10)
    atomic.write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["data.bin"]


def test_write_text_writes_utf8_and_creates_a_missing_file(tmp_path):
    target = tmp_path / "note.txt"
    atomic.write_text(str(target), "Größe ✓\n")
    assert target.read_bytes() == "Größe ✓\n".encode()


def test_an_exception_inside_atomic_open_keeps_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "state.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="half way"), atomic.atomic_open(target) as out:
        out.write(b"half a new fi")
        raise RuntimeError("half way")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_an_exception_inside_atomic_open_creates_nothing_when_there_was_no_file(tmp_path):
    with pytest.raises(KeyboardInterrupt), atomic.atomic_open(tmp_path / "new.bin") as out:
        out.write(b"partial")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o644])
def test_the_mode_is_applied_whatever_the_umask(tmp_path, mode):
    previous = os.umask(0o077)
    try:
        atomic.write_bytes(tmp_path / "a", b"x", mode=mode)
        atomic.write_with(tmp_path / "b", lambda temp: temp.write_bytes(b"y"), mode=mode)
    finally:
        os.umask(previous)
    assert _mode(tmp_path / "a") == mode
    assert _mode(tmp_path / "b") == mode


def test_a_replaced_file_takes_the_new_mode(tmp_path):
    target = tmp_path / "secret"
    target.write_text("old")
    target.chmod(0o644)
    atomic.write_text(target, "new", mode=0o600)
    assert (target.read_text(), _mode(target)) == ("new", 0o600)


def test_write_with_keeps_the_whole_suffix(tmp_path):
    seen: list[Path] = []

    def write(temp: Path) -> None:
        seen.append(temp)
        temp.write_text("weights")

    target = tmp_path / "model.weights.h5"
    atomic.write_with(target, write)
    (temp,) = seen
    assert temp.parent == tmp_path and temp.name.startswith(".")
    assert temp.name.endswith(".weights.h5") and temp.suffix == ".h5"
    assert temp != target and not temp.exists()
    assert target.read_text() == "weights"
    assert [p.name for p in tmp_path.iterdir()] == ["model.weights.h5"]


def test_write_with_failing_keeps_the_old_file_and_removes_what_it_wrote(tmp_path):
    target = tmp_path / "last.keras"
    target.write_text("old model")

    def write(temp: Path) -> None:
        temp.write_text("a broken half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic.write_with(target, write)
    assert target.read_text() == "old model"
    assert [p.name for p in tmp_path.iterdir()] == ["last.keras"]


def test_write_with_that_writes_nothing_fails_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "report.png"
    target.write_text("old")
    with pytest.raises(FileNotFoundError):
        atomic.write_with(target, lambda temp: None)
    assert target.read_text() == "old"


def test_temporaries_are_hidden_siblings_and_unique(tmp_path):
    target = tmp_path / "1.2.840.10008.5.1.4.1.1.2.dcm"
    temps = {atomic._temporary(target) for _ in range(50)}
    assert len(temps) == 50
    for temp in temps:
        assert temp.parent == tmp_path and temp.name.startswith(".")
        assert temp.name.endswith(target.name)


def test_fsync_folder_accepts_a_folder_and_refuses_a_file(tmp_path):
    atomic.fsync_folder(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        atomic.fsync_folder(tmp_path / "file")


def test_create_exclusive_writes_once_and_never_replaces(tmp_path):
    target = tmp_path / "key"
    previous = os.umask(0o022)
    try:
        assert atomic.create_exclusive(target, b"first", mode=0o600) is True
        assert atomic.create_exclusive(target, b"second", mode=0o600) is False
    finally:
        os.umask(previous)
    assert (target.read_bytes(), _mode(target)) == (b"first", 0o600)
    assert [p.name for p in tmp_path.iterdir()] == ["key"]


def test_private_folder_is_0700_whatever_the_umask_and_keeps_an_existing_mode(tmp_path):
    previous = os.umask(0o022)
    try:
        made = atomic.private_folder(tmp_path / "a" / "data")
        (tmp_path / "open").mkdir(mode=0o755)
        kept = atomic.private_folder(tmp_path / "open")
    finally:
        os.umask(previous)
    assert (_mode(made), _mode(kept)) == (0o700, 0o755)
