"""Hard k-means on tensors: nearest-centroid assignment, seeding, Lloyd iterations."""

from __future__ import annotations

import torch
from torch import Tensor

# Distances are computed over row chunks of at most this many (vector, centroid) pairs.
_PAIRS_PER_CHUNK = 1 << 22
# Seeding and the initial Lloyd refinement run on at most this many vectors.
_SEED_SAMPLE = 1 << 16


def nearest(vectors: Tensor, codebook: Tensor) -> Tensor:
    """Index of the nearest centroid for every vector.  # (n,) int64

    Memory stays O(n + k): 1-D uses a binary search over the sorted centroids,
    vectors use chunked exact distances.
    """
    if codebook.shape[1] == 1:
        order = torch.argsort(codebook[:, 0], stable=True)
        ordered = codebook[order, 0]
        midpoints = (ordered[1:] + ordered[:-1]) / 2
        return order[torch.searchsorted(midpoints, vectors[:, 0].contiguous(), right=False)]
    rows = max(1, _PAIRS_PER_CHUNK // codebook.shape[0])
    out = torch.empty(vectors.shape[0], dtype=torch.long, device=vectors.device)
    for start in range(0, vectors.shape[0], rows):
        chunk = vectors[start : start + rows]
        dist = torch.cdist(chunk, codebook, compute_mode="donot_use_mm_for_euclid_dist")
        out[start : start + rows] = dist.argmin(1)
    return out


def squared_distance_to_nearest(vectors: Tensor, codebook: Tensor) -> Tensor:
    """``min_j ||w_i - c_j||^2`` for every vector.  # (n,)"""
    return (vectors - codebook[nearest(vectors, codebook)]).pow(2).sum(1)


def kmeans_plusplus(vectors: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding (Arthur and Vassilvitskii): each new centroid drawn
    with probability proportional to its squared distance to the chosen ones.  # (k, d)"""
    n = vectors.shape[0]
    first = torch.randint(n, (1,), generator=generator, device="cpu").item()
    centroids = [vectors[first]]
    closest = (vectors - vectors[first]).pow(2).sum(1)
    for _ in range(1, k):
        total = closest.sum()
        if total <= 0:  # every vector already sits on a centroid: repeat one
            pick = torch.randint(n, (1,), generator=generator, device="cpu").item()
        else:
            pick = torch.multinomial((closest / total).cpu(), 1, generator=generator).item()
        centroids.append(vectors[pick])
        closest = torch.minimum(closest, (vectors - vectors[pick]).pow(2).sum(1))
    return torch.stack(centroids)


def lloyd(vectors: Tensor, codebook: Tensor, iterations: int) -> Tensor:
    """Plain Lloyd iterations; an empty cluster keeps its centroid.  # (k, d)"""
    k = codebook.shape[0]
    for _ in range(iterations):
        assign = nearest(vectors, codebook)
        counts = torch.bincount(assign, minlength=k).to(vectors.dtype)
        sums = torch.zeros_like(codebook).index_add_(0, assign, vectors)
        updated = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], codebook)
        if torch.equal(updated, codebook):
            break
        codebook = updated
    return codebook


def init_codebook(vectors: Tensor, k: int, method: str, seed: int, refine: int = 10) -> Tensor:
    """Seed a (k, d) codebook for ``vectors`` by ``method`` and refine it with Lloyd.

    method: ``kmeans++``, ``linear`` (evenly spaced between each coordinate's
    extremes) or ``quantile`` (each coordinate's quantiles, so dense regions
    get more centroids). Runs on a fixed-seed subsample of large inputs.
    """
    generator = torch.Generator().manual_seed(seed)
    sample = vectors
    if vectors.shape[0] > _SEED_SAMPLE:
        pick = torch.randperm(vectors.shape[0], generator=generator)[:_SEED_SAMPLE]
        sample = vectors[pick.to(vectors.device)]
    if method == "kmeans++":
        codebook = kmeans_plusplus(sample, k, generator)
    elif method == "linear":
        steps = torch.linspace(0, 1, k, dtype=sample.dtype, device=sample.device)[:, None]
        low, high = sample.min(0).values, sample.max(0).values
        codebook = low + steps * (high - low)
    elif method == "quantile":
        levels = (torch.arange(k, dtype=sample.dtype, device=sample.device) + 0.5) / k
        codebook = torch.quantile(sample, levels, dim=0)
    else:
        raise ValueError(f"unknown init {method!r}")
    return lloyd(sample, codebook, refine)
