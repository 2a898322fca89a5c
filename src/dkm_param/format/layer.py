"""CompressedLayer: one clustered weight as plain tensors (codebook, indices, scale) and its StorageSpec."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import SpecError
from ..ops import layout, packing
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
