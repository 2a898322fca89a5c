"""register_dkm and remove_dkm: apply a policy's plan to a model's weights."""

from __future__ import annotations

import weakref
from typing import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import layout
from .errors import RegistrationError
from .parametrization import DKMParametrization
from .policy import Plan, Policy
from .progress import track

# The plan each registered model was given, so finalize can report its skips
# without storing anything on the user's model.
_PLANS: "weakref.WeakKeyDictionary[nn.Module, Plan]" = weakref.WeakKeyDictionary()


def register_dkm(model: nn.Module, policy: Policy | None = None, init: "CompressedModel | None" = None) -> Plan:
    """Attach a DKMParametrization to every weight ``policy`` selects.

    Returns the plan applied (print it for a table). A weight shared by
    several modules gets one parametrization, registered on each of them.
    init: a CompressedModel (e.g. from ``palettize(..., inplace=False)``)
    whose codebooks seed the layers it holds, instead of ``spec.init``.
    Raises RegistrationError if the model already has DKM registered or a
    selected weight holds NaN or Inf, SpecError for a policy that does not fit.
    """
    policy = policy if policy is not None else Policy()
    registered = next(dkm_parametrizations(model), None)
    if registered is not None:
        raise RegistrationError(
            f"model already has DKM registered (on '{registered[0]}'); "
            "call dp.remove_dkm(model) or dp.finalize(model) before registering again"
        )
    plan = policy.plan(model)
    rows = plan.clustered()
    for row in track(rows, total=len(rows), desc="registering DKM"):
        module = model.get_submodule(row.name)
        weight = module.weight
        if not torch.isfinite(weight).all():
            raise RegistrationError(
                f"layer '{row.name}' ({row.module_type}): weight holds NaN or Inf; "
                "fix the model's weights or skip the layer in the policy"
            )
        param = DKMParametrization(weight, row.spec, name=row.name, codebook=_seed(init, row))
        for name in (row.name, *row.followers):
            parametrize.register_parametrization(model.get_submodule(name), "weight", param, unsafe=True)
    _PLANS[model] = plan
    return plan


def _seed(init, row):
    """The codebook ``init`` holds for this row's weight, checked against its spec."""
    if init is None:
        return None
    key = f"{row.name}.weight" if row.name else "weight"
    layer = init.layers.get(key)
    if layer is None:
        return None
    groups = layout.groups(row.shape, row.spec.group_size)
    want = (row.spec.clusters, row.spec.dim) if groups == 1 else (groups, row.spec.clusters, row.spec.dim)
    if tuple(layer.codebook.shape) != want:
        raise RegistrationError(
            f"layer '{row.name}': the seeding codebook has shape {tuple(layer.codebook.shape)}, "
            f"the policy asks for {want} (bits={row.spec.bits}, dim={row.spec.dim}); use the same policy for both"
        )
    return layer.codebook


def remove_dkm(model: nn.Module) -> None:
    """Take DKM off every weight, restoring the trained, unclustered weights."""
    for _, module, _ in list(dkm_parametrizations(model)):
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
    _PLANS.pop(model, None)


def dkm_parametrizations(model: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Module]]:
    """(module name, module, parametrization) for every weight with DKM or a
    trainable codebook (``finetune_codebooks``) registered."""
    from .codebooks import CodebookParametrization

    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            for param in module.parametrizations.weight:
                if isinstance(param, (DKMParametrization, CodebookParametrization)):
                    yield name, module, param


def registered_plan(model: nn.Module) -> Plan | None:
    return _PLANS.get(model)
