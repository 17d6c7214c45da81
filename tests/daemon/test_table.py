"""The text tables of the command line."""

from __future__ import annotations

from pacs_sentinel.daemon.table import format_table


def test_long_cells_are_shortened_except_in_the_last_column() -> None:
    uid = "1.2.826.0.1.3680043.8.498.95159" + "1" * 40
    error = f"cannot decode pixel data of {uid} (33769 vs 51200 bytes)"
    table = format_table(["study", "reasons / error"], [[uid, error]], max_width=20).splitlines()
    assert table[0].split() == ["study", "reasons", "/", "error"]
    assert table[2].startswith(uid[:19] + "…") and table[2].endswith(error)  # the cause is read whole
