"""Small files that must never be seen half written: written under a temporary name, flushed,
then renamed over the old one.

A reader sees either the old content or the new, never a mix or an empty file, also after a
crash or a power cut: the new content is ``fsync``-ed before the rename and the folder after
it (the rename itself is then on the disk), and a folder created for it is flushed in its
parent. Used for the files the daemon re-reads (the active QC version, the fusion model, model
cards) and for the result objects a job queues for sending (:mod:`pacs_sentinel.reports.resultset`:
the job's database row that queues them must never point at a file a power cut left empty);
the spool has its own, faster scheme (:mod:`pacs_sentinel.dicom_io.spool`) and flushes its
folders with :func:`fsync_path`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def fsync_path(path: Path | str) -> None:
    """Flush a file or a folder (its entries: names created or renamed in it) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_folders(path: Path | str) -> None:
    """Create the folder ``path`` and any missing parents, each flushed in its parent.

    Raises:
        OSError: A folder cannot be created, or ``path`` exists and is not a folder.
    """
    path = Path(path)
    missing = []
    while not path.is_dir():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:
            if not folder.is_dir():
                raise NotADirectoryError(f"{folder} exists and is not a folder") from None
        fsync_path(folder.parent)


def replace_durably(write: Callable[[Path], None], path: Path) -> None:
    """Make ``path`` hold what ``write`` writes to the temporary file it is given.

    Args:
        write: Writes the whole content to the path it receives.
        path: The file to create or replace; its folder is created when missing
            (:func:`make_folders`).

    Raises:
        OSError: The file cannot be written or renamed; ``path`` is left as it was and the
            temporary file is removed. Whatever ``write`` raises, likewise.
    """
    path = Path(path)
    make_folders(path.parent)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically and durably (:func:`replace_durably`)."""
    replace_durably(lambda tmp: tmp.write_bytes(text.encode("utf-8")), path)
