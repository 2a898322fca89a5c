"""Post-training palettization: cluster each selected weight once, no training."""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor, nn

from ..dkm.exportable import exportable_parametrizations
from ..errors import ClusteringError, DKMError, RegistrationError
from ..format import CompressedLayer, CompressedModel, assemble
from ..format.layer import check_codebook_dtype, outlier_index_dtype
from ..ops import kmeans, layout
from ..ops.dtypes import compute_dtype
from ..ops.threads import threads_for
from ..policy import Policy, check_materialized, stored_size, weight_key, weight_of
from ..progress import track
from ..spec import LayerSpec, StorageSpec
from . import calibration as calibration_module
from .calibration import calibration_inputs, input_statistics


def palettize(
    model: nn.Module,
    policy: Policy | None = None,
    *,
    sensitivity: Mapping[str, Tensor] | None = None,
    optimal: bool = False,
    codebook_dtype: torch.dtype | None = None,
    inplace: bool = True,
    calibration: Iterable[Any] | None = None,
    damp: float = 0.01,
    outliers: float = 0.0,
    outlier_by: str = "magnitude",
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
    calibration: batches (inputs, ``(inputs, targets)`` pairs or dicts of
        keyword arguments) the model is run on to collect each clustered
        layer's input statistics ``H = sum x x^T``; each layer's k-means
        codebook (weighted by ``sensitivity``, or else by the energy of each
        input, ``H_cc``) is then assigned to column by column with error
        feedback (GPTQ on the lookup table; vectors of ``dim`` columns
        together), and refit by least squares weighted by ``H_cc`` where
        that lowers the layer's calibration error. Linear, transformers'
        Conv1D and ungrouped Conv1d/Conv2d layers. The statistics are
        collected a few layers at a time (at most 1 GiB of them), running
        the batches once per group of layers.
    damp: added to the diagonal of ``H``, as a fraction of its mean (GPTQ's 1%).
    outliers: the fraction of each layer's weights kept exact in a sparse part
        of the file (dense-and-sparse, as SqueezeLLM; e.g. 0.005), left out of
        its k-means; with calibration each keeps the value error feedback
        gave it, so the columns after it still compensate the others.
    outlier_by: which weights: ``"magnitude"`` (largest ``|w|``, per row
        scale where the spec has one) or ``"sensitivity"`` (largest value of
        ``sensitivity``, which must then be given for every layer).
    Raises RegistrationError for a model with DKM registered, SpecError for a
    policy that does not fit or clusters no layer of the model, DKMError for a
    layer calibration cannot read.
    """
    if next(exportable_parametrizations(model), None) is not None:
        raise RegistrationError("model has DKM registered; call dp.finalize(model) instead, or dp.remove_dkm first")
    check_codebook_dtype(codebook_dtype)
    policy = policy if policy is not None else Policy()
    plan = policy.plan(model, codebook_dtype)
    rows = plan.require_clustered(model)
    check_materialized(model, rows)
    layers: dict[str, CompressedLayer] = {}
    aliases: dict[str, str] = {}
    if not (isinstance(damp, (int, float)) and math.isfinite(damp) and damp >= 0):
        raise DKMError(f"damp must be a finite number >= 0 (a fraction of the statistics' mean diagonal), got {damp!r}")
    _check_outliers(outliers, outlier_by, sensitivity, rows)
    _check_outliers_fit(model, rows, outliers, codebook_dtype)
    passes = _statistics_passes(model, rows, calibration)
    batches = None if calibration is None else calibration_inputs(calibration)
    starts = {id(group[0]): group for group in passes if group}  # rows where a pass of statistics begins
    stats: dict[str, Tensor] = {}
    window: list = []  # consecutive small layers, clustered together

    def flush() -> None:
        with threads_for(sum(item[0].numel() for item in window)):  # k-means' many small operations: one thread
            found = cluster_weights(window, optimal, codebook_dtype)
        for item, layer in zip(window, found):
            layers[weight_key(item[2])] = layer
        window.clear()

    for row in track(rows, total=len(rows), desc="palettizing"):
        if batches is not None and id(row) in starts:
            stats = input_statistics(model, batches, [member.name for member in starts[id(row)]])
        module = model.get_submodule(row.name)
        weight = weight_of(module).detach()
        if window and sum(item[0].numel() for item in window) + weight.numel() > _WINDOW:
            flush()  # before this layer's own masks are made
        importance = None if sensitivity is None else sensitivity.get(row.name)
        exact = outlier_mask(
            weight, outliers, row.spec, importance if outlier_by == "sensitivity" else None, row.name
        )
        if batches is None:
            window.append((weight, row.spec, row.name, importance, exact))
        else:
            layers[weight_key(row.name)] = calibrated_layer(
                weight, module, row.spec, stats.pop(row.name), row.name, importance, optimal, codebook_dtype, damp,
                exact,
            )
        for follower in row.followers:
            aliases[weight_key(follower)] = weight_key(row.name)
    if window:
        flush()
    if inplace:  # only once every layer has been clustered: an error leaves the model as it was
        with torch.no_grad():
            for row in rows:
                weight_of(model.get_submodule(row.name)).copy_(layers[weight_key(row.name)].weight())
    return assemble(model.state_dict(), layers, aliases, plan.skipped())


_WINDOW = 1 << 21  # weight values clustered together at most (layers larger than this, alone)
_NEAREST_CHUNK = 1 << 20  # vectors assigned at a time: the assignment's temporaries stay a few MiB


def _nearest_bytes(vectors: Tensor, codebook: Tensor, pinned: int) -> Tensor:
    """The index of each vector's nearest entry (after ``pinned`` entries), one byte a vector.

    In chunks, so that a layer of millions of weights needs no int32 or int64 index of its own size."""
    found = torch.empty(len(vectors), dtype=torch.uint8, device=vectors.device)
    for start in range(0, len(vectors), _NEAREST_CHUNK):
        chunk = kmeans.nearest(vectors[start : start + _NEAREST_CHUNK], codebook)
        found[start : start + len(chunk)] = chunk.add_(pinned) if pinned else chunk
    return found


def _check_outliers(fraction: Any, by: Any, sensitivity: Mapping[str, Tensor] | None, rows: list) -> None:
    """Raise DKMError, before any work, for an outlier fraction or choice palettize cannot follow."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise DKMError(
            f"outliers must be a fraction of each layer's weights in [0, 1) (e.g. 0.005), got {fraction!r}"
        )
    if by not in ("magnitude", "sensitivity"):
        raise DKMError(f"outlier_by must be 'magnitude' or 'sensitivity', got {by!r}")
    if by == "sensitivity" and fraction:
        missing = [row.name for row in rows if sensitivity is None or row.name not in sensitivity]
        if missing:
            raise DKMError(
                f"outlier_by='sensitivity' needs the sensitivity of layer '{missing[0]}' ({len(missing)} layer(s) "
                "lack one); pass sensitivity=dp.fisher(...) for every clustered layer, or outlier_by='magnitude'"
            )


def _check_outliers_fit(model: nn.Module, rows: list, fraction: float, codebook_dtype: torch.dtype | None) -> None:
    """Raise DKMError, before any work, where the exact part of ``fraction`` of a layer's weights
    (a position and a value each) would store it no smaller than it is."""
    for row in rows:
        weight = weight_of(model.get_submodule(row.name))
        count = int(fraction * row.numel)
        if not count:
            continue
        dense = row.numel * weight.element_size()
        sparse = count * (outlier_index_dtype(row.numel).itemsize + weight.element_size())
        stored = stored_size(row.spec.storage, row.shape, codebook_dtype or weight.dtype, weight.dtype) + sparse
        if stored >= dense:
            raise DKMError(
                f"layer '{row.name}' ({row.numel:,} weights): outliers={fraction:g} keeps {count:,} of them exact, "
                f"{sparse:,} B with their positions, and the layer would take {stored:,} B, not less than its own "
                f"{dense:,} B; give a smaller fraction (SqueezeLLM keeps 0.005)"
            )


def outlier_mask(
    weight: Tensor, fraction: float, spec: LayerSpec | StorageSpec, importance: Tensor | None = None, name: str = ""
) -> Tensor | None:
    """The ``fraction`` of ``weight``'s values to keep exact, as a bool mask of its shape (None: none).

    By largest ``importance`` when given, else by largest magnitude (divided by
    the row's largest magnitude where ``spec.channel_scale``).
    """
    count = int(fraction * weight.numel())
    if count == 0:
        return None
    if importance is not None:
        _check_importance(name, importance, weight)
        score = importance.detach().to(weight.device, compute_dtype(weight.dtype)).reshape(-1)
    else:
        score = weight.detach().to(compute_dtype(weight.dtype)).abs()
        if spec.channel_scale:
            score = score.reshape(layout.rows(tuple(weight.shape)), -1) / layout.channel_scale(score)[:, None]
        score = score.reshape(-1)
    mask = torch.zeros(weight.numel(), dtype=torch.bool, device=weight.device)
    mask[score.topk(count, sorted=False).indices] = True
    return mask.reshape(weight.shape)


# input statistics held at once while calibrating
_STATISTICS_BYTES = 1 << 30


def _statistics_passes(model: nn.Module, rows: list, calibration) -> list[list]:
    """The rows in groups whose input statistics fit ``_STATISTICS_BYTES`` together (one group
    without calibration). Raises DKMError for a layer calibration cannot read, before any work."""
    if calibration is None:
        return [rows]
    passes, size = [[]], 0
    for row in rows:
        module = model.get_submodule(row.name)
        calibration_module.check_calibratable(row.name, module)
        width = calibration_module.columns(module)
        if calibration_module.is_transposed(module) and row.spec.dim > 1:
            raise DKMError(
                f"layer '{row.name}' (Conv1D): its vectors run across output features, which calibration does "
                "not assign together; use dim=1 for it, or palettize without calibration"
            )
        if width % row.spec.dim:
            raise DKMError(
                f"layer '{row.name}': calibration assigns vectors of dim={row.spec.dim} along the {width} input "
                "features, which dim does not divide; choose a dim that divides them, or palettize without calibration"
            )
        need = width * width * weight_of(module).new_empty(()).to(compute_dtype(weight_of(module).dtype)).element_size()
        if passes[-1] and size + need > _STATISTICS_BYTES:
            passes.append([])
            size = 0
        passes[-1].append(row)
        size += need
    return passes


def calibrated_layer(
    weight: Tensor, module: nn.Module, spec: LayerSpec, hessian: Tensor, name: str, importance: Tensor | None,
    optimal: bool, codebook_dtype: torch.dtype | None, damp: float, outliers: Tensor | None = None,
) -> CompressedLayer:
    """One layer palettized with its input statistics ``hessian`` (see ``palettize``);
    ``outliers``: a bool mask of the weight's shape, values kept exact."""
    if not torch.isfinite(hessian).all():
        raise DKMError(
            f"layer '{name}': its calibration inputs hold NaN or Inf (or overflow {hessian.dtype} when squared); "
            "check the calibration batches"
        )
    order = calibration_module.layout_order(weight, module, spec.layout)
    natural = calibration_module.as_rows(weight, module)  # (R, C)
    count = natural.shape[0]
    if importance is None:  # each value weighs the energy of the input it multiplies
        energy = calibration_module.column_importance(hessian, count)
        importance = calibration_module.rows_to_weight(energy, weight, module)
    start = cluster_weight(
        weight, spec, name, importance, optimal=optimal, codebook_dtype=codebook_dtype, outliers=outliers
    )
    rows = natural if order is None else natural[:, order]
    exact = None
    if outliers is not None:
        exact = calibration_module.as_rows(outliers, module).bool()
        exact = exact if order is None else exact[:, order]
    if order is not None:
        hessian = hessian[order][:, order]
    groups = layout.groups(tuple(weight.shape), spec.group_size)
    books = start.codebook.to(rows.dtype).reshape(groups, spec.clusters, spec.dim)
    # a weight's groups and scales follow its stored rows: W's rows, or its columns for a Conv1D
    stored_rows, width = weight.shape[0] if weight.dim() > 1 else 1, rows.shape[1]
    group = torch.arange(stored_rows, device=rows.device) // (stored_rows // groups)
    scale = None if start.scale is None else start.scale.to(rows.dtype)
    if calibration_module.is_transposed(module):
        group_of = group[None, :].expand(count, width)
        scale_of = None if scale is None else scale[None, :].expand(count, width)
    else:
        group_of = group[:, None].expand(count, width // spec.dim)
        scale_of = None if scale is None else scale[:, None].expand(count, width)
    pinned = (rows.reshape(count, -1, spec.dim) == 0).all(-1) if spec.preserve_zeros else None
    chosen, kept = calibration_module.assign(rows, hessian, books, group_of, scale_of, pinned, damp, exact)
    stored = start.codebook.dtype
    importance = calibration_module.column_importance(hessian, count)
    if exact is not None:  # outliers keep their own values: they say nothing of the centroids
        importance = torch.where(exact, 0, importance)
    fitted = calibration_module.refit(rows, chosen, books, group_of, scale_of, importance).to(stored).to(rows.dtype)
    if spec.preserve_zeros:
        fitted[:, 0] = 0
    error = calibration_module.output_error
    if error(rows, hessian, chosen, fitted, group_of, scale_of, exact, kept) < error(
        rows, hessian, chosen, books, group_of, scale_of, exact, kept
    ):
        books = fitted
    if calibration_module.is_transposed(module):  # indices in the stored (in, out) order
        chosen = chosen.T
    layer = CompressedLayer(
        shape=tuple(weight.shape),
        dtype=weight.dtype,
        spec=spec,
        codebook=(books[0] if groups == 1 and spec.group_size is None else books).to(stored).cpu(),
        indices=chosen.reshape(-1).to(torch.uint8).cpu(),  # vectors in the layout's order
        scale=start.scale,
        **sparse_part(_weight_order(kept, order, weight, module).to(weight.dtype) if kept is not None else weight,
                      outliers),
    )
    problem = layer.problem()
    if problem:
        raise DKMError(f"layer '{name}': {problem}; store the codebook in a wider dtype (codebook_dtype)")
    return layer


def cluster_weight(
    weight: Tensor,
    spec: LayerSpec | StorageSpec,
    name: str = "",
    importance: Tensor | None = None,
    optimal: bool = False,
    codebook_dtype: torch.dtype | None = None,
    outliers: Tensor | None = None,
) -> CompressedLayer:
    """k-means of one weight into a CompressedLayer (codebook, indices).

    spec: a LayerSpec (its ``seed`` seeds k-means) or a StorageSpec (seed 0).
    outliers: a bool mask of the weight's shape: values kept exact in the
    layer's sparse part, left out of the k-means (and of the channel scale);
    their vectors take the entry nearest them clamped to the other values' range.
    """
    return cluster_weights([(weight, spec, name, importance, outliers)], optimal, codebook_dtype)[0]


def cluster_weights(
    items: list[tuple[Tensor, LayerSpec | StorageSpec, str, Tensor | None, Tensor | None]],
    optimal: bool = False,
    codebook_dtype: torch.dtype | None = None,
) -> list[CompressedLayer]:
    """``cluster_weight`` of each (weight, spec, name, importance, outliers), the 1-D k-means of
    every layer and group run together (``kmeans.kmeans_1d_many``): small layers and the groups of
    a grouped codebook share each Lloyd step's tensor operations. The results are those of
    ``cluster_weight`` on each alone."""
    check_codebook_dtype(codebook_dtype)
    fits = [_Fit(*item) for item in items]
    lines = [(fit, g) for fit in fits for g, live in enumerate(fit.live) if fit.spec.dim == 1 and len(live)]
    if lines and not optimal:
        found = kmeans.kmeans_1d_many(
            [fit.live[g][:, 0] for fit, g in lines], [fit.free for fit, g in lines],
            [fit.mass[g] for fit, g in lines], [fit.seed for fit, g in lines],
        )
        for (fit, g), (codebook, _) in zip(lines, found):
            fit.books[g] = codebook[:, None]
    return [fit.layer(optimal, codebook_dtype) for fit in fits]


class _Fit:
    """One weight made ready for k-means: its groups of vectors, the ones fitted (``live``) and
    their masses; ``books`` collects each group's codebook, ``layer`` assigns and packs."""

    def __init__(
        self, weight: Tensor, spec: LayerSpec | StorageSpec, name: str, importance: Tensor | None,
        outliers: Tensor | None,
    ):
        self.weight, self.spec, self.name, self.outliers = weight, spec, name, outliers
        self.seed = getattr(spec, "seed", 0)
        if not torch.isfinite(weight).all():
            raise DKMError(f"layer '{name}': weight holds NaN or Inf; fix the weights or skip the layer in the policy")
        work = weight.to(compute_dtype(weight.dtype))
        excluded = None
        if outliers is not None:
            inliers = work[~outliers]
            if inliers.numel():
                work = torch.where(outliers, work.clamp(inliers.min(), inliers.max()), work)
            grouped = layout.grouped_vectors(outliers.to(torch.uint8), spec.dim, spec.group_size, layout=spec.layout)
            excluded = grouped.amax(2) > 0  # (G, n): vectors holding an outlier
            del inliers, grouped
        self.scale = layout.channel_scale(work) if spec.channel_scale else None
        self.groups = layout.grouped_vectors(work, spec.dim, spec.group_size, self.scale, spec.layout)  # (G, n, d)
        masses = None
        if importance is not None:
            _check_importance(name, importance, weight)
            masses = layout.grouped_vectors(
                importance.detach().to(work.dtype), spec.dim, spec.group_size, layout=spec.layout
            ).sum(2)
            if not torch.isfinite(masses).all() or (masses < 0).any():
                raise DKMError(f"layer '{name}': sensitivity must be finite and >= 0")
        self.pinned = 1 if spec.preserve_zeros else 0  # entry 0 pinned at zero for pruned weights
        self.free = spec.clusters - self.pinned
        self.zeros: list[Tensor | None] = []
        self.live: list[Tensor] = []
        self.mass: list[Tensor | None] = []
        for g, vectors in enumerate(self.groups):
            zeros = (vectors == 0).all(1) if spec.preserve_zeros else None
            if zeros is None and excluded is None:  # every vector is fitted: no masked copy of them
                live, mass = vectors, None if masses is None else masses[g]
            else:
                fitted = ~(zeros if excluded is None else excluded[g] if zeros is None else zeros | excluded[g])
                live = vectors[fitted]
                mass = None if masses is None else masses[g][fitted]
            if mass is not None and mass.sum() <= 0:
                mass = None  # the loss ignores this group: cluster plainly
            self.zeros.append(zeros)
            self.live.append(live)
            self.mass.append(mass)
        self.books: list[Tensor | None] = [None] * len(self.live)

    def layer(self, optimal: bool, codebook_dtype: torch.dtype | None) -> CompressedLayer:
        """Cluster the groups whose codebook is not in ``books`` yet, assign, and pack."""
        spec, name, weight = self.spec, self.name, self.weight
        stored = codebook_dtype or weight.dtype
        books, indices = [], []
        for g, vectors in enumerate(self.groups):
            live, mass, zeros = self.live[g], self.mass[g], self.zeros[g]
            try:
                if self.books[g] is not None:
                    codebook = self.books[g]
                elif not len(live):
                    codebook = vectors.new_zeros(self.free, spec.dim)
                elif spec.dim == 1:
                    engine = kmeans.kmeans_1d_optimal if optimal else kmeans.kmeans_1d
                    extra = {} if optimal else {"seed": self.seed}
                    codebook = engine(live[:, 0], self.free, weights=mass, **extra)[0][:, None]
                else:
                    codebook = kmeans.kmeans_vectors(live, self.free, weights=mass, seed=self.seed)[0]
            except kmeans.EmptyClusterError as exc:
                raise ClusteringError(f"layer '{name}' ({spec.bits} bits, dim {spec.dim}): {exc}") from None
            codebook = codebook.to(stored).to(vectors.dtype)  # assign against the codebook as stored
            found = _nearest_bytes(vectors, codebook, self.pinned)
            books.append(torch.cat([codebook.new_zeros(self.pinned, spec.dim), codebook]))
            indices.append(found.masked_fill_(zeros, 0) if zeros is not None else found)
        codebook = books[0] if len(books) == 1 else torch.stack(books)
        layer = CompressedLayer(
            shape=tuple(weight.shape),
            dtype=weight.dtype,
            spec=spec,
            codebook=codebook.to(stored).cpu(),
            indices=(indices[0] if len(indices) == 1 else torch.cat(indices)).cpu(),
            scale=None if self.scale is None else self.scale.cpu(),
            **sparse_part(weight, self.outliers),
        )
        problem = layer.problem()  # e.g. a codebook that overflows the dtype it is stored in
        if problem:
            raise DKMError(f"layer '{name}': {problem}; store the codebook in a wider dtype (codebook_dtype)")
        return layer


def _weight_order(rows: Tensor, order: Tensor | None, weight: Tensor, module: nn.Module) -> Tensor:
    """A tensor of ``W``'s rows with columns in layout ``order``, back in the weight's shape."""
    if order is not None:
        rows = rows[:, torch.argsort(order)]
    return calibration_module.rows_to_weight(rows, weight, module)


def sparse_part(values: Tensor, mask: Tensor | None) -> dict[str, Tensor | None]:
    """A CompressedLayer's ``outlier_index`` and ``outlier_value``: ``values`` where ``mask`` holds."""
    if mask is None:
        return {"outlier_index": None, "outlier_value": None}
    index = mask.reshape(-1).nonzero().squeeze(1)
    return {"outlier_index": index.cpu(), "outlier_value": values.reshape(-1)[index].cpu()}


def _check_importance(name: str, importance: Tensor, weight: Tensor) -> None:
    if importance.shape != weight.shape:
        raise DKMError(
            f"layer '{name}': sensitivity has shape {tuple(importance.shape)}, the weight {tuple(weight.shape)}; "
            "pass one value per weight"
        )
