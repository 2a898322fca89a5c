"""Differentiable k-means on tensors: attention, centroid iterations, soft weights.

Pure functions of ``vectors`` (n, d), ``codebook`` (k, d) and a temperature;
nothing here knows about modules or policies. The memory-light engine behind
``soft_cluster`` and ``settle`` lives in ``_engine``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _engine
from ._engine import OrderCache, _cluster, _em_step, _SoftCluster, _squarem, _summary

__all__ = [
    "OrderCache",
    "SETTLE_POINTS",
    "attention",
    "centroid_update",
    "settle",
    "soft_cluster",
    "soft_cluster_reference",
    "summary",
]

def attention(vectors: Tensor, codebook: Tensor, tau: float) -> Tensor:
    """``softmax(-||w_i - c_j||^2 / tau)`` over the clusters j.  # (n, k)"""
    distances = (vectors[:, None, :] - codebook[None, :, :]).pow(2).sum(-1)  # (n, k)
    return torch.softmax(-distances / tau, dim=1)


def centroid_update(vectors: Tensor, attn: Tensor, codebook: Tensor) -> Tensor:
    """``c_j = sum_i A_ij w_i / sum_i A_ij``; a cluster with no mass keeps its centroid."""
    mass = attn.sum(0)  # (k,)
    moved = (attn.T @ vectors) / mass.clamp_min(torch.finfo(mass.dtype).tiny)[:, None]
    return torch.where(mass[:, None] > 0, moved, codebook)


def soft_cluster_reference(
    vectors: Tensor, codebook: Tensor, tau: float, max_iter: int, epsilon: float
) -> tuple[Tensor, Tensor, int]:
    """The plain unrolled DKM step, every iteration kept by autograd.

    Returns ``(soft vectors A @ C (n, d), final codebook (k, d), iterations run)``.
    Iterates ``A = attention(W, C); C = update(W, A)`` until no centroid moves
    more than ``epsilon`` or ``max_iter`` iterations; the soft vectors use the
    last attention and the last codebook, as in the paper's algorithm.
    """
    centroids = codebook
    for iteration in range(1, max_iter + 1):
        attn = attention(vectors, centroids, tau)
        updated = centroid_update(vectors, attn, centroids)
        shift = (updated - centroids).abs().max()
        centroids = updated
        if shift.item() <= epsilon:
            break
    return attn @ centroids, centroids, iteration


# ``settle`` runs on a summary of at most this many points.
SETTLE_POINTS = 1 << 14


def summary(
    vectors: Tensor, points: int = SETTLE_POINTS, seed: int = 0, counts: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """At most ``points`` weighted points that stand for ``vectors``.  # (p, d), (p,)

    One dimension: the means of equal-width bins, sorted, weighted by how many
    vectors fell in each (``counts``: how many each of ``vectors`` stands for).
    More: a random sample drawn with ``seed``, each weighing one.
    """
    with torch.no_grad():
        return _summary(vectors, points, seed, counts)


def settle(
    vectors: Tensor,
    codebook: Tensor,
    tau: float,
    max_iter: int,
    epsilon: float,
    seed: int = 0,
    counts: Tensor | None = None,
) -> tuple[Tensor, int]:
    """The codebook moved, without gradient, to a fixed point of the centroid iterations:
    where one more iteration moves no centroid more than ``epsilon``.  # (k, d), iterations run

    Runs on a summary of at most ``SETTLE_POINTS`` weighted points (in one
    dimension the means of equal-width bins, weighted by their counts; in more, a
    random sample drawn with ``seed``) and stops after ``max_iter`` iterations if
    it has not got there. A codebook seeded by hard k-means is far from the
    fixed point of the soft iterations, and plain iterations approach it slowly
    (hundreds, near the temperatures DKM uses); settled, a training step starts
    there and most stop after one iteration.

    The iterations are EM for a mixture of k equal Gaussians of variance tau/2,
    so they are accelerated as EM is, by SQUAREM (Varadhan and Roland, 2008): two
    iterations give a direction and a step length to extrapolate along, and the
    extrapolated point is kept only if its likelihood is no lower than after the
    first of the two, so the ascent stays monotone and ends at a stable fixed point.
    The step length is capped by a bound that grows fourfold while it is reached
    and accepted, and shrinks fourfold on a rejection.

    counts: in one dimension, how many weights each of ``vectors`` stands for
    (a table of distinct values and their counts settles as the weight would).
    """
    if counts is not None and vectors.shape[1] != 1:
        raise ValueError(f"counts weigh one-dimensional vectors only, got dim {vectors.shape[1]}")
    with torch.no_grad():
        points, counts = _summary(vectors, SETTLE_POINTS, seed, counts)
        settled, iterations = _squarem(points, counts, codebook, tau, max_iter, epsilon)
        if points.shape[0] < vectors.shape[0] and vectors.shape[1] > 1:
            # a sample's fixed point is off the data's by the sample's noise, which with
            # few vectors per cluster can exceed the seed's own distance: keep the likelier
            ones = vectors.new_ones(vectors.shape[0])
            if _em_step(vectors, ones, settled, tau)[1] < _em_step(vectors, ones, codebook, tau)[1]:
                return codebook, iterations
        return settled, iterations


def soft_cluster(
    vectors: Tensor,
    codebook: Tensor,
    tau: float,
    max_iter: int,
    epsilon: float,
    *,
    window: bool = True,
    chunk_elements: int | None = None,
    order_cache: OrderCache | None = None,
) -> tuple[Tensor, Tensor, int]:
    """DKM soft clustering for training: ``soft_cluster_reference``'s results with
    memory O(n d + iterations k d) instead of O(iterations n k).

    Returns ``(soft vectors (n, d), final codebook (k, d) detached, iterations run)``.
    Gradients reach ``vectors`` through the attention and every centroid
    iteration; none reach ``codebook`` (callers pass a detached warm start).
    window: in one dimension with 8 or more clusters, group the vectors by
        value and let each chunk attend only to the centroids whose attention
        can exceed ``eps / n`` of a row's largest (eps of the dtype); False
        attends to every centroid. On the CPU only: on a GPU every chunk
        attends to every centroid (windows are planned on the host).
    chunk_elements: elements of one chunk's attention block (default ``_engine.chunk_budget``:
        ``CHUNK_ELEMENTS`` on the CPU, ``DEVICE_CHUNK_ELEMENTS`` elsewhere).
    order_cache: an ``OrderCache`` kept for this weight from one call to the
        next, so that windows reuse the last call's grouping instead of sorting anew.
    Raises ValueError if ``max_iter < 1``.
    """
    if max_iter < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter}")
    budget = max(1, int(chunk_elements or _engine.chunk_budget(vectors.device)))
    window = window and _engine.on_host(vectors.device)
    args = (float(tau), int(max_iter), float(epsilon), window, budget, order_cache)
    # every operation in the vectors' dtype, whatever autocast the caller runs under
    with torch.autocast(vectors.device.type, enabled=False):
        if torch.is_grad_enabled() and vectors.requires_grad:
            return _SoftCluster.apply(vectors, codebook, *args)
        with torch.no_grad():
            run = _cluster(vectors, codebook, *args)
    return run.soft, run.codebooks[-1], len(run.masses)
