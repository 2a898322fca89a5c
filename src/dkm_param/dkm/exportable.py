"""What dkm_param attaches to weights: the protocol finalize exports through, finding them, taking them off."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

if TYPE_CHECKING:
    from ..format import CompressedLayer


@runtime_checkable
class ExportableParametrization(Protocol):
    """What ``finalize`` needs of a parametrization dkm_param attached to a weight.

    spec: the layer's spec (its ``storage`` half is what the file carries);
    name: the module's qualified name, for messages; skipped: the plan rows
    of the layers the same registration left uncompressed, shared by every
    parametrization it made, so that ``finalize`` reports them (and a
    ``copy.deepcopy`` of the model keeps them).
    """

    spec: Any
    name: str
    skipped: tuple

    def export_layer(self, weight: Tensor, stored: torch.dtype) -> CompressedLayer:
        """Round the codebook to ``stored`` and return the weight as codebook and indices."""
        ...


def exportable_parametrizations(model: nn.Module) -> Iterator[tuple[str, nn.Module, ExportableParametrization]]:
    """(module name, module, parametrization) for every weight dkm_param has parametrized:
    DKM (``register_dkm``) or trainable codebooks (``finetune_codebooks``)."""
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            for param in module.parametrizations.weight:
                if isinstance(param, ExportableParametrization):
                    yield name, module, param


def remove_weight_parametrization(module: nn.Module) -> None:
    """Take the parametrization off ``module.weight``, leaving its original weight (in place).

    ``copy.deepcopy`` of a parametrized model shares each parametrized class
    between the copies, and removing a parametrization deletes from that
    class: so the module first gets a class of its own, and removing from a
    copy leaves the other model working.
    """
    cls = module.__class__
    namespace = {key: value for key, value in vars(cls).items() if key not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, namespace)
    parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
