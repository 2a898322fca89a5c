"""DKM on a table of a one-dimensional weight's values (eDKM): one entry per value or grid point.

A bfloat16 or float16 weight holds at most 65,536 distinct values, and in one
dimension the attention, the soft value and its derivative are functions of
the value alone. So the centroid iterations run on the table of distinct
values ``u`` (U,) weighted by their counts ``c``, the soft weight is a lookup
of the soft table by each weight's bit pattern, and backward accumulates the
weight's gradient into the table (a scatter-add) and reads it back with one
more lookup. Memory beyond the soft weight itself is O(table), and the
per-weight work is a few passes over the weight whatever the bits. The
results are ``soft_cluster_reference``'s on the weight cast to float32 (the
same iterations, the sums grouped by value), computed in float32.
On the CPU those passes run as compiled loops where a C compiler is at hand
(``ops.native``: the same results, the gradient's sums added in float64).

A float32 weight is tabled on a grid of evenly spaced points between its
extremes (``value_grid``, 4,096 to 1,048,576 of them, as the temperature needs): each weight counts at its
nearest point ``u``, the iterations run on the points, and each weight's
soft value and slope are taken to first order from its point's,
``s(w) = s(u) + (w - u) s'(u)`` and ``s'(w) = s'(u) + (w - u) s''(u)``. The
grid is fine enough when its half-step is small against the width of the
sharpest transition between centroids (``GRID_TOLERANCE``); otherwise
``table_cluster`` raises GridTooCoarse with the size that would be, before
forming any result. Rounding the weights to the points moves the codebook by
about a ten-thousandth of its span; the soft values and their slope stay
within about a percent of the exact ones (``tests/ops/test_table.py``).

Backward: with ``L = sum_i g_i s(w_i)``, ``G_v`` the sum of ``g_i`` over the
weights holding value ``v`` and ``s`` depending on ``u`` directly (through the
last attention) and through the codebooks,

    dL/dw_i = g_i a_v + (dL/du_v through the codebooks) / c_v,

``a_v = ds/du`` with the codebooks held, which is ``2 / tau`` times the
covariance, under the last attention, of the last two codebooks (at ``w_i``
itself for a float32 weight, to first order); the second term is one
autograd pass over the table's unrolled iterations (each weight of a value
moves the codebooks by ``1 / c_v`` of what moving them all does).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from functools import cached_property, partial
from typing import Callable

import torch
from torch import Tensor

from . import _engine, native
from ._engine import flushed_exp
from .threads import threads_for

__all__ = [
    "GRID_SIZES", "HALF_DTYPES", "TABLE_DTYPES", "TABLE_SIZE", "Grid", "GridTooCoarse", "distinct_values",
    "grid_size", "table_cluster", "value_codes", "value_counts", "value_grid", "value_table",
]

HALF_DTYPES = (torch.bfloat16, torch.float16)
TABLE_DTYPES = (*HALF_DTYPES, torch.float32)
# entries of a half-precision weight's table (every 16-bit pattern), and the fewest and most
# points of a float32 weight's grid
TABLE_SIZE = 1 << 16
GRID_SIZES = (1 << 12, 1 << 20)
# a float32 weight's grid is fine enough when its half-step is at most this fraction of the
# width of the sharpest transition between centroids with weights near it (the gradient is
# then within about a percent of the exact one, the soft values far closer)
GRID_TOLERANCE = 0.05
# weights read or written per pass: the passes' temporaries, a few MiB, stay in cache
# (larger ones cost cache misses) and are written into per-thread buffers kept from call to
# call (``_buffer``): memory that large, freshly allocated, costs page faults on every pass
_PASS = 1 << 19
# attention elements per chunk of the table (4 MiB in float32)
_CHUNK_ELEMENTS = 1 << 20
# On a GPU each operation is launched from the host at a cost of microseconds, whatever its
# size, and the caching allocator keeps temporaries mapped: passes there are this large (64 MiB
# in float32), and chunks as large as the engine's there (``_engine.DEVICE_CHUNK_ELEMENTS``),
# so that a layer takes a few dozen launches.
_DEVICE_PASS = 1 << 24


@dataclass(frozen=True)
class Grid:
    """A float32 weight's table: ``size`` points from ``low``, ``step`` apart (0-d float32 tensors)."""

    low: Tensor
    step: Tensor
    size: int

    @cached_property
    def placing(self) -> tuple[float, float]:
        """The least point and one over the step, as Python floats (read once, as a grid is not
        changed once made: ``ops.native``'s passes take them), the values ``value_codes`` computes with."""
        return float(self.low), float(1.0 / self.step)


