"""DKM on the distinct values of a half-precision weight (eDKM): one table entry per value.

A bfloat16 or float16 weight holds at most 65,536 distinct values, and in one
dimension the attention, the soft value and its derivative are functions of
the value alone. So the centroid iterations run on the table of distinct
values ``u`` (U,) weighted by their counts ``c``, the soft weight is a lookup
of the soft table by each weight's bit pattern, and backward accumulates the
weight's gradient into the table (a scatter-add) and reads it back with one
more lookup. Memory beyond the soft weight itself is O(table), and the
per-weight work is a few passes over the weight whatever the bits.

The results are ``soft_cluster_reference``'s on the weight cast to float32
(the same iterations, the sums grouped by value), computed in float32.

Backward: with ``L = sum_i g_i s(w_i)``, ``G_v`` the sum of ``g_i`` over the
weights holding value ``v`` and ``s`` depending on ``u`` directly (through the
last attention) and through the codebooks,

    dL/dw_i = g_i a_v + (dL/du_v through the codebooks) / c_v,

``a_v = ds/du`` with the codebooks held, which is ``2 / tau`` times the
covariance, under the last attention, of the last two codebooks; the second
term is one autograd pass over the table's unrolled iterations (each weight
of a value moves the codebooks by ``1 / c_v`` of what moving them all does).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "HALF_DTYPES", "TABLE_SIZE", "distinct_values", "table_cluster", "value_codes", "value_counts", "value_table",
]

HALF_DTYPES = (torch.bfloat16, torch.float16)
# entries of a table over every 16-bit pattern
TABLE_SIZE = 1 << 16
# weights read or written per pass: temporaries of a few MiB stay in cache and are reused
# from pass to pass (larger ones cost page faults and cache misses: twice the time)
_PASS = 1 << 19
# table rows per chunk of an iteration's attention
_ROWS_ELEMENTS = 1 << 20


def value_codes(values: Tensor) -> Tensor:
    """Each half-precision value's bit pattern, 0 to 65,535: its entry in the table.  # (n,) int32"""
    return values.view(torch.int16).to(torch.int32).bitwise_and_(TABLE_SIZE - 1)


