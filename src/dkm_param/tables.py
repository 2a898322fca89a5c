"""Plain text for people: the one table renderer, byte sizes, and names made safe to print."""

from __future__ import annotations

import re
from typing import Iterable, Sequence


def render_table(
    header: Sequence[str],
    rows: Iterable[Sequence[str]],
    right: Iterable[int] = (),
    footer: Iterable[str] = (),
    rule_below: bool = False,
) -> str:
    """Columns padded to their widest cell, a rule under the header, then ``footer`` lines.

    right: indices of the columns aligned right (numbers).
    rule_below: another rule after the last row, before the footer.
    """
    table = [tuple(header), *(tuple(row) for row in rows)]
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
    return "\n".join([*lines, *footer])


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
