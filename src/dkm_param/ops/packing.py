"""Bit packing of unsigned indices into bytes, least-significant bit first.

Index i occupies bits ``i*bits .. i*bits+bits-1`` of one little-endian bit
stream; bit j of the stream is bit ``j % 8`` of byte ``j // 8``. This is the
order Core ML tools use, so a converter needs no repacking.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Eight indices of b bits fill exactly b bytes; packing works on such groups.
_GROUP = 8


def packed_size(count: int, bits: int) -> int:
    """Bytes that ``count`` indices of ``bits`` bits take: ``ceil(count*bits/8)``."""
    return (count * bits + 7) // 8


def pack(indices: Tensor, bits: int) -> Tensor:
    """Pack a 1-D tensor of integers in ``[0, 2**bits)`` into a uint8 tensor."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    count = indices.numel()
    values = indices.reshape(-1).to(torch.int64)
    if count and (values.min() < 0 or values.max() >= (1 << bits)):
        raise ValueError(f"indices must lie in [0, {1 << bits}) for bits={bits}")
    if bits == 8:
        return values.to(torch.uint8)
    padded = torch.nn.functional.pad(values, (0, (-count) % _GROUP)).view(-1, _GROUP)
    shifts = torch.arange(_GROUP, dtype=torch.int64, device=values.device) * bits
    words = (padded << shifts).sum(1)  # (groups,): 8*bits <= 64 bits each
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=values.device) * 8
    packed = ((words[:, None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)
    return packed[: packed_size(count, bits)]


def unpack(packed: Tensor, bits: int, count: int) -> Tensor:
    """Inverse of ``pack``: ``count`` indices as int64."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if packed.numel() != packed_size(count, bits):
        raise ValueError(f"{count} indices of {bits} bits need {packed_size(count, bits)} bytes, got {packed.numel()}")
    data = packed.reshape(-1).to(torch.int64)
    if bits == 8:
        return data
    groups = -(-count // _GROUP)
    data = torch.nn.functional.pad(data, (0, groups * bits - data.numel())).view(groups, bits)
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=data.device) * 8
    words = (data << byte_shifts).sum(1)
    shifts = torch.arange(_GROUP, dtype=torch.int64, device=data.device) * bits
    values = (words[:, None] >> shifts) & ((1 << bits) - 1)
    return values.reshape(-1)[:count]
