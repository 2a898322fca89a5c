"""What a GPU would do, observed on the CPU: its work sizing, and the reads that make it wait."""

from collections import Counter
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dkm_param.ops import _engine

# operations whose result the host needs before it can go on: on a GPU each waits for the device
HOST_READS = frozenset({"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.bincount.default",
                        "aten.masked_select.default", "aten._unique2.default", "aten.unique_consecutive.default"})
# indexing by a boolean mask reads back how many it selects
MASKED = frozenset({"aten.index.Tensor", "aten.index_put_.default", "aten.index_put.default"})


@contextmanager
def device_sizing():
    """Every sizing decision the GPU's (``_engine.on_host`` says no), within the block."""
    on_host = _engine.on_host
    _engine.on_host = lambda device: False
    try:
        yield
    finally:
        _engine.on_host = on_host


class HostReads:
    """Counts, by name (``reads``), the reads back to the host run within the block, backward
    included: the operations of ``HOST_READS``, and ``Tensor.tolist`` (which runs no operation on
    the CPU, so is counted by wrapping it)."""

    def __init__(self):
        self.reads = Counter()
        self._operations = _Operations(self.reads)

    def __enter__(self):
        reads, tolist = self.reads, torch.Tensor.tolist

        def counted(tensor, *args, **kwargs):
            reads["tolist"] += 1
            return tolist(tensor, *args, **kwargs)

        torch.Tensor.tolist = counted
        self._operations.__enter__()
        return self

    def __exit__(self, *exc):
        self._operations.__exit__(*exc)
        del torch.Tensor.tolist  # torch.Tensor's own is inherited from its base


class _Operations(TorchDispatchMode):
    def __init__(self, reads: Counter):
        super().__init__()
        self.reads = reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in HOST_READS:
            self.reads[str(func)] += 1
        elif str(func) in MASKED and any(_is_mask(index) for index in args[1]):  # the mask's count
            self.reads[f"{func} with a mask"] += 1
        return func(*args, **(kwargs or {}))


def _is_mask(index) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype == torch.bool
