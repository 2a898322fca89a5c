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


@st.composite
def compressed_layers(draw, outliers: bool = True):
    """A valid CompressedLayer of random shape, storage spec, dtypes, codebook size and outliers.

    Covers every bit width, vectors, grouped codebooks, per-channel scales, both layouts, and codebooks
    shorter than ``2**bits``."""
    from hypothesis import assume

    from dkm_param.format.layer import CompressedLayer

    out = draw(st.sampled_from([2, 4, 6]))
    shape = draw(st.sampled_from([(out, 8, 3, 3), (out, 4, 1, 2), (out, 12), (out, 10), (24,)]))
    spec = dp.StorageSpec(
        bits=draw(st.integers(min_value=1, max_value=8)),
        dim=draw(st.sampled_from([1, 2, 4])),
        group_size=draw(st.sampled_from([None, out, out // 2] if len(shape) > 1 else [None])),
        channel_scale=draw(st.booleans()),
        layout=draw(st.sampled_from(["flat", "input"])),
    )
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    numel = 1
    for size in shape:
        numel *= size
    assume(numel % spec.dim == 0)  # the rest of what a layer needs, layer.problem() checks below
    gen = torch.Generator().manual_seed(draw(seeds))
    groups = out // spec.group_size if spec.group_size else 1
    k = draw(st.integers(min_value=1, max_value=spec.clusters))
    book_dtype = draw(st.sampled_from([dtype, torch.float32]))
    book = torch.randn((groups, k, spec.dim) if spec.group_size else (k, spec.dim), generator=gen).to(book_dtype)
    indices = torch.randint(0, k, (numel // spec.dim,), generator=gen).to(torch.uint8)
    rows = shape[0] if len(shape) > 1 else 1
    scale = (torch.rand(rows, generator=gen) + 0.5).to(dtype) if spec.channel_scale else None
    index = value = None
    if outliers and draw(st.booleans()):
        count = draw(st.integers(min_value=1, max_value=min(numel, 5)))
        index = torch.randperm(numel, generator=gen)[:count].sort().values
        value = (torch.randn(count, generator=gen) * 10).to(dtype)
    layer = CompressedLayer(shape=shape, dtype=dtype, spec=spec, codebook=book, indices=indices, scale=scale,
                            outlier_index=index, outlier_value=value)
    assume(layer.problem() is None)
    return layer
