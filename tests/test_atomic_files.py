"""The one atomic-write helper: whole files or folders, or nothing, and no temporaries left."""
from __future__ import annotations

import os

import pytest

from teacher_service.atomic_files import TMP_MARK, atomic_path, write_atomic


def test_write_atomic_writes_text_and_bytes_and_creates_parents(tmp_path):
    text = write_atomic(tmp_path / "a" / "b.txt", "héllo")
    raw = write_atomic(tmp_path / "c.bin", b"\x00\x01", mode=0o600)
    assert text.read_text(encoding="utf-8") == "héllo"
    assert raw.read_bytes() == b"\x00\x01"
    assert raw.stat().st_mode & 0o777 == 0o600
    assert not [p for p in tmp_path.rglob("*") if TMP_MARK in p.name]


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer died")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["report.json"]


def test_a_folder_is_swapped_whole_only_when_asked(tmp_path):
    target = tmp_path / "export"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(OSError):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "new.txt").write_text("new")
    assert sorted(os.listdir(target)) == ["old.txt"]
    with atomic_path(target, replace_dir=True) as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")
    assert sorted(os.listdir(target)) == ["new.txt"]
    assert os.listdir(tmp_path) == ["export"]


def test_fsync_path_writes_the_file(tmp_path):
    with atomic_path(tmp_path / "rows.parquet", fsync=True) as tmp:
        tmp.write_bytes(b"rows")
    assert (tmp_path / "rows.parquet").read_bytes() == b"rows"
