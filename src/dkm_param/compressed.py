"""CompressedLayer: one clustered weight as plain tensors (codebook, indices, scale)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from . import layout, packing
from .spec import LayerSpec


@dataclass
class CompressedLayer:
    """One clustered weight: ``weight = codebook[indices].reshape(shape)``.

    codebook: (k, d) centroids, or (groups, k, d) with one codebook per group
    of output channels; indices: (n,) uint8, one per vector of d consecutive
    weights, groups in order; scale: (rows,) per-channel scale or None;
    dtype: the weight's own dtype. See ``layout`` for the exact reading.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    spec: LayerSpec
    codebook: Tensor
    indices: Tensor
    scale: Tensor | None = None

    def weight(self) -> Tensor:
        return layout.decode(self.codebook, self.indices, self.shape, self.dtype, self.scale, self.spec.layout)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes this layer takes in the file: codebook plus packed indices."""
        codebook = self.codebook.numel() * self.codebook.element_size()
        scale = 0 if self.scale is None else self.scale.numel() * self.scale.element_size()
        return codebook + scale + packing.packed_size(self.indices.numel(), self.spec.bits)