class GridTooCoarse(Exception):
    """``table_cluster`` on a float32 weight whose grid is too coarse for the temperature:
    count again on ``size`` points (``None``: more than ``GRID_SIZES`` allows; use the
    float32 engine)."""

    def __init__(self, size: int | None):
        super().__init__(f"the grid needs {size} points" if size else "no grid is fine enough")
        self.size = size


def value_grid(low: Tensor, high: Tensor, size: int = TABLE_SIZE) -> Grid:
    """The grid of ``size`` evenly spaced points from a float32 weight's least value to its
    greatest. Ranks that share the extremes of their slices (an all-reduce) share one grid."""
    if size < 2:
        raise ValueError(f"a grid has at least 2 points, got {size}")
    low, high = low.detach().float(), high.detach().float()
    step = ((high - low) / (size - 1)).clamp_min(torch.finfo(torch.float32).tiny)
    return Grid(low, step, size)


def value_codes(values: Tensor, grid: Grid | None = None, out: Tensor | None = None) -> Tensor:
    """Each value's entry in the table: a half-precision value's bit pattern (0 to 65,535),
    a float32 value's nearest point of ``grid`` (``value_grid``).  # (n,) int32
    out: an int32 tensor of the values' size to write them into (a float32 grid's codes also
    use ``_buffer``'s "scaled" one)."""
    if grid is None:
        return values.view(torch.uint16).to(torch.int32) if out is None else out.copy_(values.view(torch.uint16))
    scale = 1.0 / grid.step
    # (v - low) / step + 0.5, truncated (clamped: rounding may pass the last point), is the nearest
    # point. A subtraction, a multiply and an add: on the CPU addcmul with tensor scalars is slower
    # than the three together, and v / step alone overflows for a weight of one value (step tiny).
    if out is None:
        return torch.sub(values, grid.low).mul_(scale).add_(0.5).clamp_(0, grid.size - 1).to(torch.int32)
    scaled = torch.sub(values, grid.low, out=_buffer("scaled", torch.float32, values.numel(), values.device))
    return out.copy_(scaled.mul_(scale).add_(0.5).clamp_(0, grid.size - 1))


def value_table(dtype: torch.dtype, device: torch.device, grid: Grid | None = None) -> Tensor:
    """The value of every entry, in float32: each 16-bit pattern of ``dtype``, or each point
    of ``grid``.  # (entries,)"""
    return _entry_values(torch.arange(_entries(grid), dtype=torch.int32, device=device), dtype, grid)


def _entry_values(entries: Tensor, dtype: torch.dtype, grid: Grid | None) -> Tensor:
    """``value_table(dtype, device, grid)[entries]``, computed for those entries alone.  # (U,)"""
    if grid is None:
        return entries.to(torch.int16).view(dtype).float()
    return entries.float().mul_(grid.step).add_(grid.low)


def value_counts(values: Tensor, grid: Grid | None = None) -> Tensor:
    """How many of ``values`` fall on each entry (``value_codes``), in float32.  # (entries,)

    Counts of slices of one weight add up to the weight's: ranks that each
    count a slice on one grid and sum the counts (an all-reduce) share one table.
    """
    size, flat = _entries(grid), values.reshape(-1)
    if _compiled(flat, grid):  # counted in int64, exactly
        wide = values.new_zeros(size, dtype=torch.int64)
        native.count(flat, wide, *_placing(grid))
        return wide.float()
    counts = values.new_zeros(size, dtype=torch.float32)

    def count(a: int, b: int) -> None:
        _histogram(counts, value_codes(flat[a:b], grid, _codes(b - a, flat.device)))

    _each_pass(flat.numel(), count, flat.device)
    return counts


