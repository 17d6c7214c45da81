"""Plain-text tables for the command line."""

from __future__ import annotations

import math
from collections.abc import Sequence


def score_text(score: float | None) -> str:
    """A quality score for people: two decimals, rounded down, so that a score below an accept
    threshold never reads as the threshold (0.4976 is "0.49", not "0.50"); "-" for none. The SR
    carries the score to four decimals."""
    if score is None:
        return "-"
    return f"{math.floor(score * 100 + 1e-6) / 100:.2f}"  # scores have four decimals: 1e-6 only undoes float error


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]], *, max_width: int = 60) -> str:
    """Format rows as an aligned text table; cells longer than ``max_width`` are shortened,
    except in the last column, which nothing follows (a reason or an error is read whole)."""
    def cell(value: object, last: bool) -> str:
        text = str(value)
        return text if last or len(text) <= max_width else text[: max_width - 1] + "…"

    cells = [[cell(v, i == len(row) - 1) for i, v in enumerate(row)] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)
