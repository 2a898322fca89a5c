"""register_dkm and remove_dkm: apply a policy's plan to a model's weights."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import RegistrationError
from ..ops import layout
from ..ops.threads import SETTLE_WORK, threads_for
from ..policy import Plan, Policy, check_materialized, weight_key
from ..progress import track
from .exportable import exportable_parametrizations, remove_weight_parametrization
from .parametrization import DKMParametrization

if TYPE_CHECKING:
    from ..format import CompressedModel


def register_dkm(
    model: nn.Module, policy: Policy | None = None, init: CompressedModel | None = None, process_group=None
) -> Plan:
    """Attach a DKMParametrization to every weight ``policy`` selects, in place.

    Returns the plan applied (print it for a table). A weight shared by
    several modules gets one parametrization, registered on each of them.
    init: a CompressedModel (e.g. from ``palettize(..., inplace=False)``)
    whose codebooks seed the layers it holds, instead of ``spec.init``.
    process_group: under ``torch.distributed`` (DDP, FSDP2: register before
    wrapping), the ranks that share the clustering of weights clustered by
    value table: each rank counts the values of its slice of a weight and the
    counts are summed across the group (an all-reduce per layer and step), so
    every rank clusters the same table. Every rank must then run the same
    training forwards. None: each rank clusters whole weights on its own (the
    codebooks agree all the same, the weights being equal on every rank).
    Every layer's clustering is built before any is attached, so on an error
    the model is left as it was.
    Raises RegistrationError if the model already has DKM registered or a
    selected weight is on the meta device or holds NaN or Inf, SpecError for
    a policy that does not fit or clusters no layer of the model.
    """
    policy = policy if policy is not None else Policy()
    registered = next(exportable_parametrizations(model), None)
    if registered is not None:
        raise RegistrationError(
            f"model already has DKM registered (on '{registered[0]}'); "
            "call dp.remove_dkm(model) or dp.finalize(model) before registering again"
        )
    plan = policy.plan(model)
    rows = plan.require_clustered(model)
    skipped = tuple(plan.skipped())
    check_materialized(model, rows)
    built = []
    for row in track(rows, total=len(rows), desc="registering DKM"):
        weight = model.get_submodule(row.name).weight
        if not torch.isfinite(weight).all():
            raise RegistrationError(
                f"layer '{row.name}' ({row.module_type}): weight holds NaN or Inf; "
                "fix the model's weights or skip the layer in the policy"
            )
        with threads_for(weight.numel(), SETTLE_WORK):  # settling's many small operations: one thread
            param = DKMParametrization(weight, row.spec, name=row.name, codebook=_seed(init, row), skipped=skipped)
        param.process_group = process_group
        built.append((row, param))
    lowered = [row.name for row, param in built if param.tau_lowered]
    if lowered:
        shown = ", ".join(repr(name) for name in lowered[:5])
        shown += f" and {len(lowered) - 5} more" if len(lowered) > 5 else ""
        warnings.warn(
            f"{len(lowered)} layer(s) ({shown}): tau_rel x the clustering error would pass the temperature at which "
            "every centroid settles onto the mean (long vectors for few centroids), so their tau is 0.4 x that "
            "temperature instead; set tau_rel lower, or tau= explicitly, to choose it yourself",
            stacklevel=2,
        )
    try:
        for row, param in built:
            for name in (row.name, *row.followers):
                parametrize.register_parametrization(model.get_submodule(name), "weight", param, unsafe=True)
    except BaseException:
        remove_dkm(model)
        raise
    return plan


def _seed(init, row):
    """The codebook ``init`` holds for this row's weight, checked against its spec."""
    if init is None:
        return None
    layer = init.layers.get(weight_key(row.name))
    if layer is None:
        return None
    want = (layout.groups(row.shape, row.spec.group_size), row.spec.clusters, row.spec.dim)
    if tuple(layer.codebook.shape) not in (want, want[1:] if want[0] == 1 else want):
        raise RegistrationError(
            f"layer '{row.name}': the seeding codebook has shape {tuple(layer.codebook.shape)}, "
            f"the policy asks for {want} (bits={row.spec.bits}, dim={row.spec.dim}); use the same policy for both"
        )
    return layer.codebook


def remove_dkm(model: nn.Module) -> None:
    """Take DKM off every weight in place, restoring the trained, unclustered weights."""
    for _, module, _ in list(exportable_parametrizations(model)):
        if parametrize.is_parametrized(module, "weight"):
            remove_weight_parametrization(module)
