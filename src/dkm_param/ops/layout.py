"""How a weight is read as vectors: groups of output channels, per-channel scales.

Row ``r`` is output channel ``r``: the weight reshaped to ``(rows, -1)``
with ``rows = shape[0]`` (after moving a convolution's input channels last
with the ``input`` layout). Each group of ``group_size`` consecutive rows
owns a codebook (one group when ``group_size`` is None); within a group the
vectors are ``dim`` consecutive row-major values. With a per-channel scale
each row is clustered divided by its largest magnitude, and decoded as
``scale[row] * codebook[group, index]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .dtypes import compute_dtype


def rows(shape: tuple[int, ...]) -> int:
    return shape[0] if len(shape) > 1 else 1


def groups(shape: tuple[int, ...], group_size: int | None) -> int:
    return rows(shape) // group_size if group_size else 1


def channel_scale(weight: Tensor) -> Tensor:
    """Largest magnitude of each output channel (1 for an all-zero channel).  # (rows,)"""
    scale = weight.detach().reshape(rows(tuple(weight.shape)), -1).abs().amax(1)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def to_layout(weight: Tensor, layout: str) -> Tensor:
    """The weight with its vectors' values consecutive: ``input`` moves the
    input channels of a convolution last, (out, in, *k) -> (out, *k, in)."""
    return weight.movedim(1, -1) if layout == "input" and weight.dim() > 2 else weight


def from_layout(weight: Tensor, shape: tuple[int, ...], layout: str) -> Tensor:
    """Inverse of ``to_layout``: a tensor in layout order back to ``shape``."""
    if layout == "input" and len(shape) > 2:
        return weight.reshape(shape[0], *shape[2:], shape[1]).movedim(-1, 1)
    return weight.reshape(shape)


def grouped_vectors(
    weight: Tensor, dim: int, group_size: int | None, scale: Tensor | None = None, layout: str = "flat"
) -> Tensor:
    """The weight as (groups, vectors per group, dim), divided by ``scale`` per row."""
    shape = tuple(weight.shape)
    flat = to_layout(weight, layout).reshape(rows(shape), -1)
    if scale is not None:
        flat = flat / scale[:, None].to(flat.dtype)
    return flat.reshape(groups(shape, group_size), -1, dim)


def decode(
    codebook: Tensor,
    indices: Tensor,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    scale: Tensor | None = None,
    layout: str = "flat",
) -> Tensor:
    """``scale[row] * codebook[group, index]`` as a weight of ``shape`` and ``dtype``.

    codebook: (k, d) or (groups, k, d); indices: (n,) over all groups in order.
    Computed in float32 (float64 for float64 weights) and cast once, so every
    caller gets the same bits.
    """
    work = compute_dtype(dtype)
    book = codebook.to(work)
    index = indices.int()  # 4 bytes an index: a layer's decode holds them all at once
    if book.dim() == 2:
        vectors = book[index]
    else:
        per_group = index.numel() // book.shape[0]
        group = torch.arange(index.numel(), dtype=torch.int32, device=index.device) // per_group
        vectors = book[group, index]
    flat = vectors.reshape(rows(shape), -1)
    if scale is not None:
        flat = flat * scale.to(work)[:, None]
    return from_layout(flat, shape, layout).to(dtype)
