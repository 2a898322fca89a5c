"""Codebook fine-tuning (the iPQ recipe): assignments frozen, codebooks trained."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..errors import DKMError, RegistrationError
from ..format import CompressedLayer, CompressedModel
from ..ops import layout
from ..ops.dtypes import compute_dtype
from ..policy import weight_of


class _MeanGradient(torch.autograd.Function):
    """Identity forward; backward divides each codeword's gradient by its number of vectors."""

    @staticmethod
    def forward(ctx, codebook: Tensor, counts: Tensor) -> Tensor:
        ctx.save_for_backward(counts)
        return codebook.view_as(codebook)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (counts,) = ctx.saved_tensors
        return grad / counts.clamp_min(1)[..., None], None


class CodebookParametrization(nn.Module):
    """``weight -> scale * codebook[indices]`` with trainable codebook and frozen indices.

    Each codeword's gradient is the mean of the gradients of the vectors
    assigned to it. With ``spec.preserve_zeros`` entry 0 stays zero.
    """

    def __init__(self, layer: CompressedLayer, name: str = "", skipped: tuple = ()):
        super().__init__()
        self.spec = layer.spec
        self.name = name
        self.skipped = tuple(skipped)
        self.codebook = nn.Parameter(layer.codebook.to(compute_dtype(layer.dtype)).clone())
        self.register_buffer("indices", layer.indices.to(torch.uint8).clone())
        self.scale: Tensor | None
        if layer.scale is not None:
            self.register_buffer("scale", layer.scale.clone())
        else:
            self.scale = None
        books = self.codebook.view(-1, *self.codebook.shape[-2:])
        per_group = layer.indices.numel() // books.shape[0]
        slot = torch.arange(layer.indices.numel()) // per_group * books.shape[1] + layer.indices.long()
        counts = torch.bincount(slot, minlength=books.shape[0] * books.shape[1]).to(self.codebook.dtype)
        self.register_buffer("counts", counts.view(self.codebook.shape[:-1]))

    def _codebook(self) -> Tensor:
        book = _MeanGradient.apply(self.codebook, self.counts)
        if self.spec.preserve_zeros:  # entry 0 is pinned at zero
            keep = torch.ones_like(book)
            keep[..., 0, :] = 0
            book = book * keep
        return book

    def forward(self, weight: Tensor) -> Tensor:
        return layout.decode(
            self._codebook(), self.indices, tuple(weight.shape), weight.dtype, self.scale, self.spec.layout
        )

    def export_layer(self, weight: Tensor, stored: torch.dtype) -> CompressedLayer:
        """The codebook rounded to ``stored`` with the frozen assignments; leaves the parametrization as it is."""
        with torch.no_grad():
            rounded = self._codebook().to(stored)
        if not torch.isfinite(rounded).all():
            raise DKMError(
                f"layer '{self.name}': the codebook holds NaN or Inf after fine-tuning (or in {stored}); "
                "lower the learning rate"
            )
        return CompressedLayer(
            shape=tuple(weight.shape),
            dtype=weight.dtype,
            spec=self.spec,
            codebook=rounded.detach().cpu(),
            indices=self.indices.cpu(),
            scale=None if self.scale is None else self.scale.cpu(),
        )


def finetune_codebooks(model: nn.Module, compressed: CompressedModel) -> list[nn.Parameter]:
    """Make the codebooks of ``compressed`` (e.g. from ``palettize``) trainable in ``model``.

    Each listed weight is replaced by ``codebook[indices]`` with the indices
    frozen; the original weight stops training. Train as usual (the codebooks
    are parameters of the model), then ``finalize(model)``. Returns the
    codebook parameters. Every layer is checked before the model changes.
    Raises RegistrationError for a weight that already has a
    parametrization or does not match its compressed layer.
    """
    built = []
    for key, layer in compressed.layers.items():
        name = key.removesuffix(".weight") if key != "weight" else ""
        followers = [alias.removesuffix(".weight") for alias, target in compressed.aliases.items() if target == key]
        for target in (name, *followers):
            try:
                module = model.get_submodule(target)
            except AttributeError:
                raise RegistrationError(
                    f"layer '{target}' of the compressed model is not a module of this model"
                ) from None
            if parametrize.is_parametrized(module, "weight"):
                raise RegistrationError(
                    f"layer '{target}': its weight already has a parametrization; finalize or remove it first"
                )
            if target != name and weight_of(module) is not weight_of(model.get_submodule(name)):
                raise RegistrationError(
                    f"layer '{target}': the compressed model stores it as an alias of '{name}', but this model "
                    "does not tie the two weights; tie them, or compress this model itself"
                )
            if tuple(module.weight.shape) != tuple(layer.shape):
                raise RegistrationError(
                    f"layer '{target}': weight {tuple(module.weight.shape)} vs compressed {tuple(layer.shape)}"
                )
        built.append(((name, *followers), CodebookParametrization(layer, name=name, skipped=tuple(compressed.skipped))))
    for targets, param in built:  # everything checked: now change the model
        model.get_submodule(targets[0]).weight.requires_grad_(False)
        for target in targets:
            parametrize.register_parametrization(model.get_submodule(target), "weight", param, unsafe=True)
    return [param.codebook for _, param in built]
