"""Sensitivity from calibration data: the diagonal Fisher information of every weight."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from ..errors import DKMError
from ..ops.dtypes import compute_dtype
from ..policy import weight_of


def fisher(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> dict[str, Tensor]:
    """Diagonal Fisher information of every weight: mean squared gradient over ``batches``.

    batches: inputs, or (inputs, targets) pairs. Without targets the model's
    own predictions (argmax) stand in for them. loss_fn(outputs, targets)
    defaults to cross entropy. Returns {module name: tensor of the weight's shape}.
    """
    loss_fn = loss_fn or nn.functional.cross_entropy
    weights = {name: weight_of(m) for name, m in model.named_modules() if weight_of(m) is not None}
    totals = {name: torch.zeros_like(w, dtype=compute_dtype(w.dtype)) for name, w in weights.items()}
    was_training = model.training
    model.eval()
    count = 0
    for batch in batches:
        inputs, targets = batch if isinstance(batch, (tuple, list)) else (batch, None)
        model.zero_grad(set_to_none=True)
        outputs = model(inputs)
        if targets is None:
            targets = outputs.detach().argmax(-1)
        loss_fn(outputs, targets).backward()
        for name, w in weights.items():
            if w.grad is not None:
                totals[name] += w.grad.detach().to(totals[name].dtype).pow(2)
        count += 1
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    if count == 0:
        raise DKMError("fisher needs at least one calibration batch")
    return {name: total / count for name, total in totals.items()}
