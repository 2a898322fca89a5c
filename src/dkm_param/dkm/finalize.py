"""finalize: snap every clustered weight, take dkm_param off the model, return the CompressedModel."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import RegistrationError
from ..format import CompressedLayer, CompressedModel, assemble
from ..format.layer import check_codebook_dtype
from ..ops.dtypes import dtype_name, itemsize
from ..policy import LayerPlan, layer_kind, weight_key
from ..progress import track
from .exportable import exportable_parametrizations, remove_weight_parametrization


def finalize(model: nn.Module, codebook_dtype: torch.dtype | None = None) -> CompressedModel:
    """Snap every DKM weight to its nearest centroid and take DKM off the model, in place.

    Afterwards ``model`` is an ordinary model holding the snapped weights,
    in the same Parameter objects as before registration.
    codebook_dtype: dtype the codebooks are stored in (default: each weight's
    own dtype); the snapped weights use the rounded codebook, so a saved file
    reproduces them bit for bit.
    Also takes off the codebooks ``finetune_codebooks`` attached. Every layer
    is exported before any is changed, so on an error the model keeps DKM
    registered, as it was.
    Under FSDP2 every rank calls it and gets the whole CompressedModel, the
    sharded tensors gathered (save it from one rank); the sharded model is
    left as it is, DKM registered (FSDP2 holds each weight by the name DKM
    gave it): load the file into an unwrapped model with ``load_compressed``.
    A layer that ``codebook_dtype`` (wider than the weight's) would store no
    smaller than it is keeps its snapped weight as a plain tensor, with that
    reason in the summary.
    Raises RegistrationError when no weight has DKM registered, DKMError for
    a layer whose codebook is not finite.
    """
    check_codebook_dtype(codebook_dtype)
    found = list(exportable_parametrizations(model))
    if not found:
        raise RegistrationError("no weight has DKM registered; call dp.register_dkm(model, policy) first")
    members: dict[int, list[tuple[str, nn.Module]]] = {}
    params = {}
    for name, module, param in found:
        members.setdefault(id(param), []).append((name, module))
        params[id(param)] = param
    exported: list[tuple[list[tuple[str, nn.Module]], CompressedLayer]] = []
    for key, users in track(members.items(), total=len(members), desc="finalizing"):
        param = params[key]
        users.sort(key=lambda user: user[0] != param.name)  # the layer the plan chose leads
        original = _whole(users[0][1].parametrizations.weight.original)
        with torch.no_grad():
            exported.append((users, param.export_layer(original, codebook_dtype or original.dtype)))
    plain = _kept_plain(exported, codebook_dtype)
    skipped = (*params[next(iter(params))].skipped, *plain)
    plain_names = {row.name for row in plain}
    if any(_is_sharded(users[0][1].parametrizations.weight.original) for users, _ in exported):
        return _gathered(model, exported, skipped, plain_names)
    layers: dict[str, CompressedLayer] = {}
    aliases: dict[str, str] = {}
    for users, layer in exported:
        (lead_name, lead), followers = users[0], users[1:]
        original = lead.parametrizations.weight.original
        for _, module in users:
            remove_weight_parametrization(module)
        with torch.no_grad():
            original.copy_(layer.weight())
        if lead_name in plain_names:  # the model's own tensor, shared as the model shares it
            continue
        layers[weight_key(lead_name)] = layer
        aliases.update({weight_key(name): weight_key(lead_name) for name, _ in followers})
    return assemble(model.state_dict(), layers, aliases, skipped)


def _kept_plain(exported: list, codebook_dtype: torch.dtype | None) -> list:
    """Rows for the layers ``codebook_dtype`` would store no smaller than they are (the plan kept
    every layer smaller with codebooks in the weight's own dtype): their snapped weights are
    stored as they are, as plain tensors, with this reason in the summary."""
    rows = []
    for users, layer in exported:
        dense = layer.numel * itemsize(layer.dtype)
        if layer.nbytes < dense:
            continue
        name, module = users[0]
        rows.append(LayerPlan(
            name, type(module).__name__, layer_kind(module), layer.shape, None,
            f"kept as it is, snapped: with codebooks in {dtype_name(codebook_dtype or layer.dtype)}, "
            f"{layer.spec.bits} bits would take {layer.nbytes:,} B, not less than its own {dense:,} B "
            f"in {dtype_name(layer.dtype)}",
        ))
    return rows


def _is_sharded(tensor: torch.Tensor) -> bool:
    """Whether the tensor is sharded across ranks (a DTensor, as FSDP2 keeps parameters)."""
    return callable(getattr(tensor, "full_tensor", None))


def _gathered(model: nn.Module, exported: list, skipped: tuple, plain_names: set[str]) -> CompressedModel:
    """finalize under FSDP2: the CompressedModel, every sharded tensor gathered; the model is
    left as it is (FSDP2 holds each weight by the name the parametrization gave it, so taking
    DKM off would break its bookkeeping). Every rank must call it."""
    layers: dict[str, CompressedLayer] = {}
    aliases: dict[str, str] = {}
    owned = []  # state_dict prefixes of the parametrizations: their weights are in ``layers``
    plain: dict[str, torch.Tensor] = {}
    for users, layer in exported:
        lead_name = users[0][0]
        if lead_name in plain_names:
            plain[weight_key(lead_name)] = layer.weight()
        else:
            layers[weight_key(lead_name)] = layer
        aliases.update({weight_key(name): weight_key(lead_name) for name, _ in users[1:]})
        owned += [f"{name}.parametrizations.weight." if name else "parametrizations.weight." for name, _ in users]
    state = {
        name: tensor.full_tensor() if _is_sharded(tensor) else tensor
        for name, tensor in model.state_dict().items()
        if not name.startswith(tuple(owned))
    }
    return assemble({**state, **plain}, layers, aliases, skipped)


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded tensor gathered whole on every rank; any other tensor as it is."""
    return tensor.full_tensor() if _is_sharded(tensor) else tensor
