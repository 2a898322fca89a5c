"""Differentiable k-means on tensors: attention, centroid iterations, soft weights.

Pure functions of ``vectors`` (n, d), ``codebook`` (k, d) and a temperature;
nothing here knows about modules or policies.
"""

from __future__ import annotations

import torch
from torch import Tensor


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


def soft_cluster(
    vectors: Tensor, codebook: Tensor, tau: float, max_iter: int, epsilon: float
) -> tuple[Tensor, Tensor, int]:
    """DKM soft clustering used by the parametrization (see ``soft_cluster_reference``)."""
    return soft_cluster_reference(vectors, codebook, tau, max_iter, epsilon)
