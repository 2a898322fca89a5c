"""DKMParametrization: the one module dkm_param attaches to a user's weight."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import dkm, kmeans
from .errors import DKMError
from .spec import LayerSpec


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Clustering runs in float32 (float64 for float64 weights), whatever the weight's dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class DKMParametrization(nn.Module):
    """``weight -> A @ C`` in training mode, ``weight -> C[nearest]`` in eval mode.

    State, all in buffers so ``state_dict`` checkpoints resume exactly:
    ``codebook`` (k, d), the warm-started centroids; ``tau``, the temperature;
    ``epsilon``, the absolute convergence threshold.

    One training-mode result is reused while neither the weight nor the
    codebook changed and its backward has not run, so a weight read several
    times in one step (tied weights, repeated calls) is clustered once and
    every reader sees the same tensor.
    """

    def __init__(self, weight: Tensor, spec: LayerSpec, name: str = "", codebook: Tensor | None = None):
        """codebook: (k, d) starting centroids (e.g. from ``palettize``) instead of ``spec.init``."""
        super().__init__()
        self.spec = spec
        self.name = name
        vectors = weight.detach().to(compute_dtype(weight.dtype)).reshape(-1, spec.dim)
        if codebook is None:
            codebook = kmeans.init_codebook(vectors, spec.clusters, spec.init, spec.seed)
        codebook = codebook.to(device=vectors.device, dtype=vectors.dtype)
        if spec.tau is not None:
            tau = torch.tensor(spec.tau, dtype=vectors.dtype)
        else:
            tau = spec.tau_rel * kmeans.squared_distance_to_nearest(vectors, codebook).mean()
            if tau <= 0:  # the weight sits on its centroids (already snapped): use their spacing
                tau = spec.tau_rel * _spacing(codebook).clamp_min(torch.finfo(vectors.dtype).tiny)
        self.register_buffer("codebook", codebook.contiguous())
        self.register_buffer("tau", torch.as_tensor(tau, dtype=vectors.dtype).clone())
        self.register_buffer("epsilon", (spec.epsilon * vectors.std(unbiased=False)).to(vectors.dtype))
        self._cached: tuple[tuple, Tensor] | None = None

    def extra_repr(self) -> str:
        return f"bits={self.spec.bits}, dim={self.spec.dim}, clusters={self.spec.clusters}, tau={float(self.tau):.3g}"

    def vectors(self, weight: Tensor) -> Tensor:
        """The weight as (n, d) vectors in the clustering dtype."""
        return weight.reshape(-1, self.spec.dim).to(self.codebook.dtype)

    def snap(self, weight: Tensor) -> Tensor:
        """Each vector replaced by its nearest centroid (no gradient to the weight)."""
        with torch.no_grad():
            vectors = self.vectors(weight)
            if not torch.isfinite(vectors).all():
                raise DKMError(self._non_finite("the weight holds NaN or Inf", weight))
            indices = kmeans.nearest(vectors, self.codebook)
        return self.codebook[indices].reshape(weight.shape).to(weight.dtype)

    def forward(self, weight: Tensor) -> Tensor:
        if not self.training:
            return self.snap(weight)
        key = self._key(weight)
        if self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        vectors = self.vectors(weight)
        if not torch.isfinite(vectors.detach()).all():
            raise DKMError(self._non_finite("the weight holds NaN or Inf", weight))
        soft, codebook, _ = dkm.soft_cluster(
            vectors, self.codebook.clone(), float(self.tau), self.spec.max_iter, float(self.epsilon)
        )
        if not torch.isfinite(codebook).all():  # never pass NaN on to the model
            raise DKMError(self._non_finite("clustering produced NaN or Inf centroids", weight))
        with torch.no_grad():
            self.codebook.copy_(codebook)  # warm start for the next step
        out = soft.reshape(weight.shape).to(weight.dtype)
        if out.requires_grad:
            out.register_hook(self._forget)
        self._cached = (self._key(weight), out)
        return out

    def _non_finite(self, what: str, weight: Tensor) -> str:
        bad = int((~torch.isfinite(weight.detach())).sum())
        return (
            f"layer '{self.name}' ({self.spec.bits} bits, dim {self.spec.dim}): {what} "
            f"({bad} of {weight.numel()} weights are not finite); lower the learning rate or clip "
            "gradients, and resume from the last finite checkpoint"
        )

    def __getstate__(self):
        # the cached result holds an autograd graph, which neither pickles nor deep-copies
        state = self.__dict__.copy()
        state["_cached"] = None
        return state

    def _key(self, weight: Tensor) -> tuple:
        return (weight.data_ptr(), weight._version, self.codebook._version, torch.is_grad_enabled())

    def _forget(self, grad: Tensor) -> None:
        # backward has consumed the graph: the next read must build a new one
        self._cached = None


def _spacing(codebook: Tensor) -> Tensor:
    """Mean squared error a uniform spread of vectors would have around these
    centroids: the squared distance to the nearest other centroid, over 12."""
    if codebook.shape[0] < 2:
        return codebook.new_zeros(())
    gaps = torch.cdist(codebook, codebook).pow(2).fill_diagonal_(float("inf")).min(1).values
    return gaps[torch.isfinite(gaps) & (gaps > 0)].mean().nan_to_num(0.0) / 12
