"""Post-training palettization: cluster each selected weight once, no training."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from ..dkm.exportable import exportable_parametrizations
from ..errors import ClusteringError, DKMError, RegistrationError
from ..format import CompressedLayer, CompressedModel, assemble
from ..format.layer import check_codebook_dtype
from ..ops import kmeans, layout
from ..ops.dtypes import compute_dtype
from ..policy import Policy, check_materialized, weight_key, weight_of
from ..progress import track
from ..spec import LayerSpec, StorageSpec


def palettize(
    model: nn.Module,
    policy: Policy | None = None,
    *,
    sensitivity: Mapping[str, Tensor] | None = None,
    optimal: bool = False,
    codebook_dtype: torch.dtype | None = None,
    inplace: bool = True,
) -> CompressedModel:
    """Cluster every weight ``policy`` selects with k-means, in seconds.

    Returns the same CompressedModel (and file format) as ``finalize``.
    sensitivity: per module name, a tensor of the weight's shape weighting
        each value in the clustering (e.g. from ``fisher``); vectors weigh
        the sum of their values' sensitivities.
    optimal: 1-D layers use the exact dynamic-programming k-means (slower)
        instead of Lloyd on sorted values.
    inplace: write the snapped weights into ``model`` (default), once every
        layer has been clustered, so an error leaves the model as it was; with False
        the model keeps its weights, e.g. to seed DKM from the result with
        ``register_dkm(model, policy, init=compressed)``.
    Raises RegistrationError for a model with DKM registered.
    """
    if next(exportable_parametrizations(model), None) is not None:
        raise RegistrationError("model has DKM registered; call dp.finalize(model) instead, or dp.remove_dkm first")
    check_codebook_dtype(codebook_dtype)
    policy = policy if policy is not None else Policy()
    plan = policy.plan(model)
    check_materialized(model, plan.clustered())
    layers: dict[str, CompressedLayer] = {}
    aliases: dict[str, str] = {}
    rows = plan.clustered()
    for row in track(rows, total=len(rows), desc="palettizing"):
        weight = weight_of(model.get_submodule(row.name))
        importance = None if sensitivity is None else sensitivity.get(row.name)
        layers[weight_key(row.name)] = cluster_weight(
            weight.detach(), row.spec, row.name, importance, optimal=optimal, codebook_dtype=codebook_dtype
        )
        for follower in row.followers:
            aliases[weight_key(follower)] = weight_key(row.name)
    if inplace:  # only once every layer has been clustered: an error leaves the model as it was
        with torch.no_grad():
            for row in rows:
                weight_of(model.get_submodule(row.name)).copy_(layers[weight_key(row.name)].weight())
    return assemble(model.state_dict(), layers, aliases, plan.skipped())


def cluster_weight(
    weight: Tensor,
    spec: LayerSpec | StorageSpec,
    name: str = "",
    importance: Tensor | None = None,
    optimal: bool = False,
    codebook_dtype: torch.dtype | None = None,
) -> CompressedLayer:
    """k-means of one weight into a CompressedLayer (codebook, indices).

    spec: a LayerSpec (its ``seed`` seeds k-means) or a StorageSpec (seed 0).
    """
    seed = getattr(spec, "seed", 0)
    if not torch.isfinite(weight).all():
        raise DKMError(f"layer '{name}': weight holds NaN or Inf; fix the weights or skip the layer in the policy")
    work = weight.to(compute_dtype(weight.dtype))
    scale = layout.channel_scale(work) if spec.channel_scale else None
    groups = layout.grouped_vectors(work, spec.dim, spec.group_size, scale, spec.layout)  # (G, n, d)
    masses = None
    if importance is not None:
        if importance.shape != weight.shape:
            raise DKMError(
                f"layer '{name}': sensitivity has shape {tuple(importance.shape)}, the weight {tuple(weight.shape)}; "
                "pass one value per weight"
            )
        masses = layout.grouped_vectors(
            importance.detach().to(work.dtype), spec.dim, spec.group_size, layout=spec.layout
        ).sum(2)
        if not torch.isfinite(masses).all() or (masses < 0).any():
            raise DKMError(f"layer '{name}': sensitivity must be finite and >= 0")
    check_codebook_dtype(codebook_dtype)
    stored = codebook_dtype or weight.dtype
    books, indices = [], []
    pinned = 1 if spec.preserve_zeros else 0  # entry 0 pinned at zero for pruned weights
    for g, vectors in enumerate(groups):
        zeros = (vectors == 0).all(1) if spec.preserve_zeros else torch.zeros(len(vectors), dtype=torch.bool)
        live = vectors[~zeros]
        mass = None if masses is None else masses[g][~zeros]
        if mass is not None and mass.sum() <= 0:
            mass = None  # the loss ignores this group: cluster plainly
        free = spec.clusters - pinned
        try:
            if not len(live):
                codebook = vectors.new_zeros(free, spec.dim)
            elif spec.dim == 1:
                engine = kmeans.kmeans_1d_optimal if optimal else kmeans.kmeans_1d
                extra = {} if optimal else {"seed": seed}
                codebook = engine(live[:, 0], free, weights=mass, **extra)[0][:, None]
            else:
                codebook = kmeans.kmeans_vectors(live, free, weights=mass, seed=seed)[0]
        except kmeans.EmptyClusterError as exc:
            raise ClusteringError(f"layer '{name}' ({spec.bits} bits, dim {spec.dim}): {exc}") from None
        codebook = codebook.to(stored).to(work.dtype)  # assign against the codebook as stored
        found = kmeans.nearest(vectors, codebook) + pinned
        books.append(torch.cat([codebook.new_zeros(pinned, spec.dim), codebook]))
        indices.append(torch.where(zeros.to(found.device), 0, found))
    codebook = books[0] if len(books) == 1 else torch.stack(books)
    layer = CompressedLayer(
        shape=tuple(weight.shape),
        dtype=weight.dtype,
        spec=spec,
        codebook=codebook.to(stored).cpu(),
        indices=torch.cat(indices).to(torch.uint8).cpu(),
        scale=None if scale is None else scale.cpu(),
    )
    problem = layer.problem()  # e.g. a codebook that overflows the dtype it is stored in
    if problem:
        raise DKMError(f"layer '{name}': {problem}; store the codebook in a wider dtype (codebook_dtype)")
    return layer