def value_table(dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every value a 16-bit ``dtype`` can hold, in float32, indexed by bit pattern.  # (65536,)"""
    codes = torch.arange(TABLE_SIZE, dtype=torch.int32, device=device).to(torch.int16)
    return codes.view(dtype).float()


def value_counts(values: Tensor) -> Tensor:
    """How many of ``values`` (half precision) hold each bit pattern, in float32.  # (65536,)

    Counts of slices of one weight add up to the weight's: ranks that each
    count a slice and sum the counts (an all-reduce) share one table.
    """
    counts = values.new_zeros(TABLE_SIZE, dtype=torch.float32)
    flat = values.reshape(-1)
    for start in range(0, flat.numel(), _PASS):
        counts += torch.bincount(value_codes(flat[start : start + _PASS]), minlength=TABLE_SIZE)
    return counts


def table_cluster(
    values: Tensor, codebook: Tensor, tau: float, max_iter: int, epsilon: float, counts: Tensor | None = None
) -> tuple[Tensor, Tensor, int]:
    """``soft_cluster`` for a one-dimensional half-precision weight, by value table.

    values: (n,) bfloat16 or float16; codebook: (k, 1) float32, detached.
    counts: ``value_counts(values)`` if the caller has it (summed across ranks).
    Returns ``(soft values (n,) in values' dtype, final codebook (k, 1), iterations run)``.
    Raises ValueError for another dtype or ``max_iter < 1``.
    """
    if values.dtype not in HALF_DTYPES:
        raise ValueError(f"table_cluster needs bfloat16 or float16 values, got {values.dtype}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter}")
    if counts is None:
        counts = value_counts(values.detach())
    args = (codebook.float(), counts.float(), float(tau), int(max_iter), float(epsilon))
    with torch.autocast(values.device.type, enabled=False):
        if torch.is_grad_enabled() and values.requires_grad:
            return _TableCluster.apply(values, *args)
        with torch.no_grad():
            soft, books, _, _ = _run(values, *args)
            return soft, books[-1][:, None], len(books) - 1


def distinct_values(dtype: torch.dtype, counts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """From ``value_counts``: the bit patterns present, their values and their counts.  # (U,) each"""
    present = counts.nonzero()[:, 0]
    return present, value_table(dtype, counts.device)[present], counts[present]


def _run(values: Tensor, codebook: Tensor, counts: Tensor, tau: float, max_iter: int, epsilon: float):
    """The forward: ``(soft values (n,), codebooks [C_0 .. C_T] (k,) each, patterns present, their counts)``."""
    present, points, weights = distinct_values(values.dtype, counts)
    books = _iterate(points, weights, codebook, tau, max_iter, epsilon)
    soft = _soft(points, books[-2], books[-1], tau)
    return _lookup(values, _spread(soft, present), values.dtype), books, present, weights


def _spread(table: Tensor, present: Tensor) -> Tensor:
    """A (U,) table over the patterns present as a (65536,) table over all."""
    return table.new_zeros(TABLE_SIZE).index_copy_(0, present, table)


def _lookup(values: Tensor, table: Tensor, dtype: torch.dtype) -> Tensor:
    """``table[code(v)]`` for each value, in ``dtype``, pass by pass.  # (n,)"""
    flat, table = values.reshape(-1), table.to(dtype)
    out = torch.empty(flat.shape, dtype=dtype, device=values.device)
    for start in range(0, flat.numel(), _PASS):
        stop = start + _PASS
        torch.index_select(table, 0, value_codes(flat[start:stop]), out=out[start:stop])
    return out


def _attention(points: Tensor, centroids: Tensor, tau: float) -> Tensor:
    """``softmax(-(u - c)^2 / tau)`` over the centroids.  # (U, k)"""
    return torch.softmax((points[:, None] - centroids[None, :]).pow(2).div(-tau), dim=1)


def _update(points: Tensor, weights: Tensor, centroids: Tensor, tau: float) -> Tensor:
    """One centroid iteration on weighted points: ``c_j = sum_v c_v A_vj u_v / sum_v c_v A_vj``.  # (k,)"""
    rows = max(1, _ROWS_ELEMENTS // max(1, centroids.numel()))
    mass, moment = centroids.new_zeros(centroids.shape), centroids.new_zeros(centroids.shape)
    for start in range(0, points.numel(), rows):
        attn = _attention(points[start : start + rows], centroids, tau) * weights[start : start + rows, None]
        mass = mass + attn.sum(0)
        moment = moment + points[start : start + rows] @ attn
    moved = moment / mass.clamp_min(torch.finfo(mass.dtype).tiny)
    return torch.where(mass > 0, moved, centroids)


def _iterate(points: Tensor, weights: Tensor, codebook: Tensor, tau: float, max_iter: int, epsilon: float) -> list:
    """The codebooks [C_0 .. C_T] of the iterations, stopping as ``soft_cluster_reference`` does."""
    books = [codebook[:, 0]]
    for _ in range(max_iter):
        books.append(_update(points, weights, books[-1], tau))
        if not float((books[-1] - books[-2]).abs().max()) > epsilon:
            break
    return books


def _soft(points: Tensor, attend: Tensor, final: Tensor, tau: float) -> Tensor:
    """The soft value of each point, ``A(u, attend) @ final``.  # (U,)"""
    rows = max(1, _ROWS_ELEMENTS // max(1, attend.numel()))
    return torch.cat([_attention(points[s : s + rows], attend, tau) @ final for s in range(0, points.numel(), rows)])


def _slope(points: Tensor, attend: Tensor, final: Tensor, tau: float) -> Tensor:
    """``ds/du`` with the codebooks held: ``2 / tau`` times the covariance of ``final`` and
    ``attend`` under the attention (centred, so that nothing cancels).  # (U,)"""
    rows = max(1, _ROWS_ELEMENTS // max(1, attend.numel()))
    parts = []
    for s in range(0, points.numel(), rows):
        attn = _attention(points[s : s + rows], attend, tau)
        spread = final[None, :] - (attn @ final)[:, None]
        centred = attend[None, :] - (attn @ attend)[:, None]
        parts.append((attn * spread * centred).sum(1))
    return torch.cat(parts) * (2.0 / tau)


class _TableCluster(torch.autograd.Function):
    """``table_cluster`` with gradient: saves the weight itself (no copy), the table of
    patterns present and their counts, and the first codebook; backward recomputes the rest."""

    @staticmethod
    def forward(ctx, values, codebook, counts, tau, max_iter, epsilon):
        soft, books, present, weights = _run(values, codebook, counts, tau, max_iter, epsilon)
        ctx.save_for_backward(values, present, weights, books[0])
        ctx.tau, ctx.iterations = tau, len(books) - 1
        final = books[-1][:, None]
        ctx.mark_non_differentiable(final)
        return soft, final, len(books) - 1

    @staticmethod
    def backward(ctx, grad_soft, _grad_codebook, _grad_iterations):
        values, present, weights, first = ctx.saved_tensors
        tau = ctx.tau
        with torch.autocast(values.device.type, enabled=False):
            grad = grad_soft.reshape(-1)
            per_value = values.new_zeros(TABLE_SIZE, dtype=torch.float32)  # G_v
            flat = values.reshape(-1)
            passes = []  # each pass's codes, kept for the second loop (within this backward only)
            for start in range(0, flat.numel(), _PASS):
                stop = start + _PASS
                passes.append(value_codes(flat[start:stop]))
                per_value += torch.bincount(passes[-1], weights=grad[start:stop].float(), minlength=TABLE_SIZE)
            points = value_table(values.dtype, values.device)[present]
            with torch.enable_grad():
                live = points.detach().requires_grad_()
                books = [first]
                for _ in range(ctx.iterations):
                    books.append(_update(live, weights, books[-1], tau))
                through_books = _soft(points, books[-2], books[-1], tau)  # u held in the last attention
                (moved,) = torch.autograd.grad(through_books @ per_value[present], live)
            slope = _slope(points, books[-2].detach(), books[-1].detach(), tau)
            direct, shared = _spread(slope, present), _spread(moved / weights, present)
            out = torch.empty_like(flat)
            for start, codes in zip(range(0, flat.numel(), _PASS), passes):
                # g_i a_v + b_v, in float32 throughout (mixed-dtype arithmetic is several times slower)
                looked = direct.index_select(0, codes).mul_(grad[start : start + _PASS].float())
                out[start : start + _PASS] = looked.add_(shared.index_select(0, codes))
        return out.view_as(values), None, None, None, None, None
