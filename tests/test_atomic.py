"""Small files are replaced atomically and durably: the old or the new content, never a half."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pacs_sentinel import atomic


def test_write_text_creates_and_replaces_without_leaving_a_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "qc" / "active.json"
    atomic.write_text(path, "first ü\n")
    assert path.read_bytes() == "first ü\n".encode()
    atomic.write_text(path, "second\n")
    assert path.read_text(encoding="utf-8") == "second\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["active.json"]


def test_the_new_content_and_the_rename_are_flushed(tmp_path: Path, fsync_log: list[str]) -> None:
    atomic.write_text(tmp_path / "card.json", "{}\n")
    # The temporary file before the rename, then the folder that holds the new name.
    assert fsync_log == [str(tmp_path / ".card.json.tmp"), str(tmp_path)]


def test_new_folders_are_flushed_in_their_parents(tmp_path: Path, fsync_log: list[str]) -> None:
    atomic.write_text(tmp_path / "a" / "b" / "card.json", "{}\n")
    assert fsync_log == [str(tmp_path), str(tmp_path / "a"), str(tmp_path / "a" / "b" / ".card.json.tmp"),
                         str(tmp_path / "a" / "b")]
    fsync_log.clear()
    atomic.make_folders(tmp_path / "a" / "b")  # already there: nothing to flush
    assert fsync_log == []


def test_a_file_in_the_way_of_a_folder_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "results").write_text("not a folder", encoding="utf-8")
    with pytest.raises(OSError):
        atomic.make_folders(tmp_path / "results" / "job-1")
    assert (tmp_path / "results").read_text(encoding="utf-8") == "not a folder"


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary_one(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "fusion.json"
    atomic.write_text(path, "old\n")

    def half_written(tmp: Path) -> None:
        tmp.write_text("ne", encoding="utf-8")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic.replace_durably(half_written, path)
    assert path.read_text(encoding="utf-8") == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fusion.json"]

    def refuse(src, dst):
        raise OSError("read-only file system")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="read-only"):
        atomic.write_text(path, "new\n")
    assert path.read_text(encoding="utf-8") == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fusion.json"]
