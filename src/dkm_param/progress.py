"""Progress bars for long work, through tqdm when it is installed (the ``progress`` extra)."""

from __future__ import annotations

import sys
from typing import Iterable, TypeVar

T = TypeVar("T")


def track(
    iterable: Iterable[T],
    total: int | None = None,
    desc: str = "",
    enabled: bool | None = None,
    delay: float = 1.0,
) -> Iterable[T]:
    """Wrap ``iterable`` in a tqdm progress bar on stderr, or return it unchanged.

    enabled: None (default) shows a bar only when stderr is a terminal;
        False never does; True always does (still only with tqdm installed).
    delay: seconds before the bar appears, so work that finishes sooner
        prints nothing.
    The bar is removed when the loop ends. Without tqdm the iterable comes
    back unchanged: tqdm is optional (``pip install 'tqdm>=4.60'``, or
    ``pip install -e ".[progress]"`` in a source checkout).
    """
    if enabled is False or (enabled is None and not _stderr_is_terminal()):
        return iterable
    try:
        # imported here so that `import dkm_param` never loads tqdm
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc or None, delay=delay, leave=False, file=sys.stderr, dynamic_ncols=True)


def _stderr_is_terminal() -> bool:
    stream = sys.stderr
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False
