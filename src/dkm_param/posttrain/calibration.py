"""Calibrated palettization: each layer's input statistics, and assignment to its lookup table with error feedback.

For a layer ``y = W x`` (``W`` as (rows, columns): output channels by input
features, a convolution's unfolded), the error a clustered ``Q`` makes on
calibration inputs is ``tr((W - Q) H (W - Q)^T)`` with ``H = sum x x^T``.
GPTQ (Frantar et al., 2023) minimises it column by column: each column is
assigned, and its error, scaled by the inverse Hessian's Cholesky factor, is
pushed onto the columns not yet assigned. Here the grid each value is
assigned to is the layer's lookup table (GPTVQ, Van Baalen et al., 2024):
per group of rows, times the row's scale where there is one, and for
``dim > 1`` the vectors of ``dim`` consecutive columns are assigned
together, their errors then pushed on one column at a time.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor, nn

from ..errors import DKMError
from ..ops.dtypes import compute_dtype
from .sensitivity import run_batch

# columns assigned between two updates of the remaining ones by one matmul
_BLOCK = 128


def calibration_inputs(batches: Iterable[Any]) -> list[Any]:
    """The calibration batches as a list (they are run once per pass of statistics).

    Raises DKMError for no batches."""
    kept = list(batches)
    if not kept:
        raise DKMError("calibration needs at least one batch")
    return kept


def columns(module: nn.Module) -> int:
    """How many input features a layer's weight has, as calibration reads it: ``W`` (rows, columns)."""
    weight = module.weight
    if is_transposed(module):  # transformers' GPT-2 layer: weight (in, out)
        return weight.shape[0]
    return weight[0].numel()


def check_calibratable(name: str, module: nn.Module) -> None:
    """Raise DKMError for a layer whose inputs calibration cannot read as ``W x``."""
    if isinstance(module, nn.Linear) or is_transposed(module):
        return
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == 1 and isinstance(module.padding, tuple):
        return
    what = type(module).__name__
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        what += f" with groups={module.groups}, padding={module.padding!r}"
    raise DKMError(
        f"layer '{name}' ({what}): calibration reads Linear, transformers' Conv1D and ungrouped Conv1d/Conv2d "
        "layers only; skip this layer in the policy, or palettize it in a second call without calibration"
    )


def is_transposed(module: nn.Module) -> bool:
    """Whether the layer stores its weight as (in, out): transformers' GPT-2 Conv1D."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _input_rows(module: nn.Module, x: Tensor) -> Tensor:
    """A layer's input as rows of its weight's columns.  # (tokens, columns)"""
    if isinstance(module, nn.Conv2d):
        x = nn.functional.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        return x.transpose(1, 2).reshape(-1, x.shape[1])  # (N * positions, C kh kw)
    if isinstance(module, nn.Conv1d):
        x = nn.functional.unfold(
            x[:, :, None], (1, module.kernel_size[0]), (1, module.dilation[0]), (0, module.padding[0]),
            (1, module.stride[0]),
        )
        return x.transpose(1, 2).reshape(-1, x.shape[1])
    return x.reshape(-1, x.shape[-1])


