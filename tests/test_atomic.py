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


def test_the_new_content_and_the_rename_are_flushed(tmp_path: Path, monkeypatch) -> None:
    synced: list[str] = []
    real_fsync, real_open = os.fsync, os.open
    opened: dict[int, str] = {}

    def open_(path, flags, *args):
        fd = real_open(path, flags, *args)
        opened[fd] = os.fspath(path)
        return fd

    def fsync(fd: int) -> None:
        synced.append(opened.get(fd, "?"))
        real_fsync(fd)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "fsync", fsync)
    atomic.write_text(tmp_path / "card.json", "{}\n")
    # The temporary file before the rename, then the folder that holds the new name.
    assert synced == [str(tmp_path / ".card.json.tmp"), str(tmp_path)]


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
