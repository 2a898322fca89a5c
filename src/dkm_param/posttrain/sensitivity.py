"""Sensitivity from calibration data: the diagonal Fisher information of every weight."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from ..errors import DKMError
from ..ops.dtypes import compute_dtype
from ..policy import weight_of


def fisher(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    *,
    loss: Callable[[nn.Module, Any], Tensor] | None = None,
) -> dict[str, Tensor]:
    """Diagonal Fisher information of every weight: mean squared gradient over ``batches``.

    batches: inputs, ``(inputs, targets)`` pairs, or dicts of keyword arguments
        for the model (a tokenizer's output, with ``labels`` for a causal LM).
    loss: ``loss(model, batch) -> scalar tensor``, for any model and batch;
        without it the loss comes from the model's output, which may be a
        tensor, a tuple or list (its first element), a dict or a transformers
        ``ModelOutput``: its own ``loss`` when the batch has no targets and the
        output carries one, otherwise ``loss_fn(logits, targets)`` with the
        output's ``logits`` (or first entry). Without targets the logits' own
        argmax stands in for them. loss_fn defaults to cross entropy (over the
        last dimension when the targets have the logits' shape less it, as a
        language model's do).
    Returns {module name: tensor of the weight's shape}.
    Raises DKMError without batches, for an output with no logits to take,
    or for a loss that is not a scalar depending on the weights.
    """
    weights = {name: weight_of(m) for name, m in model.named_modules() if weight_of(m) is not None}
    totals = {name: torch.zeros_like(w, dtype=compute_dtype(w.dtype)) for name, w in weights.items()}
    was_training = model.training
    model.eval()
    count = 0
    try:
        for index, batch in enumerate(batches):
            model.zero_grad(set_to_none=True)
            value = loss(model, batch) if loss is not None else _batch_loss(model, batch, loss_fn)
            _check_loss(value, index)
            value.backward()
            for name, w in weights.items():
                if w.grad is not None:
                    totals[name] += w.grad.detach().to(totals[name].dtype).pow(2)
            count += 1
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if count == 0:
        raise DKMError("fisher needs at least one calibration batch")
    return {name: total / count for name, total in totals.items()}


def run_batch(model: nn.Module, batch: Any) -> tuple[Any, Tensor | None]:
    """The model's output on a calibration batch, and the batch's targets (None without).

    batch: a dict of keyword arguments, an ``(inputs, targets)`` pair, or inputs.
    """
    if isinstance(batch, Mapping):
        return model(**batch), None
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return model(batch[0]), batch[1]
    return model(batch), None


def _check_loss(value: Any, index: int) -> None:
    """Raise DKMError unless ``value`` is a scalar tensor that backward can reach the weights from."""
    if isinstance(value, Tensor) and value.numel() == 1 and value.requires_grad:
        return
    if not isinstance(value, Tensor):
        what = f"a {type(value).__name__}"
    elif value.numel() != 1:
        what = f"a tensor of shape {tuple(value.shape)}"
    else:
        what = "a scalar that does not depend on the weights (computed under no_grad, or detached)"
    raise DKMError(f"fisher: the loss of batch {index} is {what}; it must be a scalar tensor with gradient")


def _batch_loss(model: nn.Module, batch: Any, loss_fn: Callable[[Tensor, Tensor], Tensor] | None) -> Tensor:
    """The loss of one batch from the model's output (see ``fisher``)."""
    outputs, targets = run_batch(model, batch)
    if targets is None:
        own = outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)
        if isinstance(own, Tensor):
            return own
    logits = _logits(outputs)
    if targets is None:
        targets = logits.detach().argmax(-1)
    if loss_fn is not None:
        return loss_fn(logits, targets)
    if logits.dim() > 2 and tuple(targets.shape) == tuple(logits.shape[:-1]):  # per token: classes last
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
    return nn.functional.cross_entropy(logits.float(), targets)


def _logits(outputs: Any) -> Tensor:
    """The tensor a model's output carries as its prediction."""
    if isinstance(outputs, Mapping):
        found = outputs.get("logits")
        if found is None and outputs:
            found = next(iter(outputs.values()))
    elif isinstance(outputs, (tuple, list)):
        found = outputs[0] if outputs else None
    else:
        found = outputs
    if not isinstance(found, Tensor):
        raise DKMError(
            f"fisher: the model returned {type(outputs).__name__}, with no logits to take; "
            "pass loss=lambda model, batch: ... returning the batch's scalar loss"
        )
    return found
