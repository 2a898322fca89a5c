"""Plain text for people: the one table renderer, byte sizes, and names made safe to print."""

from __future__ import annotations

import re
import textwrap
from typing import Iterable, Sequence

# characters a table with a notes column aims to fit in: longer notes are told under it
TABLE_WIDTH = 100
# a notes column keeps at least this many characters (a mark fits), however wide the other columns
_NOTE_ROOM = 8


def render_table(
    header: Sequence[str],
    rows: Iterable[Sequence[str]],
    right: Iterable[int] = (),
    footer: Iterable[str] = (),
    rule_below: bool = False,
    notes: bool = False,
    width: int = TABLE_WIDTH,
) -> str:
    """Columns padded to their widest cell, a rule under the header, then ``footer`` lines.

    right: indices of the columns aligned right (numbers).
    rule_below: another rule after the last row, before the footer.
    notes: the last column is free text. A cell that would take a line past
    ``width`` is replaced by a mark (``[1]``) and told once under the table;
    those notes and the footer lines are wrapped to ``width``.
    """
    table = [tuple(header), *(tuple(row) for row in rows)]
    told: dict[str, str] = {}  # long notes, each told once under the table, by mark
    if notes and len(table) > 1:
        others = sum(max(len(row[i]) for row in table) + 2 for i in range(len(header) - 1))
        room = max(_NOTE_ROOM, len(header[-1]), width - others)
        table[1:] = [
            (*row[:-1], row[-1] if len(row[-1]) <= room else told.setdefault(row[-1], f"[{len(told) + 1}]"))
            for row in table[1:]
        ]
    right = set(right)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))
        ).rstrip()
        for row in table
    ]
    rule = "-" * max(map(len, lines))
    lines.insert(1, rule)
    if rule_below:
        lines.append(rule)
    if not notes:
        return "\n".join([*lines, *footer])
    below = [_wrap(f"{mark} {note}", width, len(mark) + 1) for note, mark in told.items()]
    return "\n".join([*lines, *below, *(_wrap(line, width, 2) for line in footer)])


def _wrap(text: str, width: int, indent: int) -> str:
    """``text`` wrapped to ``width``, later lines indented by ``indent``; words are never split."""
    return textwrap.fill(
        text, width, subsequent_indent=" " * indent, break_long_words=False, break_on_hyphens=False
    )


def plural(count: int, noun: str) -> str:
    """``1 layer``, ``2 layers``: a count and its noun."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def format_size(n: float) -> str:
    """Bytes in B, KiB, MiB or GiB, e.g. ``1.50 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"


def printable(text: str) -> str:
    """``text`` with every character a terminal would act on (escapes, newlines, bidi controls) written as
    its Python escape, so that names and metadata from a file cannot drive the terminal or forge lines."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def natural_key(name: str) -> tuple:
    """Sort key that orders the numbers in names by value: ``layers.2`` before ``layers.11``."""
    # numbers compare by length and then digits (no int(): a hostile name's may be thousands of digits long)
    parts = re.split(r"([0-9]+)", name)  # odd places hold the runs of ASCII digits
    return tuple((len(p.lstrip("0")), p.lstrip("0"), p) if i % 2 else p for i, p in enumerate(parts))
