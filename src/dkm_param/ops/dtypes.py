"""Dtype rules: which dtypes a file may hold, and the dtype clustering computes in."""

from __future__ import annotations

import torch

# The float dtypes a weight, codebook or scale may have, by the name the file uses.
DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The file's name of a supported dtype. Raises KeyError for any other dtype."""
    return _NAMES[dtype]


def is_supported(dtype: torch.dtype) -> bool:
    """Whether the file format can hold a tensor of this dtype as a weight, codebook or scale."""
    return dtype in _NAMES


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Clustering runs in float32 (float64 for float64 weights), whatever the weight's dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def itemsize(dtype: torch.dtype) -> int:
    """Bytes one element of ``dtype`` takes."""
    return torch.empty((), dtype=dtype).element_size()
