"""Training helpers for DKM: the snapped view of a model in training, and temperature annealing."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from ..errors import DKMError, RegistrationError
from .parametrization import DKMParametrization


def _parametrizations(model: nn.Module) -> list[DKMParametrization]:
    """Every DKMParametrization on the model, once each. Raises RegistrationError for none."""
    found = {id(m): m for m in model.modules() if isinstance(m, DKMParametrization)}
    if not found:
        raise RegistrationError("no weight has DKM registered; call dp.register_dkm(model, policy) first")
    return list(found.values())


@contextlib.contextmanager
def snapped(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every DKM weight is its snapped value (each vector its nearest
    centroid, what ``finalize`` keeps), even in training mode; the codebooks do not move.

    For measuring, during training, how far the loss with soft weights is from
    the loss after snapping::

        with torch.no_grad(), dp.snapped(model):
            snapped_loss = loss_fn(model(x), y)

    Raises RegistrationError when no weight has DKM registered.
    """
    params = _parametrizations(model)
    before = [param.snapping for param in params]
    for param in params:
        param.snapping = True
    try:
        yield model
    finally:
        for param, was in zip(params, before):
            param.snapping = was


def scale_temperature(model: nn.Module, factor: float) -> None:
    """Multiply every DKM layer's temperature ``tau`` by ``factor``, in place.

    Lowering tau over training (for example by ``(final / start) ** (1 / steps)``
    each step) sharpens the attention until the soft weights the model trains
    with are the weights ``finalize`` snaps to; ``snapped`` measures the gap.
    Raises DKMError for a factor that is not a positive finite number or would
    take a temperature out of float32's normal range, before any layer changes;
    RegistrationError when no weight has DKM registered.
    """
    if not (isinstance(factor, (int, float)) and 0 < factor < float("inf")):
        raise DKMError(f"the temperature factor must be a positive finite number, got {factor!r}")
    params = _parametrizations(model)
    info = torch.finfo(torch.float32)
    for param in params:
        scaled = param.tau.double() * factor
        if not bool(((scaled >= info.tiny) & (scaled <= info.max)).all()):
            raise DKMError(
                f"layer '{param.name}': tau {float(param.tau.double().min()):.3g} x {factor:g} leaves float32's "
                f"normal range ({info.tiny:.3g} to {info.max:.3g}); anneal less far"
            )
    with torch.no_grad():
        for param in params:
            param.tau.mul_(factor)
