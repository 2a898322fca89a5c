"""CompressedLayer: one clustered weight as plain tensors (codebook, indices, scale) and its StorageSpec."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import FormatError, SpecError
from ..ops import layout, packing
from ..ops.dtypes import DTYPES, compute_dtype, is_supported
from ..spec import StorageSpec


@dataclass
class CompressedLayer:
    """One clustered weight: ``weight = codebook[indices].reshape(shape)``.

    codebook: (k, d) centroids, or (groups, k, d) with one codebook per group
    of output channels (whenever ``spec.group_size`` is set); indices: (n,) uint8, one per vector of d consecutive
    weights, groups in order; scale: (rows,) per-channel scale or None;
    dtype: the weight's own dtype; spec: the storage half of the layer's spec,
    which the file carries whole. See ``ops.layout`` for the exact reading.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    spec: StorageSpec
    codebook: Tensor
    indices: Tensor
    scale: Tensor | None = None

    def __post_init__(self):
        spec = getattr(self.spec, "storage", self.spec)  # a LayerSpec gives its storage half
        if not isinstance(spec, StorageSpec):
            raise SpecError(f"CompressedLayer.spec must be a StorageSpec, got {type(self.spec).__name__}")
        self.spec = spec
        if spec.group_size is not None and self.codebook.dim() == 2:
            self.codebook = self.codebook[None]  # grouped codebooks are (groups, k, d), even one group

    def weight(self) -> Tensor:
        """The decoded weight, of ``shape`` and ``dtype``."""
        return layout.decode(self.codebook, self.indices, self.shape, self.dtype, self.scale, self.spec.layout)

    @property
    def numel(self) -> int:
        """Weights in the layer."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes this layer takes in the file: codebook plus packed indices."""
        codebook = self.codebook.numel() * self.codebook.element_size()
        scale = 0 if self.scale is None else self.scale.numel() * self.scale.element_size()
        return codebook + scale + packing.packed_size(self.indices.numel(), self.spec.bits)

    def problem(self) -> str | None:
        """Why this layer is not one the file can hold and decode to finite weights, or None.

        The reader asks of every layer it reads, and the writer before saving, so
        that it never writes a file its reader refuses.
        """
        spec, shape = self.spec, tuple(self.shape)
        if not shape or any(not isinstance(s, int) or s < 1 for s in shape):
            return f"shape {shape} must be positive sizes"
        if not is_supported(self.dtype):
            return f"dtype {self.dtype} is not one the file holds"
        rows = layout.rows(shape)
        if spec.group_size is not None and rows % spec.group_size:
            return f"group_size={spec.group_size} does not divide the {rows} output channels"
        if spec.layout == "input" and len(shape) > 2 and shape[1] % spec.dim:
            return f"dim={spec.dim} does not divide the {shape[1]} input channels (layout 'input')"
        if spec.per_channel and (self.numel // rows) % spec.dim:
            return f"dim={spec.dim} does not divide an output channel's {self.numel // rows} values"
        if self.indices.dim() != 1 or self.indices.numel() * spec.dim != self.numel:
            return f"{self.indices.numel()} indices of dim {spec.dim} do not make shape {shape}"
        groups = layout.groups(shape, spec.group_size)
        lead = (groups,) if spec.group_size is not None else ()
        book = tuple(self.codebook.shape)
        if len(book) != len(lead) + 2 or book[: len(lead)] != lead or book[-1] != spec.dim:
            return f"codebook shape {book} does not fit dim={spec.dim}, groups={groups}"
        if not 1 <= book[-2] <= spec.clusters:
            return f"codebook has {book[-2]} entries, bits={spec.bits} allows 1 to {spec.clusters}"
        if not is_supported(self.codebook.dtype):
            return f"codebook dtype {self.codebook.dtype} is not supported"
        if not torch.isfinite(self.codebook).all():
            return "codebook holds NaN or Inf"
        if (self.scale is not None) != spec.channel_scale:
            there = "there" if self.scale is not None else "missing"
            return f"channel_scale is {spec.channel_scale} but the scale is {there}"
        if self.scale is not None:
            if tuple(self.scale.shape) != (rows,):
                return f"scale must have shape ({rows},), got {tuple(self.scale.shape)}"
            if not is_supported(self.scale.dtype) or not torch.isfinite(self.scale).all():
                return f"scale must be finite floats of a supported dtype, got {self.scale.dtype}"
        if self.indices.numel() and int(self.indices.max()) >= book[-2]:
            return f"index {int(self.indices.max())} is out of range of a {book[-2]}-entry codebook"
        if self.indices.numel() and int(self.indices.min()) < 0:
            return "indices must not be negative"
        if spec.preserve_zeros and (self.codebook[..., 0, :] != 0).any():
            return "preserve_zeros is set but codebook entry 0 is not zero"
        return _overflow(self.codebook, self.scale, shape, self.dtype)


def _overflow(codebook: Tensor, scale: Tensor | None, shape: tuple[int, ...], dtype: torch.dtype) -> str | None:
    """Why decoding would give weights that are not finite in ``dtype``, or None.

    Every codebook entry counts (used or not), times each scale of the rows
    that read it, computed and cast as decoding does.
    """
    work = compute_dtype(dtype)
    largest = codebook.to(work).abs().amax(dim=(-2, -1)).reshape(-1)  # (groups,)
    if scale is not None:
        largest = scale.to(work).abs() * largest.repeat_interleave(layout.rows(shape) // largest.numel())  # (rows,)
    if torch.isfinite(largest.to(dtype)).all():
        return None
    scaled = " times scale" if scale is not None else ""
    return (
        f"decoded weights would overflow {str(dtype).removeprefix('torch.')} "
        f"(codebook{scaled} up to {float(largest.max()):.3g})"
    )


def check_codebook_dtype(dtype: torch.dtype | None) -> None:
    """Raise FormatError unless ``dtype`` (None: the weight's own) is one a codebook can be stored in."""
    if dtype is not None and not is_supported(dtype):
        raise FormatError(f"codebook dtype {dtype} is not supported; use one of {', '.join(DTYPES)}")
