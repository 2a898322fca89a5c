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
# Groups handled at once: temporaries stay a few MiB, whatever the layer's size.
_CHUNK_GROUPS = 1 << 14


def packed_size(count: int, bits: int) -> int:
    """Bytes that ``count`` indices of ``bits`` bits take: ``ceil(count*bits/8)``."""
    return (count * bits + 7) // 8


def pack(indices: Tensor, bits: int) -> Tensor:
    """Pack a 1-D tensor of integers in ``[0, 2**bits)`` into a uint8 tensor.

    Works through the indices in chunks, so memory beyond the result stays a
    few MiB. Raises ValueError for bits outside 1..8 or an index out of range.
    """
    _check_bits(bits)
    values = indices.reshape(-1)
    count = values.numel()
    if count and (int(values.min()) < 0 or int(values.max()) >= (1 << bits)):
        raise ValueError(f"indices must lie in [0, {1 << bits}) for bits={bits}")
    if bits == 8:
        return values.to(torch.uint8)
    out = torch.empty(packed_size(count, bits), dtype=torch.uint8, device=values.device)
    shifts = torch.arange(_GROUP, dtype=torch.int64, device=values.device) * bits
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=values.device) * 8
    step = _CHUNK_GROUPS * _GROUP
    for start in range(0, count, step):
        chunk = values[start : start + step].to(torch.int64)
        padded = torch.nn.functional.pad(chunk, (0, (-chunk.numel()) % _GROUP)).view(-1, _GROUP)
        words = (padded << shifts).sum(1)  # (groups,): 8*bits <= 64 bits each
        packed = ((words[:, None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)
        first = start // _GROUP * bits
        out[first : first + packed.numel()] = packed[: out.numel() - first]
    return out


def unpack(packed: Tensor, bits: int, count: int) -> Tensor:
    """Inverse of ``pack``: ``count`` indices as uint8 (one byte each).

    Works through the bytes in chunks, so memory beyond the result stays a
    few MiB. Raises ValueError for bits outside 1..8 or a size that does not fit.
    """
    _check_bits(bits)
    if packed.numel() != packed_size(count, bits):
        raise ValueError(f"{count} indices of {bits} bits need {packed_size(count, bits)} bytes, got {packed.numel()}")
    data = packed.reshape(-1)
    if bits == 8:
        return data.to(torch.uint8, copy=True)
    out = torch.empty(count, dtype=torch.uint8, device=data.device)
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=data.device) * 8
    shifts = torch.arange(_GROUP, dtype=torch.int64, device=data.device) * bits
    mask = (1 << bits) - 1
    step = _CHUNK_GROUPS * bits  # bytes of one chunk
    for first in range(0, data.numel(), step):
        chunk = data[first : first + step].to(torch.int64)
        chunk = torch.nn.functional.pad(chunk, (0, (-chunk.numel()) % bits)).view(-1, bits)
        words = (chunk << byte_shifts).sum(1)
        values = ((words[:, None] >> shifts) & mask).to(torch.uint8).reshape(-1)
        start = first // bits * _GROUP
        out[start : start + values.numel()] = values[: count - start]
    return out


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in 1..8, got {bits!r}")
