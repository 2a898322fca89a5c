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
# Indices handled at once (a multiple of _GROUP): temporaries stay a few MiB, whatever the layer's size.
_CHUNK = 1 << 22


def packed_size(count: int, bits: int) -> int:
    """Bytes that ``count`` indices of ``bits`` bits take: ``ceil(count*bits/8)``."""
    return (count * bits + 7) // 8


def _places(bits: int) -> list[tuple[int, int, int, int]]:
    """Where each of a group's eight indices lies in its ``bits`` bytes: (index, byte, shift, spill),
    the index's low ``8 - shift`` bits at ``shift`` in ``byte``, and ``spill`` > 0 high bits at the
    bottom of the next byte."""
    places = []
    for j in range(_GROUP):
        byte, shift = divmod(j * bits, 8)
        places.append((j, byte, shift, max(0, shift + bits - 8)))
    return places


def pack(indices: Tensor, bits: int) -> Tensor:
    """Pack a 1-D tensor of integers in ``[0, 2**bits)`` into a uint8 tensor.

    Byte-wide operations on groups of eight indices, a few MiB of them at a
    time, so memory beyond the result stays small. Raises ValueError for bits
    outside 1..8 or an index out of range.
    """
    _check_bits(bits)
    values = indices.reshape(-1)
    count = values.numel()
    if count and (int(values.min()) < 0 or int(values.max()) >= (1 << bits)):
        raise ValueError(f"indices must lie in [0, {1 << bits}) for bits={bits}")
    if bits == 8:
        return values.to(torch.uint8)
    out = torch.empty(packed_size(count, bits), dtype=torch.uint8, device=values.device)
    places = _places(bits)
    for start in range(0, count, _CHUNK):
        chunk = _in_rows(values[start : start + _CHUNK], _GROUP)
        groups = chunk.shape[0]
        packed = torch.zeros(groups, bits, dtype=torch.uint8, device=values.device)
        for j, byte, shift, spill in places:
            packed[:, byte] |= chunk[:, j] << shift  # uint8: the bits past the byte fall off ...
            if spill:
                packed[:, byte + 1] |= chunk[:, j] >> (bits - spill)  # ... into the next one
        first = start // _GROUP * bits
        out[first : first + packed.numel()] = packed.reshape(-1)[: out.numel() - first]
    return out


def unpack(packed: Tensor, bits: int, count: int) -> Tensor:
    """Inverse of ``pack``: ``count`` indices as uint8 (one byte each).

    Byte-wide operations, a few MiB at a time, so memory beyond the result stays
    small. Raises ValueError for bits outside 1..8 or a size that does not fit.
    """
    _check_bits(bits)
    if packed.numel() != packed_size(count, bits):
        raise ValueError(f"{count} indices of {bits} bits need {packed_size(count, bits)} bytes, got {packed.numel()}")
    data = packed.reshape(-1)
    if bits == 8:
        return data.to(torch.uint8, copy=True)
    out = torch.empty(count, dtype=torch.uint8, device=data.device)
    mask = (1 << bits) - 1
    places = _places(bits)
    step = _CHUNK // _GROUP * bits  # bytes of one chunk
    for first in range(0, data.numel(), step):
        chunk = _in_rows(data[first : first + step], bits)
        groups = chunk.shape[0]
        values = torch.empty(groups, _GROUP, dtype=torch.uint8, device=data.device)
        for j, byte, shift, spill in places:
            value = chunk[:, byte] >> shift
            if spill:
                value |= chunk[:, byte + 1] << (bits - spill)
            values[:, j] = value & mask
        start = first // bits * _GROUP
        out[start : start + values.numel()] = values.reshape(-1)[: count - start]
    return out


def _in_rows(chunk: Tensor, width: int) -> Tensor:
    """``chunk`` as uint8 rows of ``width``, the last padded with zeros.  # (rows, width)"""
    chunk = chunk.to(torch.uint8)
    if chunk.numel() % width:
        chunk = torch.cat([chunk, chunk.new_zeros(width - chunk.numel() % width)])
    return chunk.view(-1, width)


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in 1..8, got {bits!r}")
