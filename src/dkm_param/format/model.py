"""CompressedModel: a model as codebooks, indices and plain tensors, and loading it into a model."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..errors import RegistrationError
from .layer import CompressedLayer
from .summary import Summary, summarize
from .writer import write_file

if TYPE_CHECKING:
    from ..policy import LayerPlan


@dataclass
class CompressedModel:
    """A model as codebooks, indices and plain tensors, ready to save.

    layers: clustered weights by state_dict name; tensors: every other entry
    of the state_dict; aliases: names that hold the same tensor as another
    (tied weights), stored once; skipped: the plan rows of layers left
    uncompressed, with their reasons (empty when the plan is unknown).
    """

    layers: dict[str, CompressedLayer]
    tensors: dict[str, Tensor]
    aliases: dict[str, str] = field(default_factory=dict)
    skipped: list[LayerPlan] = field(default_factory=list)

    def state_dict(self) -> dict[str, Tensor]:
        """The decoded model weights, as a plain state_dict: every layer decoded at once, in memory."""
        state = dict(self.tensors)
        state.update({name: layer.weight() for name, layer in self.layers.items()})
        for alias, target in self.aliases.items():
            state[alias] = state[target]
        return state

    def load_into(self, model: nn.Module) -> nn.Module:
        """Copy the decoded weights into ``model`` (an ordinary, unregistered model), in place.

        Every name, shape and dtype, and every tie of the model's weights, is
        checked against the model before anything is decoded or changed; the
        layers are then decoded one at a time, so memory beyond the model is
        about its largest layer (an interruption mid-way, such as running out
        of memory, leaves the model part loaded).
        Raises RegistrationError for a model that does not fit.
        """
        _check_fits(model, self._declared(), self.aliases)
        with torch.no_grad():
            plain = dict(self.tensors)
            plain.update({alias: self.tensors[target] for alias, target in self.aliases.items() if target in plain})
            model.load_state_dict(plain, strict=False)
            for name, layer in self.layers.items():
                weight = layer.weight()
                tied = {alias: weight for alias, target in self.aliases.items() if target == name}
                model.load_state_dict({name: weight, **tied}, strict=False)
                del weight, tied
        return model

    def _declared(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The state_dict this model decodes to, as name -> (shape, dtype), decoding nothing."""
        declared = {name: (tuple(t.shape), t.dtype) for name, t in self.tensors.items()}
        declared.update({name: (tuple(layer.shape), layer.dtype) for name, layer in self.layers.items()})
        declared.update({alias: declared[target] for alias, target in self.aliases.items()})
        return declared

    def save(self, path: str | os.PathLike) -> Path:
        """Write one .safetensors file atomically: a failed save leaves any old file intact."""
        return write_file(self, Path(path))

    def summary(self) -> Summary:
        """Per-layer bits, dim, sizes, and the totals; prints as a table."""
        return summarize(self)


def assemble(
    state: dict[str, Tensor], layers: dict[str, CompressedLayer], aliases: dict[str, str], skipped: list[Any]
) -> CompressedModel:
    """A CompressedModel of ``layers`` plus every other tensor of ``state`` (a state_dict)."""
    aliases = dict(aliases)
    tensors, shared = _plain_tensors(state, skip=set(layers) | set(aliases))
    aliases.update(shared)
    return CompressedModel(layers=layers, tensors=tensors, aliases=aliases, skipped=list(skipped))


def _plain_tensors(state: dict[str, Tensor], skip: set[str]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The state_dict entries not in ``skip``, with tensors sharing storage stored once."""
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in state.items():
        if name in skip:
            continue
        ident = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))
        if tensor.numel() and ident in seen:
            aliases[name] = seen[ident]
            continue
        seen[ident] = name
        tensors[name] = tensor.detach().cpu()
    return tensors, aliases


def _check_fits(
    model: nn.Module, declared: dict[str, tuple[tuple[int, ...], torch.dtype]], aliases: dict[str, str]
) -> None:
    """Raise RegistrationError unless ``declared`` (name -> shape, dtype) is exactly a plain model's
    state_dict, and names the model ties to one tensor are one tensor in the file too."""
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            raise RegistrationError(
                f"module '{name}' has a parametrization (DKM registered?); load into a plain model "
                "(or call dp.finalize or dp.remove_dkm first)"
            )
    own = model.state_dict()
    on_meta = [k for k, t in own.items() if t.device.type == "meta"]
    if on_meta:
        raise RegistrationError(
            f"the model's tensors are on the meta device ({_few(on_meta)}); materialize it first, "
            "e.g. model.to_empty(device='cpu'), then load"
        )
    missing = sorted(set(own) - set(declared))
    unexpected = sorted(set(declared) - set(own))
    mismatched = []
    for k in own:
        if k not in declared:
            continue
        shape, dtype = declared[k]
        if shape != tuple(own[k].shape):
            mismatched.append(f"{k}: file {shape} vs model {tuple(own[k].shape)}")
        elif dtype != own[k].dtype:
            mismatched.append(f"{k}: file {dtype} vs model {own[k].dtype}")
    tied: dict[tuple, list[str]] = {}
    for name, tensor in own.items():
        if tensor.numel():
            tied.setdefault((tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride()), []).append(name)
    for names in tied.values():
        stored = {aliases.get(name, name) for name in names}
        if len(stored) > 1 and not (missing or unexpected or mismatched):
            raise RegistrationError(
                f"the model ties {', '.join(names)} to one tensor, but the file holds them apart "
                f"({', '.join(sorted(stored))}); loading would keep only the last. Load into a model "
                "without the tie, or save from one with it"
            )
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing from the file: {_few(missing)}")
        if unexpected:
            parts.append(f"not in the model: {_few(unexpected)}")
        if mismatched:
            parts.append(f"shape or dtype differs: {_few(mismatched)}")
        raise RegistrationError("file does not fit the model; " + "; ".join(parts))


def _few(items: list[str], limit: int = 5) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(repr(item)[1:-1] if not item.isprintable() else item for item in items[:limit]) + more
