"""The text tables of the command line."""

from __future__ import annotations

from pacs_sentinel.daemon.table import format_table


def test_long_cells_are_shortened_except_in_the_last_column() -> None:
    uid = "1.2.826.0.1.3680043.8.498.95159" + "1" * 40
    error = f"cannot decode pixel data of {uid} (33769 vs 51200 bytes)"
    table = format_table(["study", "reasons / error"], [[uid, error]], max_width=20).splitlines()
    assert table[0].split() == ["study", "reasons", "/", "error"]
    assert table[2].startswith(uid[:19] + "…") and table[2].endswith(error)  # the cause is read whole


def test_a_score_is_shown_rounded_down_so_it_never_reads_as_the_threshold() -> None:
    """Found from outside: a segment scored 0.4976 and sent to review read "0.50" (seg-qc's
    threshold) in `sentinel review show`, `review list` and `status`."""
    from pacs_sentinel.daemon.table import score_text

    assert score_text(0.4976) == "0.49"
    assert score_text(0.8933) == "0.89" and score_text(0.8999) == "0.89"
    assert [score_text(v) for v in (0.29, 0.57, 0.85, 1.0, 0.0)] == ["0.29", "0.57", "0.85", "1.00", "0.00"]
    assert score_text(None) == "-"
