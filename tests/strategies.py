"""Hypothesis strategies shared by the test modules."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

import dkm_param as dp

bits = st.integers(min_value=1, max_value=8)
small_bits = st.integers(min_value=1, max_value=4)
dims = st.sampled_from([1, 2, 4])
scales = st.sampled_from([1e-4, 1e-2, 1.0, 100.0])
seeds = st.integers(min_value=0, max_value=2**16)


@st.composite
def weights(draw, min_vectors: int = 16, max_vectors: int = 300, dim: int | None = None, scale=None):
    """A float32 weight tensor of random shape whose numel is a multiple of ``dim``.

    Returns (weight, dim)."""
    d = dim if dim is not None else draw(dims)
    n = draw(st.integers(min_value=min_vectors, max_value=max_vectors))
    s = draw(scales) if scale is None else scale
    seed = draw(seeds)
    gen = torch.Generator().manual_seed(seed)
    shape = draw(st.sampled_from([(n * d,), (n, d), (d, n)]))
    return torch.randn(shape, generator=gen) * s, d


@st.composite
def specs(draw, max_bits: int = 4, dim: int | None = None):
    return dp.LayerSpec(
        bits=draw(st.integers(min_value=1, max_value=max_bits)),
        dim=dim if dim is not None else draw(dims),
        init=draw(st.sampled_from(["kmeans++", "linear", "quantile"])),
        seed=draw(seeds),
    )


@st.composite
def storage_specs(draw, rows: int = 8, max_bits: int = 4):
    """A StorageSpec that fits a weight of ``rows`` output channels with 12 values each."""
    preserve_zeros = draw(st.booleans())
    return dp.StorageSpec(
        bits=draw(st.integers(min_value=2 if preserve_zeros else 1, max_value=max_bits)),
        dim=draw(st.sampled_from([1, 2, 4])),
        group_size=draw(st.sampled_from([None, rows, rows // 2])),
        channel_scale=draw(st.booleans()),
        preserve_zeros=preserve_zeros,
        layout=draw(st.sampled_from(["flat", "input"])),
    )