def input_statistics(model: nn.Module, batches: list[Any], names: list[str]) -> dict[str, Tensor]:
    """``H = sum x x^T`` of each named layer's inputs over the batches, in float32 (float64
    for float64 weights), the model run without gradient in eval mode.  # {name: (columns, columns)}"""
    stats: dict[str, Tensor] = {}
    hooks = []

    def hook_for(name: str, module: nn.Module):
        def hook(_module, args):
            rows = _input_rows(module, args[0].detach())
            rows = rows.to(compute_dtype(module.weight.dtype))
            gram = rows.T @ rows
            stats[name] = gram if name not in stats else stats[name].add_(gram)

        return hook

    for name in names:
        module = model.get_submodule(name)
        hooks.append(module.register_forward_pre_hook(hook_for(name, module)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                run_batch(model, batch)
    finally:
        for handle in hooks:
            handle.remove()
        model.train(was_training)
    missing = [name for name in names if name not in stats]
    if missing:
        raise DKMError(
            f"calibration: layer '{missing[0]}' received no input from the calibration batches "
            f"({len(missing)} layer(s) in all); skip unused layers in the policy"
        )
    return stats


def as_rows(weight: Tensor, module: nn.Module) -> Tensor:
    """The weight as ``W`` (rows, columns) in its natural column order, float32."""
    work = weight.detach().to(compute_dtype(weight.dtype))
    return work.T if is_transposed(module) else work.reshape(work.shape[0], -1)


def layout_order(weight: Tensor, module: nn.Module, spec_layout: str) -> Tensor | None:
    """The permutation of ``W``'s columns into the order the layout reads vectors in (None: as is)."""
    if spec_layout == "input" and weight.dim() > 2 and not is_transposed(module):
        channels, kernel = weight.shape[1], weight[0, 0].numel()
        return torch.arange(channels * kernel, device=weight.device).reshape(channels, kernel).T.reshape(-1)
    return None


def assign(
    rows: Tensor, hessian: Tensor, books: Tensor, group_of: Tensor, scale_of: Tensor | None,
    pinned: Tensor | None, damp: float, exact: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """GPTQ assignment of ``rows`` to the lookup tables, column block by column block.

    rows: (R, C) float; hessian: (C, C); books: (G, k, d) centroids per group;
    group_of: (R, C / d) long, each vector's group (an expanded view will do);
    scale_of: (R, C) each value's scale, or None; pinned: (R, C / d) bool,
    vectors that take entry 0 (zero) whatever their value, or None; damp: added
    to the Hessian's diagonal, as a fraction of its mean; exact: (R, C) bool,
    values kept exact (outliers), or None: each keeps the value error feedback
    has given it when its column comes, so it adds no error of its own.
    Returns the index of each vector (R, C / d) long, and the values the
    ``exact`` positions keep (R, C), zero elsewhere (None without ``exact``).
    """
    rows = rows.clone()
    kept = None if exact is None else torch.zeros_like(rows)
    (count, width), d = rows.shape, books.shape[2]
    hessian = hessian.clone()
    dead = hessian.diagonal() == 0  # inputs always zero: their columns change nothing
    hessian[dead, dead] = 1.0
    upper = _inverse_factor(hessian, damp)
    chosen = torch.empty(count, width // d, dtype=torch.long, device=rows.device)
    every = torch.arange(count, device=rows.device)
    for start in range(0, width, _BLOCK):
        stop = min(start + _BLOCK, width)
        block, factor = rows[:, start:stop].clone(), upper[start:stop, start:stop]
        errors = torch.zeros_like(block)
        for first in range(0, stop - start, d):
            at = (start + first) // d
            grid = books[group_of[:, at]]  # (R, k, d)
            if scale_of is not None:
                grid = grid * scale_of[:, start + first : start + first + d][:, None, :]
            index = (block[:, first : first + d][:, None, :] - grid).pow(2).sum(2).argmin(1)  # (R,)
            if pinned is not None:
                index = torch.where(pinned[:, at], 0, index)
            chosen[:, at] = index
            taken = grid[every, index]  # (R, d)
            for j in range(d):
                column = first + j
                value = taken[:, j]
                if kept is not None:
                    value = torch.where(exact[:, start + column], block[:, column], value)
                    kept[:, start + column] = torch.where(exact[:, start + column], value, 0)
                error = (block[:, column] - value) / factor[column, column]
                block[:, column:] -= error[:, None] * factor[column, column:][None, :]
                errors[:, column] = error
        rows[:, stop:] -= errors @ upper[start:stop, stop:]
    return chosen, kept


def _inverse_factor(hessian: Tensor, damp: float) -> Tensor:
    """The upper Cholesky factor of ``(H + damp mean(diag H) I)^-1``, raising the damping
    tenfold (up to four times) while ``H`` is not numerically positive definite."""
    mean = float(hessian.diagonal().mean())
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    for attempt in range(5):
        lower, info = torch.linalg.cholesky_ex(hessian + (damp * 10**attempt) * mean * eye)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
    raise DKMError(
        f"calibration: the layer's input statistics stay singular even damped by {damp * 1e4:g} x their mean; "
        "use more calibration data or a larger damp"
    )


def refit(rows: Tensor, chosen: Tensor, books: Tensor, group_of: Tensor, scale_of: Tensor | None,
          importance: Tensor) -> Tensor:
    """Centroids refit to the vectors assigned to them, by least squares weighted by each
    value's ``importance`` (the diagonal of the input statistics); an entry nothing is
    assigned to keeps its value.  # (G, k, d)

    rows: (R, C) the original weights; chosen: (R, C / d) from ``assign``; the rest as there.
    """
    (count, width), (groups, k, d) = rows.shape, books.shape
    scales = rows.new_ones(count, width) if scale_of is None else scale_of
    slot = (group_of * k + chosen).reshape(-1)  # (R * C / d,)
    mass = books.new_zeros(groups * k, d).index_add_(0, slot, (importance * scales * scales).reshape(-1, d))
    sums = books.new_zeros(groups * k, d).index_add_(0, slot, (importance * scales * rows).reshape(-1, d))
    fitted = (sums / mass.clamp_min(torch.finfo(mass.dtype).tiny)).reshape(groups, k, d)
    return torch.where(mass.reshape(groups, k, d) > 0, fitted, books)


def output_error(rows: Tensor, hessian: Tensor, chosen: Tensor, books: Tensor, group_of: Tensor,
                 scale_of: Tensor | None, exact: Tensor | None = None, kept: Tensor | None = None) -> float:
    """The calibration error ``tr((W - Q) H (W - Q)^T)`` of an assignment to these tables
    (``Q`` takes ``kept`` where ``exact`` holds)."""
    taken = books[group_of, chosen].reshape(rows.shape)  # (R, C)
    if scale_of is not None:
        taken = taken * scale_of
    if exact is not None:
        taken = torch.where(exact, kept, taken)
    gap = rows - taken
    return float(((gap @ hessian) * gap).sum())


def column_importance(hessian: Tensor, rows: int) -> Tensor:
    """Each weight's share of the calibration error when alone: ``H_cc`` for every row.  # (R, C)"""
    return hessian.diagonal()[None, :].expand(rows, -1)


def rows_to_weight(rows: Tensor, weight: Tensor, module: nn.Module) -> Tensor:
    """``W`` (rows, columns) in natural order back to the weight's shape and layout."""
    if is_transposed(module):
        return rows.T.contiguous()
    return rows.reshape(weight.shape)


__all__ = [
    "as_rows",
    "assign",
    "calibration_inputs",
    "check_calibratable",
    "column_importance",
    "columns",
    "input_statistics",
    "is_transposed",
    "layout_order",
    "output_error",
    "refit",
    "rows_to_weight",
]
