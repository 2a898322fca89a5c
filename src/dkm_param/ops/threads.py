"""One intra-op thread for small work: a layer of a few thousand weights is not worth sharing.

Clustering a small layer is many tiny tensor operations. With several intra-op
threads each one that torch splits waits for every thread to be scheduled, and
on a machine whose cores other processes keep busy that wait can cost a
hundred times the work itself (seconds for a layer of 2,000 weights). Below
``SMALL_WORK`` values the work runs on one thread, which is also the faster
choice on an idle machine; above it torch's own setting is kept.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

SMALL_WORK = 1 << 16  # values: below this a layer's clustering runs on one thread


@contextmanager
def threads_for(values: int) -> Iterator[None]:
    """Run the block on one intra-op thread when it works on fewer than ``SMALL_WORK`` values.

    torch's thread count is restored on leaving, also on an error; with one
    thread already (or for larger work) nothing is changed.
    """
    previous = torch.get_num_threads()
    if values >= SMALL_WORK or previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
