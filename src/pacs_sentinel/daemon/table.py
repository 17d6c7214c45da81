"""Plain-text tables for the command line."""

from __future__ import annotations

from collections.abc import Sequence


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
