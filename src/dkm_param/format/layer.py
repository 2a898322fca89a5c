"""CompressedLayer: one clustered weight as plain tensors (codebook, indices, scale) and its StorageSpec."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import FormatError, SpecError
from ..ops import layout, packing
from ..ops.decode import decode_packed
from ..ops.dtypes import DTYPES, compute_dtype, is_supported
from ..spec import StorageSpec


@dataclass(eq=False)
class CompressedLayer:
    """One clustered weight: ``weight = codebook[indices].reshape(shape)``.

    codebook: (k, d) centroids, or (groups, k, d) with one codebook per group
    of output channels (whenever ``spec.group_size`` is set); indices: (n,) uint8, one per vector of d consecutive
    weights, groups in order, held bit-packed as in the file (``packed``) and
    unpacked when read (``vectors`` counts them without unpacking); scale: (rows,) per-channel scale or None;
    dtype: the weight's own dtype; spec: the storage half of the layer's spec,
    which the file carries whole. See ``ops.layout`` for the exact reading.
    outlier_index, outlier_value: the sparse part, or both None: weights kept
    exact, ``weight.reshape(-1)[outlier_index] = outlier_value`` after the
    lookup; positions (int64, or int32 as the file stores them; strictly increasing) in the weight's own
    row-major order, values in its dtype.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    spec: StorageSpec
    codebook: Tensor
    indices: Tensor
    scale: Tensor | None = None
    outlier_index: Tensor | None = None
    outlier_value: Tensor | None = None

    def __post_init__(self):
        spec = getattr(self.spec, "storage", self.spec)  # a LayerSpec gives its storage half
        if not isinstance(spec, StorageSpec):
            raise SpecError(f"CompressedLayer.spec must be a StorageSpec, got {type(self.spec).__name__}")
        self.spec = spec
        if spec.group_size is not None and self.codebook.dim() == 2:
            self.codebook = self.codebook[None]  # grouped codebooks are (groups, k, d), even one group

    def _get_indices(self) -> Tensor:
        if self._packed is None:
            return self._raw
        return packing.unpack(self._packed, self.spec.bits, self._vectors)

    def _set_indices(self, indices: Tensor) -> None:
        """Held packed where they are what the file can hold (integers in range, 1-D, on the CPU); anything
        else as given, for ``problem`` to name."""
        self._packed, self._raw, self._vectors = None, indices, indices.numel()
        bits = getattr(getattr(self.spec, "storage", self.spec), "bits", None)
        if (isinstance(bits, int) and indices.dim() == 1 and indices.device.type == "cpu"
                and indices.dtype in (torch.uint8, torch.int16, torch.int32, torch.int64)):
            try:
                self._packed, self._raw = packing.pack(indices, bits), None
            except ValueError:  # out of range: kept for problem() to report
                pass

    @property
    def vectors(self) -> int:
        """How many indices (vectors) the layer holds."""
        return self._vectors

    @property
    def packed(self) -> Tensor:
        """The indices bit-packed as the file stores them (LSB first).  # uint8"""
        return self._packed if self._packed is not None else packing.pack(self._raw, self.spec.bits)

    def weight(self) -> Tensor:
        """The decoded weight, of ``shape`` and ``dtype``: the lookup, then the outliers put back.

        Read from the packed indices (``ops.decode.decode_packed``): besides the weight itself, a
        transient of about its size, never an index of four or eight bytes a weight.
        """
        return decode_packed(
            self.codebook, self.packed, self.shape, self.dtype, self.spec.bits, self.scale, self.spec.layout,
            self.outlier_index, self.outlier_value, bitcast=True,
        )

    @property
    def outliers(self) -> int:
        """How many weights the sparse part keeps exact."""
        return 0 if self.outlier_index is None else self.outlier_index.numel()

    @property
    def numel(self) -> int:
        """Weights in the layer."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes this layer takes in the file: codebook plus packed indices."""
        codebook = self.codebook.numel() * self.codebook.element_size()
        scale = 0 if self.scale is None else self.scale.numel() * self.scale.element_size()
        sparse = 0
        if self.outlier_index is not None:
            sparse = self.outliers * (outlier_index_dtype(self.numel).itemsize + self.outlier_value.element_size())
        return codebook + scale + sparse + packing.packed_size(self.vectors, self.spec.bits)

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
        indices = self.indices  # unpacked once
        if indices.dim() != 1 or indices.numel() * spec.dim != self.numel:
            return f"{indices.numel()} indices of dim {spec.dim} do not make shape {shape}"
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
        if indices.numel() and int(indices.max()) >= book[-2]:
            return f"index {int(indices.max())} is out of range of a {book[-2]}-entry codebook"
        if indices.numel() and int(indices.min()) < 0:
            return "indices must not be negative"
        if spec.preserve_zeros and (self.codebook[..., 0, :] != 0).any():
            return "preserve_zeros is set but codebook entry 0 is not zero"
        problem = _outlier_problem(self.outlier_index, self.outlier_value, self.numel, self.dtype)
        if problem:
            return problem
        return _overflow(self.codebook, self.scale, shape, self.dtype)


CompressedLayer.indices = property(  # a dataclass field, stored packed
    CompressedLayer._get_indices, CompressedLayer._set_indices,
    doc="The indices, (n,) uint8 one per vector (unpacked from ``packed`` on each read).",
)


def outlier_index_dtype(numel: int) -> torch.dtype:
    """The dtype the file stores a layer's outlier positions in: int32 where they fit, else int64."""
    return torch.int32 if numel <= torch.iinfo(torch.int32).max else torch.int64


def _outlier_problem(index: Tensor | None, value: Tensor | None, numel: int, dtype: torch.dtype) -> str | None:
    """Why the sparse part cannot be decoded into a weight of ``numel`` values of ``dtype``, or None."""
    if index is None and value is None:
        return None
    if index is None or value is None:
        return "outlier_index and outlier_value must be given together"
    if index.dim() != 1 or value.dim() != 1 or index.numel() != value.numel():
        return (
            f"outlier_index {tuple(index.shape)} and outlier_value {tuple(value.shape)} must be two 1-D tensors "
            "of one length"
        )
    if index.dtype not in (torch.int32, torch.int64):
        return f"outlier_index must be int32 or int64, got {index.dtype}"
    if value.dtype != dtype:
        return f"outlier_value must be in the weight's dtype {dtype}, got {value.dtype}"
    if index.numel() > numel:
        return f"{index.numel()} outliers is more than the layer's {numel} weights"
    if index.numel():
        if int(index.min()) < 0 or int(index.max()) >= numel:
            return f"outlier positions must lie in 0..{numel - 1}, got {int(index.min())}..{int(index.max())}"
        if index.numel() > 1 and not bool((index[1:] > index[:-1]).all()):
            return "outlier positions must be strictly increasing (sorted, each once)"
        if not torch.isfinite(value).all():
            return "outlier values hold NaN or Inf"
    return None


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
