"""Decoding a weight from its codebook and packed indices with traceable tensor operations.

The same bits as ``ops.layout.decode`` then the outliers (what the file
defines), from the packed bytes rather than unpacked indices, in
operations that ``torch.export`` and ``torch.compile`` trace: arithmetic,
``index_select``, reshapes, and no Python loop over the data. Where ``bits``
divides 8 the packed bytes are read through a table of all 256 bytes (each
byte's ``8 // bits`` values), so that no index is unpacked at all; other
widths unpack eight indices at a time from a 64-bit word.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import layout
from .dtypes import compute_dtype


def decode_packed(
    codebook: Tensor,
    packed: Tensor,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    bits: int,
    scale: Tensor | None = None,
    layout_name: str = "flat",
    outlier_index: Tensor | None = None,
    outlier_value: Tensor | None = None,
    digits: Tensor | None = None,
    bitcast: bool = False,
    out: Tensor | None = None,
) -> Tensor:
    """The weight of ``shape`` and ``dtype``: ``scale[row] * codebook[group, index]``, outliers put back.

    codebook: (k, d) or (groups, k, d); packed: the file's uint8 bytes, indices
    of ``bits`` bits least-significant bit first; scale: (rows,) or None;
    outlier_index (int, (m,)) and outlier_value ((m,)): positions in the
    weight's row-major order and their exact values, or None; digits:
    ``byte_digits(bits)``, when the caller keeps it (else it is computed);
    bitcast: where ``bits`` divides 8, read each byte's values as one 2-, 4-
    or 8-byte integer (a third faster on the CPU; ``view(dtype)``, which
    ExecuTorch's verifier refuses, so not for exported programs); out: a
    contiguous tensor of ``dtype`` with room for the weight, written and
    returned (a view of it) where the lookup through the byte table is the
    last step (no scale, no outliers, a 2-D weight or the "flat" layout, and
    ``bits`` dividing 8), else ignored.
    Returns a contiguous tensor equal, bit for bit, to ``CompressedLayer.weight()``.
    """
    work = compute_dtype(dtype)
    groups, k, dim = (1, *codebook.shape) if codebook.dim() == 2 else codebook.shape
    count = math.prod(shape) // dim
    # without a scale the lookup is the last step: the table holds the weight's own values
    book = _cast(_cast(codebook, work), dtype if scale is None else work)
    if k < 1 << bits:  # entries no index reads, so that every byte's digits have a value
        book = torch.cat([book, book.new_zeros(*book.shape[:-2], (1 << bits) - k, dim)], -2)
    if 8 % bits == 0 and (count // groups * bits) % 8 == 0:
        digits = digits if digits is not None else byte_digits(bits, packed.device)
        if out is not None and lookup_is_last(shape, bits, codebook, packed, scale, layout_name, outlier_index):
            return _by_byte_table(book, packed, digits, bitcast, out[: count * dim]).view(shape)
        vectors = _by_byte_table(book, packed, digits, bitcast)
    else:
        vectors = _by_words(book, packed, bits, count, groups)
    if vectors.numel() != count * dim:  # the last byte's unused digits
        vectors = vectors.reshape(-1)[: count * dim]
    if scale is None and (layout_name == "flat" or len(shape) <= 2):
        weight = vectors.reshape(shape)
    else:
        flat = vectors.reshape(layout.rows(shape), -1)
        if scale is not None:
            flat = _cast(flat * _cast(scale, work)[:, None], dtype)
        weight = layout.from_layout(flat, shape, layout_name)
        if layout_name == "input" and len(shape) > 2:
            weight = weight.contiguous()
    if outlier_index is not None:
        index = _cast(outlier_index, torch.int64)
        weight = weight.reshape(-1).index_put((index,), _cast(outlier_value, dtype)).reshape(shape)
    return weight


def lookup_is_last(
    shape: tuple[int, ...], bits: int, codebook: Tensor, packed: Tensor, scale: Tensor | None, layout_name: str,
    outlier_index: Tensor | None,
) -> bool:
    """Whether ``decode_packed`` can write the weight straight from the byte table into ``out``: no scale,
    no outliers, no reordering of the layout, ``bits`` dividing 8, every group's indices on whole bytes."""
    groups, dim = (1, codebook.shape[-1]) if codebook.dim() == 2 else (codebook.shape[0], codebook.shape[-1])
    count = math.prod(shape) // dim
    return (8 % bits == 0 and (count // groups * bits) % 8 == 0 and packed.numel() * (8 // bits) == count
            and scale is None and outlier_index is None and (layout_name == "flat" or len(shape) <= 2))


_WORDS = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # integer types by their size in bytes


def byte_digits(bits: int, device: torch.device | None = None) -> Tensor:
    """(256, 8 // bits) int64: the indices of ``bits`` bits each byte holds, least significant first."""
    per = 8 // bits
    return torch.arange(256, device=device)[:, None] // _powers(1 << bits, per, device) % (1 << bits)


def _by_byte_table(book: Tensor, packed: Tensor, digits: Tensor, bitcast: bool, out: Tensor | None = None) -> Tensor:
    """Every byte's values at once, from a (groups * 256, 8 // bits * d) table indexed by the bytes.

    Needs each group's indices to start on a byte (true whenever the group's bits fill whole bytes).
    out: a contiguous tensor of exactly the values' size to write them into.
    Returns (bytes, 8 // bits * d).
    """
    index = packed.to(torch.int32)
    if book.dim() == 2:
        table = book[digits].reshape(256, -1)
    else:
        groups = book.shape[0]
        table = book[:, digits].reshape(groups * 256, -1)
        if groups > 1:
            group = torch.arange(packed.numel(), device=packed.device, dtype=torch.int32) // (packed.numel() // groups)
            index = index + group * 256
    word = _WORDS.get(table.shape[1] * table.element_size()) if bitcast else None
    rows = None if out is None else out.view(-1, table.shape[1])
    if word is None:
        return table.index_select(0, index) if rows is None else torch.index_select(table, 0, index, out=rows)
    # a row of 2, 4 or 8 bytes read as one integer: a gather of single values, a third faster than of rows
    words = table.contiguous().view(word).reshape(-1)
    if rows is not None:
        torch.index_select(words, 0, index, out=rows.view(word).reshape(-1))
        return rows
    return words.index_select(0, index).view(table.dtype).reshape(-1, table.shape[1])


def _by_words(book: Tensor, packed: Tensor, bits: int, count: int, groups: int) -> Tensor:
    """Indices unpacked eight at a time from ``bits`` bytes read as one 64-bit word. Returns (count, d)."""
    words = torch.nn.functional.pad(packed, (0, (-packed.numel()) % bits)).reshape(-1, bits).to(torch.int64)
    word = (words * _powers(256, bits, packed.device)).sum(1, keepdim=True)  # (groups of eight, 1): <= 56 bits
    index = (word // _powers(1 << bits, 8, packed.device) % (1 << bits)).reshape(-1)[:count]
    if groups > 1:
        index = index + torch.arange(count, device=packed.device) // (count // groups) * book.shape[1]
    return book.reshape(-1, book.shape[-1]).index_select(0, index)


def _powers(base: int, count: int, device: torch.device) -> Tensor:
    """(count,) int64: 1, base, base**2, ... (arithmetic on an arange: no constant tensor in a traced graph)."""
    return torch.pow(base, torch.arange(count, device=device))


def _cast(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """``tensor`` in ``dtype``, with no operation (nor a node in a traced graph) when it already is."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)
