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

Some of a large layer's passes run on one core whatever torch's setting:
``index_select`` and ``bincount`` on the CPU are serial loops. ``share``
runs such work as one run per intra-op thread, on worker threads that each
use one intra-op thread (so that they do not each start a team of their own
competing with the model's for the cores), while the calling thread waits.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

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


_WORKERS: dict[str, object] = {}  # the pool, its size and the process that started it
_WORKERS_LOCK = threading.Lock()


def share(tasks: Sequence[Callable[[], None]]) -> None:
    """Run the tasks at once, each on a worker thread of one intra-op thread, and wait for all.

    The workers run with the caller's grad and inference modes. The first error
    a task raises is raised here, after every task has finished (none is left
    writing). One task, or none, runs on the calling thread.
    """
    if len(tasks) <= 1:
        for task in tasks:
            task()
        return
    pool = _pool(len(tasks))
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def run(task: Callable[[], None]) -> None:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            task()

    futures = [pool.submit(run, task) for task in tasks]
    errors = [future.exception() for future in futures]  # waits for each
    for error in errors:
        if error is not None:
            raise error


def _pool(size: int) -> ThreadPoolExecutor:
    """The worker threads, at least ``size`` of them, each set to one intra-op thread.

    torch sets a thread's intra-op count from the process's setting when the
    thread first asks for it; each worker asks while the setting is one, and the
    caller's setting is put back once every worker has. A process forked from
    this one has none of the threads, and starts its own."""
    with _WORKERS_LOCK:
        if _WORKERS.get("pid") == os.getpid() and _WORKERS["size"] >= size:
            return _WORKERS["pool"]
        previous = torch.get_num_threads()
        started = threading.Barrier(size + 1)

        def one_thread() -> None:
            torch.set_num_threads(1)
            torch.get_num_threads()  # the thread's own count, taken now: one
            started.wait()

        pool = ThreadPoolExecutor(size, thread_name_prefix="dkm-param", initializer=one_thread)
        try:
            for _ in range(size):  # each submission while the others wait starts a thread
                pool.submit(int)
            started.wait()
        finally:
            torch.set_num_threads(previous)
        if _WORKERS.get("pid") == os.getpid():
            _WORKERS["pool"].shutdown(wait=False)
        _WORKERS.update(pool=pool, size=size, pid=os.getpid())
        return pool