def table_cluster(
    values: Tensor, codebook: Tensor, tau: float, max_iter: int, epsilon: float,
    counts: Tensor | None = None, grid: Grid | None = None, sized: bool = False,
) -> tuple[Tensor, Tensor, int]:
    """``soft_cluster`` for a one-dimensional weight, by value table.

    values: (n,) bfloat16, float16 or float32; codebook: (k, 1) float32, detached.
    grid: a float32 weight's ``value_grid``, on ``grid_size`` points (None: on
    ``TABLE_SIZE`` points).
    counts: ``value_counts(values, grid)`` if the caller has it (summed across ranks).
    sized: ``grid`` has at least ``grid_size``'s points for the weight's extremes, ``codebook``
    and ``tau`` (a quarter to spare), so is fine enough for the starting centroids: that check
    is skipped (the one after the iterations, when they moved the centroids, is not).
    Returns ``(soft values (n,) in values' dtype, final codebook (k, 1), iterations run)``.
    Raises ValueError for another dtype or ``max_iter < 1``, and GridTooCoarse when a
    float32 weight's grid is too coarse for ``tau`` (before any result is formed).
    """
    if values.dtype not in TABLE_DTYPES:
        raise ValueError(f"table_cluster needs bfloat16, float16 or float32 values, got {values.dtype}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter}")
    if values.dtype in HALF_DTYPES:
        grid = None
    elif grid is None:
        grid = value_grid(*torch.aminmax(values.detach()))
    if counts is None:
        counts = value_counts(values.detach(), grid)
    args = (codebook.float(), counts.float(), grid, float(tau), int(max_iter), float(epsilon), bool(sized))
    with torch.autocast(values.device.type, enabled=False):
        if torch.is_grad_enabled() and values.requires_grad:
            return _TableCluster.apply(values, *args)
        with torch.no_grad():
            soft, books, _, _ = _run(values, *args)
            return soft, books[-1][:, None], len(books) - 1


