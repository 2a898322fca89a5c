"""finalize: snap every clustered weight, take dkm_param off the model, return the CompressedModel."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import RegistrationError
from ..format import CompressedLayer, CompressedModel, assemble
from ..format.layer import check_codebook_dtype
from ..policy import weight_key
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
        original = users[0][1].parametrizations.weight.original
        with torch.no_grad():
            exported.append((users, param.export_layer(original, codebook_dtype or original.dtype)))
    layers: dict[str, CompressedLayer] = {}
    aliases: dict[str, str] = {}
    for users, layer in exported:
        (lead_name, lead), followers = users[0], users[1:]
        original = lead.parametrizations.weight.original
        for _, module in users:
            remove_weight_parametrization(module)
        with torch.no_grad():
            original.copy_(layer.weight())
        layers[weight_key(lead_name)] = layer
        aliases.update({weight_key(name): weight_key(lead_name) for name, _ in followers})
    skipped = params[next(iter(params))].skipped
    return assemble(model.state_dict(), layers, aliases, skipped)
