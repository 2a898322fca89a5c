"""One intra-op thread for small work: a small layer's clustering is not worth sharing.

Clustering a layer is many tensor operations, each on the weight or on its
table of values: a few dozen in a training step, hundreds while settling at
registration. With several intra-op threads each one that torch splits waits
for every thread to be scheduled, and on a machine whose cores other
processes keep busy that wait can cost a hundred times the work itself
(seconds to register a layer of 2,000 or of 80,000 weights). So a training
step's clustering and ``palettize``'s k-means run on one thread below
``SMALL_WORK`` weights, and registration (``SETTLE_WORK``: its operations
many and each small) below 2M. On an idle 2-core machine one thread is as
fast there (measured: within noise, both ways); above them torch's own
setting is kept.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

SMALL_WORK = 1 << 19  # weights: below this a training step's clustering and k-means run on one thread
SETTLE_WORK = 1 << 21  # weights: below this registration runs on one thread


@contextmanager
def threads_for(values: int, small: int = SMALL_WORK) -> Iterator[None]:
    """Run the block on one intra-op thread when it works on fewer than ``small`` values.

    torch's thread count is restored on leaving, also on an error; with one
    thread already (or for larger work) nothing is changed.
    """
    previous = torch.get_num_threads()
    if values >= small or previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