def distinct_values(dtype: torch.dtype, counts: Tensor, grid: Grid | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """From ``value_counts``: the entries present, their values and their counts.  # (U,) each"""
    present = counts.nonzero()[:, 0]
    return present, _entry_values(present, dtype, grid), counts[present]


def _entries(grid: Grid | None) -> int:
    return TABLE_SIZE if grid is None else grid.size


def _run(values: Tensor, codebook: Tensor, counts: Tensor, grid: Grid | None, tau: float, max_iter: int,
         epsilon: float, sized: bool = False):
    """The forward: ``(soft values (n,), codebooks [C_0 .. C_T] (k,) each, entries present, their counts)``."""
    present, points, weights = distinct_values(values.dtype, counts, grid)
    # a float32 weight's grid is checked against the starting centroids, the ratio read back with
    # the first iteration's shift (one wait on a GPU) and refused before any result is formed
    check = None if grid is None or sized else (_fineness(grid, codebook[:, 0], tau, points),
                                                partial(_refuse_coarse, grid))
    books, attention = _iterate(points, weights, codebook, tau, max_iter, epsilon, check)
    if grid is None:  # each weight is its table entry's value
        (soft,) = _moments(points, books[-2], books[-1], tau, 1, attention)
        return _lookup(values, _spread(soft, present, TABLE_SIZE), values.dtype), books, present, weights
    if len(books) > 2:  # the centroids attended to have moved since the check above
        _refuse_coarse(grid, float(_fineness(grid, books[-2], tau, points)))
    soft, slope = _moments(points, books[-2], books[-1], tau, 2, attention)
    # a float32 weight lies within half a step of its grid point u: s(w) to first order,
    # s(u) + (w - u) s'(u) = (s - u s')[entry] + w s'[entry]
    line = (_spread(soft - points * slope, present, grid.size), _spread(slope, present, grid.size))
    return _lookup_line(values, *line, grid), books, present, weights


def grid_size(low: Tensor, high: Tensor, codebook: Tensor, tau: float) -> int | None:
    """The fewest points, a power of two in ``GRID_SIZES``, of a grid from ``low`` to ``high`` fine
    enough for ``codebook`` (k, 1) at ``tau`` wherever weights might lie (None: more than
    ``GRID_SIZES[1]``). A function of its arguments alone, so that a
    training step resumed from a checkpoint counts on the same grid."""
    step = (high.detach().float() - low.detach().float()) / (GRID_SIZES[0] - 1)
    ratio = float(_grid_ratio(low, high, step, codebook[:, 0].float(), tau, None))
    return _size_for(GRID_SIZES[0], 1.25 * ratio)  # a quarter to spare: the iterations move centroids


def _size_for(size: int, ratio: float) -> int | None:
    """Points for a grid whose ``size`` points gave ``ratio``, to reach ``GRID_TOLERANCE``."""
    if not math.isfinite(ratio):
        return None
    wanted = size * ratio / GRID_TOLERANCE
    enough = max(GRID_SIZES[0], 1 << max(0, math.ceil(math.log2(max(wanted, 1.0)))))
    return enough if enough <= GRID_SIZES[1] else None


def _grid_ratio(low: Tensor, high: Tensor, step: Tensor, attend: Tensor, tau: float, points: Tensor | None) -> Tensor:
    """The half-step over the width of the sharpest transition between neighbouring centroids
    that has weights near it, ``tau / (2 gap)`` for neighbours ``gap`` apart (the attention
    between them turns by a factor e over that distance). points: the grid points present,
    ascending (None: any point from ``low`` to ``high`` may be).  # 0-d, on the device"""
    ordered = attend.sort().values
    gaps, middles = ordered[1:] - ordered[:-1], (ordered[1:] + ordered[:-1]) / 2
    if not len(gaps):
        return step.new_zeros(())
    # a weight farther than 8 widths from a transition sees under e^-8 of its slope, whatever the step
    reach = 8 * tau / (2 * gaps).clamp_min(torch.finfo(gaps.dtype).tiny) + step
    if points is None:
        near = (middles + reach >= low) & (middles - reach <= high)
    else:
        first = torch.searchsorted(points, middles - reach)  # the first point at or past each window's start
        near = (first < len(points)) & (points[first.clamp_max(len(points) - 1)] <= middles + reach)
    return step * torch.where(near, gaps, 0).max() / tau


def _fineness(grid: Grid, attend: Tensor, tau: float, points: Tensor) -> Tensor:
    """``_grid_ratio`` of ``grid`` for the centroids ``attend``. points: the grid points present,
    ascending.  # 0-d"""
    high = grid.low + grid.step * (grid.size - 1)
    return _grid_ratio(grid.low, high, grid.step, attend, tau, points)


def _refuse_coarse(grid: Grid, ratio: float) -> None:
    """Raise GridTooCoarse unless the grid's half-step is within ``GRID_TOLERANCE`` of the width of
    every transition with weights near it (``ratio``, from ``_fineness``)."""
    if not ratio <= GRID_TOLERANCE:  # NaN too
        finer = _size_for(grid.size, ratio)
        raise GridTooCoarse(finer if finer is not None and finer > grid.size else None)


def _spread(table: Tensor, present: Tensor, size: int) -> Tensor:
    """A (U,) table over the entries present as a (size,) table over all."""
    return table.new_zeros(size).index_copy_(0, present, table)


def _lookup(values: Tensor, table: Tensor, dtype: torch.dtype) -> Tensor:
    """``table[code(v)]`` for each value, in ``dtype``, pass by pass.  # (n,)"""
    flat, table = values.reshape(-1), table.to(dtype)
    out = torch.empty(flat.shape, dtype=dtype, device=values.device)
    if _compiled(flat, None):
        native.lookup(flat, out, table)
        return out

    def look(a: int, b: int) -> None:
        torch.index_select(table, 0, value_codes(flat[a:b], None, _codes(b - a, flat.device)), out=out[a:b])

    _each_pass(flat.numel(), look, flat.device)
    return out


def _lookup_line(values: Tensor, base: Tensor, slope: Tensor, grid: Grid) -> Tensor:
    """``base[code(v)] + v * slope[code(v)]`` for each float32 value, pass by pass.  # (n,)"""
    flat = values.reshape(-1)
    out = torch.empty_like(flat)
    if _compiled(flat, grid):
        native.lookup(flat, out, base, slope, *_placing(grid))
        return out

    def work(a: int, b: int) -> None:
        codes = value_codes(flat[a:b], grid, _codes(b - a, flat.device))
        gathered = torch.index_select(base, 0, codes, out=_buffer("first", torch.float32, b - a, flat.device))
        torch.index_select(slope, 0, codes, out=out[a:b]).mul_(flat[a:b]).add_(gathered)

    _each_pass(flat.numel(), work, flat.device)
    return out


_BUFFERS = threading.local()


def _buffer(name: str, dtype: torch.dtype, n: int, device: torch.device) -> Tensor:
    """This thread's buffer ``name`` of at least ``n`` elements of ``dtype`` on ``device``, the
    first ``n`` of them: a pass's temporary that is not allocated afresh each time.  # (n,)
    On a GPU, a fresh tensor: the caching allocator reuses memory, and holds none between steps."""
    if not _engine.on_host(device):
        return torch.empty(n, dtype=dtype, device=device)
    buffers = _BUFFERS.__dict__.setdefault("by_key", {})
    key = (name, dtype, device)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < n:
        with torch.inference_mode(False):  # a normal tensor, writable in and out of inference mode
            buffer = buffers[key] = torch.empty(max(n, _PASS), dtype=dtype, device=device)
    return buffer[:n]


def _codes(n: int, device: torch.device) -> Tensor:
    return _buffer("codes", torch.int32, n, device)


def _each_pass(n: int, work: Callable[[int, int], None], device: torch.device) -> None:
    """``work(start, stop)`` for each pass over ``n`` values on ``device`` (``_PASS`` values on
    the CPU, ``_DEVICE_PASS`` elsewhere), without gradient."""
    step = _PASS if _engine.on_host(device) else _DEVICE_PASS
    with torch.no_grad():
        for start in range(0, n, step):
            work(start, min(start + step, n))


def _compiled(flat: Tensor, grid: Grid | None, *others: Tensor) -> bool:
    """Whether a pass over ``flat`` (and ``others``, each of its dtype) runs compiled
    (``ops.native``): on the CPU, each contiguous, a half-precision weight or a float32 one on a
    grid the loops take, with a C compiler at hand."""
    if flat.dtype not in (HALF_DTYPES if grid is None else (torch.float32,)) or not _engine.on_host(flat.device):
        return False
    if grid is not None and not native.usable_grid(*grid.placing, grid.size):
        return False
    tensors = (flat, *others)
    return (all(t.is_contiguous() and t.dtype == flat.dtype and t.device == flat.device for t in tensors)
            and native.available())


def _placing(grid: Grid | None) -> tuple[float, ...]:
    """A float32 grid's least point and one over its step, as ``value_codes`` takes them; nothing
    for a half-precision weight."""
    return () if grid is None else grid.placing


def _histogram(out: Tensor, codes: Tensor, weights: Tensor | None = None) -> None:
    """Adds to ``out`` (entries,) float32 each code's count, or the sum of its ``weights``.

    On a GPU ``bincount`` reads the largest code back to the host (a sync per
    call); ``index_add_`` does not. On the CPU ``bincount`` is the faster. Counts
    are whole numbers (int32 within a pass, as float32 adding ones stops at 2**24).
    """
    if _engine.on_host(codes.device):
        out.add_(torch.bincount(codes, weights=weights, minlength=out.numel()))
    elif weights is None:
        whole = torch.zeros(out.shape, dtype=torch.int32, device=out.device)
        out.add_(whole.index_add_(0, codes, torch.ones_like(codes)))
    else:
        out.index_add_(0, codes, weights)


def _columns(centroids: Tensor) -> int:
    """Table entries per chunk of an attention over ``centroids`` (k,)."""
    budget = _CHUNK_ELEMENTS if _engine.on_host(centroids.device) else _engine.DEVICE_CHUNK_ELEMENTS
    return max(1, budget // max(1, centroids.numel()))


def _attention(points: Tensor, centroids: Tensor, tau: float) -> Tensor:
    """``softmax(-(u - c)^2 / tau)`` over the centroids, laid out centroids by points.  # (k, U)

    Each centroid's row is contiguous: softmax over a short inner dimension (a
    few centroids) is several times slower than these whole-row passes.
    """
    gaps = centroids[:, None] - points[None, :]
    if gaps.requires_grad:  # out of place, for autograd (the shift is a constant to softmax)
        logits = gaps.square().mul(-1.0 / tau)
        shifted = flushed_exp(logits - logits.detach().amax(0, keepdim=True), inplace=False)
        return shifted / shifted.sum(0, keepdim=True)
    logits = gaps.square_().mul_(-1.0 / tau)
    shifted = flushed_exp(logits.sub_(logits.amax(0, keepdim=True)), inplace=True)
    return shifted.div_(shifted.sum(0, keepdim=True))


def _update(points: Tensor, weights: Tensor, centroids: Tensor, tau: float, keep: bool = False):
    """One centroid iteration on weighted points: ``c_j = sum_v c_v A_vj u_v / sum_v c_v A_vj``.

    Returns ``(centroids (k,), the attention (k, U) if keep and it fits one chunk, else None)``.
    """
    cols = _columns(centroids)
    weighted = points * weights
    mass, moment, attention = 0, 0, None
    for start in range(0, points.numel(), cols):
        attention = _attention(points[start : start + cols], centroids, tau)
        mass = mass + attention @ weights[start : start + cols]
        moment = moment + attention @ weighted[start : start + cols]
    moved = moment / mass.clamp_min(torch.finfo(mass.dtype).tiny)
    return torch.where(mass > 0, moved, centroids), attention if keep and points.numel() <= cols else None


def _iterate(points: Tensor, weights: Tensor, codebook: Tensor, tau: float, max_iter: int, epsilon: float,
             check: tuple[Tensor, Callable[[float], None]] | None = None):
    """The codebooks [C_0 .. C_T] of the iterations, stopping as ``soft_cluster_reference`` does,
    and the last iteration's attention (on ``C_{T-1}``) if it fits one chunk, else None.
    check: ``(value, test)``: ``value`` (0-d) is read back with the first iteration's shift (one
    wait on a GPU, not two) and given to ``test``, which may raise."""
    books = [codebook[:, 0]]
    for _ in range(max_iter):
        moved, attention = _update(points, weights, books[-1], tau, keep=True)
        books.append(moved)
        shift = (books[-1] - books[-2]).abs().max()
        if check is None:
            shift = float(shift)
        else:
            shift, value = torch.stack([shift, check[0].to(shift.dtype)]).tolist()
            check, test = None, check[1]
            test(value)
        if not shift > epsilon:
            break
    return books, attention


def _moments(points: Tensor, attend: Tensor, final: Tensor, tau: float, orders: int, attention=None) -> list:
    """The soft value of each point, ``A(u, attend) @ final``, then, for ``orders`` 2 and 3, its
    first and second derivatives in ``u`` with the codebooks held. Each (U,).

    ``s' = 2 / tau`` times the covariance of ``final`` and ``attend`` under the attention, and
    ``s'' = (2 / tau)^2`` times their third central co-moment ``E[(f - Ef)(a - Ea)^2]``
    (centred, so that nothing cancels). attention: ``A(u, attend)`` (k, U) if the caller has it.
    """
    cols = _columns(attend)
    parts = [[] for _ in range(orders)]
    for start in range(0, points.numel(), cols):
        attn = attention if attention is not None else _attention(points[start : start + cols], attend, tau)
        soft = final @ attn
        parts[0].append(soft)
        if orders > 1:
            for part, derivative in zip(parts[1:], _derivatives(attn, attend, final, soft, tau, orders)[1]):
                part.append(derivative)
    return [torch.cat(p) for p in parts]


def _derivatives(attn: Tensor, attend: Tensor, final: Tensor, soft: Tensor, tau: float, orders: int):
    """One chunk's ``attend - E attend`` (k, c) under the attention ``attn`` (k, c), and ``[s']``,
    or ``[s', s'']`` for ``orders`` 3, each (c,): ``_moments``'s, given the soft values ``soft``."""
    centred = attend[:, None] - (attend @ attn)[None, :]
    joint = (attn * (final[:, None] - soft[None, :])).mul_(centred)
    found = [joint.sum(0) * (2.0 / tau)]
    if orders > 2:
        found.append(joint.mul_(centred).sum(0) * (2.0 / tau) ** 2)
    return centred, found


def _one_iteration_backward(points: Tensor, weights: Tensor, upstream: Tensor, first: Tensor, last: Tensor,
                            tau: float, orders: int) -> list[Tensor]:
    """For one iteration ``C_1 = update(u, C_0)``: each point's share of the gradient through the
    codebook, ``(dL/du_v through C_1) / c_v``, then ``s'`` (and ``s''`` for ``orders`` 3). Each (U,).

    With ``A`` the attention on ``C_0``, ``M_j = sum_v c_v A_jv``, ``lam_j = sum_v G_v A_jv``
    (``upstream``: ``G``) and ``m_v = sum_j A_jv C_0j``:
    ``dC_1j/du_v = c_v A_jv (1 + 2 / tau (u_v - C_1j)(C_0j - m_v)) / M_j``, so the share is
    ``sum_j (lam_j / M_j) A_jv (1 + 2 / tau (u_v - C_1j)(C_0j - m_v))`` (a centroid with no mass
    stays where it was: no gradient). One attention serves this and the moments.
    """
    cols = _columns(first)
    chunks = range(0, points.numel(), cols)
    kept = _attention(points, first, tau) if points.numel() <= cols else None
    mass, pull = first.new_zeros(first.shape), first.new_zeros(first.shape)
    for start in chunks:
        attn = kept if kept is not None else _attention(points[start : start + cols], first, tau)
        mass += attn @ weights[start : start + cols]
        pull += attn @ upstream[start : start + cols]
    rate = torch.where(mass > 0, pull / mass.clamp_min(torch.finfo(mass.dtype).tiny), 0.0)  # lam_j / M_j
    parts = [[] for _ in range(orders)]  # the share, s', s''
    for start in chunks:
        u = points[start : start + cols]
        attn = kept if kept is not None else _attention(u, first, tau)
        centred, derivatives = _derivatives(attn, first, last, last @ attn, tau, orders)  # centred: C_0j - m_v
        rated = attn * rate[:, None]
        parts[0].append(rated.sum(0) + (rated * (u[None, :] - last[:, None]) * centred).sum(0) * (2.0 / tau))
        for part, derivative in zip(parts[1:], derivatives):
            part.append(derivative)
    return [torch.cat(p) for p in parts]


def _sums_by_value(flat: Tensor, grad: Tensor, grid: Grid | None) -> Tensor:
    """``G_v``: the sum of ``grad`` over the weights ``flat`` of each entry, pass by pass.  # (entries,) float32"""
    size = _entries(grid)
    if _compiled(flat, grid, grad):  # added in float64
        wide = flat.new_zeros(size, dtype=torch.float64)
        native.gather(flat, grad, wide, *_placing(grid))
        return wide.float()
    sums = flat.new_zeros(size, dtype=torch.float32)

    def gather(a: int, b: int) -> None:
        _histogram(sums, value_codes(flat[a:b], grid, _codes(b - a, flat.device)), _upstream(grad, a, b))

    _each_pass(flat.numel(), gather, flat.device)
    return sums


def _gradient(flat: Tensor, grad: Tensor, grid: Grid | None, tables: tuple[Tensor, ...]) -> Tensor:
    """The weight's gradient from ``grad``, pass by pass, in float32 throughout (mixed-dtype
    arithmetic is several times slower): ``g a[e] + b[e]`` for a half-precision weight
    (``tables``: ``(a, b)``), ``(bend[e] w + base[e]) g + shared[e]`` on a grid
    (``(base, bend, shared)``).  # (n,) in the weight's dtype"""
    out = torch.empty_like(flat)
    if _compiled(flat, grid, grad):
        native.spread(flat, grad, out, tables, *_placing(grid))
        return out
    if grid is None:
        direct, shared = tables

        def spread(a: int, b: int) -> None:
            codes = value_codes(flat[a:b], grid, _codes(b - a, flat.device))
            first, second = (_buffer(name, torch.float32, b - a, flat.device) for name in ("first", "second"))
            looked = torch.index_select(direct, 0, codes, out=first).mul_(_upstream(grad, a, b))
            out[a:b] = looked.add_(torch.index_select(shared, 0, codes, out=second))
    else:
        base, bend, shared = tables

        def spread(a: int, b: int) -> None:
            codes, part = value_codes(flat[a:b], grid, _codes(b - a, flat.device)), out[a:b]
            looked = _buffer("first", torch.float32, b - a, flat.device)
            torch.index_select(bend, 0, codes, out=part).mul_(flat[a:b])
            part.add_(torch.index_select(base, 0, codes, out=looked)).mul_(grad[a:b])
            part.add_(torch.index_select(shared, 0, codes, out=looked))

    _each_pass(flat.numel(), spread, flat.device)
    return out


def _upstream(grad: Tensor, a: int, b: int) -> Tensor:
    """A pass's gradient in float32 (a half-precision one converted into a buffer)."""
    part = grad[a:b]
    return part if part.dtype == torch.float32 else _buffer("grad", torch.float32, b - a, part.device).copy_(part)


class _TableCluster(torch.autograd.Function):
    """``table_cluster`` with gradient: saves the weight itself (no copy), the table of
    entries present and their counts, the first and last codebooks and the grid; backward
    recomputes the rest."""

    @staticmethod
    def forward(ctx, values, codebook, counts, grid, tau, max_iter, epsilon, sized):
        soft, books, present, weights = _run(values, codebook, counts, grid, tau, max_iter, epsilon, sized)
        ctx.save_for_backward(values, present, weights, books[0], books[-1])
        ctx.tau, ctx.iterations, ctx.grid = tau, len(books) - 1, grid
        final = books[-1][:, None]
        ctx.mark_non_differentiable(final)
        return soft, final, len(books) - 1

    @staticmethod
    def backward(ctx, grad_soft, _grad_codebook, _grad_iterations):
        values, present, weights, first, last = ctx.saved_tensors
        tau, grid = ctx.tau, ctx.grid
        size = _entries(grid)
        # small work on one thread, by the rule DKMParametrization.forward follows
        with torch.autocast(values.device.type, enabled=False), threads_for(values.numel()):
            grad, flat = grad_soft.reshape(-1), values.reshape(-1)
            per_value = _sums_by_value(flat, grad, grid)  # G_v
            points = _entry_values(present, values.dtype, grid)
            orders = 2 if grid is None else 3
            if ctx.iterations == 1:  # the usual step: in closed form, on one attention
                shared, slope, *bend = _one_iteration_backward(points, weights, per_value[present], first, last,
                                                               tau, orders)
            else:
                with torch.enable_grad():
                    live = points.detach().requires_grad_()
                    books = [first]
                    for _ in range(ctx.iterations):
                        books.append(_update(live, weights, books[-1], tau)[0])
                    (through_books,) = _moments(points, books[-2], books[-1], tau, 1)  # u held in the last attention
                    (moved,) = torch.autograd.grad(through_books @ per_value[present], live)
                _, slope, *bend = _moments(points, books[-2].detach(), books[-1].detach(), tau, orders)
                shared = moved / weights
            shared = _spread(shared, present, size)
            if grid is None:  # g_i a_v + b_v
                tables = (_spread(slope, present, size), shared)
            else:  # the slope at w itself, to first order: s'(u) + (w - u) s''(u), times g_i, plus b_v
                tables = (_spread(slope - points * bend[0], present, size), _spread(bend[0], present, size), shared)
            out = _gradient(flat, grad, grid, tables)
        return out.view_as(values), None, None, None, None, None, None, None
