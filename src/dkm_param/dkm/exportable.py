"""The protocol ``finalize`` exports through: a parametrization that can snap its weight to a CompressedLayer."""

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
