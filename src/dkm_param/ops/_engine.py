"""The engine behind ``soft_cluster`` and ``settle``, chunked and windowed, with an analytic backward.

``soft.py`` holds the public functions; everything here is internal.
"""

from __future__ import annotations

import math
import threading
from typing import NamedTuple

import torch
from torch import Tensor

from .threads import threads_for


class OrderCache:
    """The order in which ``soft_cluster`` grouped one weight's values, kept for its next call.

    Windows need the values grouped by value, and sorting them costs about as
    much as a pass of the attention. A weight moves little from one training
    step to the next, so the last order still groups it well; windows are
    computed from the values as they are, so an old order changes the speed,
    never the result. The values are sorted anew when the attention an old
    order leads to has grown by more than ``slack`` over what it was when sorted.
    The order is kept as int32 (4 bytes a weight) where the weight allows.
    """

    def __init__(self, slack: float = 0.05):
        self.slack = slack
        self.order: Tensor | None = None
        self.size = 0  # attention elements of the first iteration when the order was fresh
        self.stale = True

    def take(self, n: int, device: torch.device) -> Tensor | None:
        """The kept order (int32 where the weight allows) if it fits ``n`` values on ``device``
        and is not stale; the caller shares it, never changes it."""
        order = self.order
        if self.stale or order is None or order.numel() != n or order.device != device:
            return None
        return order

    def update(self, order: Tensor, size: int, fresh: bool) -> None:
        """Keeps a fresh ``order`` and its attention ``size``; marks an old one stale once it costs too much."""
        if fresh:
            self.order = order.int() if order.numel() < 2**31 else order
            self.size, self.stale = size, False
        elif size > (1.0 + self.slack) * self.size:
            self.stale = True


def _squarem(points: Tensor, counts: Tensor, codebook: Tensor, tau: float, max_iter: int, epsilon: float):
    """``settle``'s accelerated iterations on weighted points: (centroids, iterations).

    One value is read back a cycle, the first step's shift that decides whether to stop;
    the step length, its bound and the choice of the extrapolated point stay on the
    points' device (on a GPU each read waits for it).
    """
    centroids, iterations = codebook, 0
    bound = torch.ones((), dtype=torch.float64, device=codebook.device)
    while iterations < max_iter:
        first, _ = _em_step(points, counts, centroids, tau)
        iterations += 1
        if not float((first - centroids).abs().max()) > epsilon or iterations == max_iter:
            return first, iterations  # settled (NaN stops too: the caller checks)
        second, likelihood = _em_step(points, counts, first, tau)
        iterations += 1
        if iterations == max_iter:
            return second, iterations
        r = first - centroids
        v = second - first - r
        alpha = torch.minimum((r.norm() / v.norm().clamp_min(torch.finfo(v.dtype).tiny)).double().clamp_min(1.0), bound)
        # each term as a Python float step length would give it: a half-precision one is scaled in float32
        wide = torch.promote_types(r.dtype, torch.float32)
        ahead = centroids + ((2 * alpha) * r.to(wide)).to(r.dtype) + ((alpha * alpha) * v.to(wide)).to(r.dtype)
        third, reached = _em_step(points, counts, ahead, tau)
        iterations += 1
        accepted = reached >= likelihood
        centroids = torch.where(accepted, third, second)
        bound = torch.where(accepted, torch.where(alpha == bound, bound * 4, bound), (bound / 4).clamp_min(1.0))
    return centroids, iterations


# exp of a logit below this is under float32's smallest normal number: taken as 0
_LEAST_LOGIT = -87.0


def flushed_exp(logits: Tensor, inplace: bool) -> Tensor:
    """``exp(logits)`` with results below float32's normal range (under e^-87) set to 0.

    On the CPU an exp whose result is subnormal, or underflows, takes tens of
    times as long as any other, and a sharp attention is mostly such entries.
    Where the largest logit of a row is 0, they are worth under 1e-37 of it.
    """
    clamped = logits.clamp_(min=_LEAST_LOGIT) if inplace else logits.clamp(min=_LEAST_LOGIT)
    powers = clamped.exp_() if inplace else clamped.exp()
    return torch.nn.functional.threshold(powers, 2 * math.exp(_LEAST_LOGIT), 0.0, inplace=inplace)


def _em_step(points: Tensor, counts: Tensor, centroids: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """One centroid iteration on weighted points, and the log-likelihood
    ``sum_i counts_i logsumexp_j(-||p_i - c_j||^2 / tau)`` of the centroids it started from
    (a float64 0-d tensor, left on the points' device).

    One-dimensional points must be sorted: chunks of them attend to the windows
    of ``_window_plan`` (what they leave out is below the dtype's precision).
    """
    (p, d), k = points.shape, centroids.shape[0]
    budget = chunk_budget(points.device)
    # windows pay for their planning only when the dense attention takes several chunks
    if d == 1 and k >= _WINDOW_CLUSTERS and p * k > budget and on_host(points.device):
        plan = _window_plan(points[:, 0], centroids, tau, budget)
    else:
        plan = _dense_plan(p, k, max(1, budget // d))
    mass, weighted = centroids.new_zeros(k), torch.zeros_like(centroids)
    likelihood = torch.zeros((), dtype=torch.float64, device=points.device)  # read once, not per chunk
    for start, stop, cols, *_ in plan:
        chunk, count, near = points[start:stop], counts[start:stop], _pick(centroids, cols)
        # centroids by points: reductions over a short inner dimension (a few centroids) are slow
        if d == 1:
            logits = (near[:, 0, None] - chunk[None, :, 0]).square_().div_(-tau)  # (m, r)
        else:
            logits = (near[:, None, :] - chunk[None, :, :]).pow(2).sum(-1).div_(-tau)
        top = logits.amax(0)
        powers = flushed_exp(logits.sub_(top), inplace=True)
        total = powers.sum(0)
        likelihood += (top + total.log()).double() @ count.double()
        attn = powers.mul_((count / total)[None, :])
        if cols is None:
            mass += attn.sum(1)
            weighted += attn @ chunk
        else:
            mass.index_add_(0, cols, attn.sum(1))
            weighted.index_add_(0, cols, attn @ chunk)
    moved = weighted / mass.clamp_min(torch.finfo(mass.dtype).tiny)[:, None]
    return torch.where(mass[:, None] > 0, moved, centroids), likelihood


def _summary(vectors: Tensor, points: int, seed: int, counts: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """At most ``points`` points that stand for ``vectors``, and their weights; sorted
    in one dimension.  # (p, d), (p,)

    counts: how many vectors each of ``vectors`` stands for (one dimension only).
    """
    n, d = vectors.shape
    if n <= points:
        if d > 1:
            return vectors, vectors.new_ones(n)
        values, order = vectors.sort(0)
        return values, (vectors.new_ones(n) if counts is None else counts[order[:, 0]])
    if d > 1:
        chosen = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:points]
        return vectors.index_select(0, chosen.to(vectors.device)), vectors.new_ones(points)
    values = vectors[:, 0].double()
    mass = torch.ones_like(values) if counts is None else counts.double()
    low, high = torch.aminmax(values)
    if not high > low:
        return vectors[:1], mass.sum().to(vectors.dtype)[None]
    bins = ((values - low) * (points / (high - low))).long().clamp_(0, points - 1)
    weights = values.new_zeros(points).index_add_(0, bins, mass)
    sums = values.new_zeros(points).index_add_(0, bins, values * mass)
    full = (weights > 0).nonzero()[:, 0]  # the bins holding points (one read back, not one per mask)
    held = weights.index_select(0, full)
    return (sums.index_select(0, full) / held).to(vectors.dtype)[:, None], held.to(vectors.dtype)


# ---------------------------------------------------------------------------
# The engine behind ``soft_cluster``.
#
# Rows are processed in chunks: a chunk's attention is an (m, r) block, m the
# clusters it attends to and r its rows, built, used and dropped within one
# step of a loop, so memory stays O(n d + chunk) whatever the iterations and k.
# Autograd keeps the vectors (and their order) and each iteration's (k, d)
# codebook and (k,) masses only; backward recomputes the attention chunk by
# chunk and applies the analytic gradient.
#
# Temporaries of a chunk come from a few blocks kept from call to call
# (``_block``), never from fresh multi-MiB allocations.
#
# One dimension: the rows are grouped by value once, so a chunk spans a narrow
# range of values and attends only to the window of sorted centroids that can hold
# attention above the dtype's precision (the others get exactly zero from
# it). With k up to 256 centroids on one axis, tau is tiny next to w^2, and
# expanded forms such as |w|^2 - 2 w c + |c|^2 would lose most of float32's
# digits; around a chunk's middle value o they lose only what the chunk's own
# span costs. So a chunk spanning a few sqrt(tau) (``_NARROW``; most of a
# layer) writes its distances and sums as small matmuls of w - o, and a wider
# one (the tails) writes every term around the exact differences w - c.
# More dimensions: the rows are centred on their mean, and the distances and
# backward's sums are small matmuls (-||w - c||^2 = 2 w.c - ||c||^2 - ||w||^2,
# the last term a per-row constant that the softmax removes): there tau grows
# like k^(-2/d) of the spread, so their cancellation costs about k^(2/d) ulps
# of the exponent, of the order of the reference's own rounding (measured at d = 2, k = 256).
# ---------------------------------------------------------------------------

# Elements of one chunk's attention block: small enough to stay in cache, large
# enough to amortise the per-operation overhead.
CHUNK_ELEMENTS = 1 << 19
# On a GPU (256 MiB in float32): each operation costs microseconds of launch from the host
# whatever its size, so a layer is best done in few chunks, attending to every cluster
# (windows are planned on the host, which the GPU would wait for).
DEVICE_CHUNK_ELEMENTS = 1 << 26
# Two passes that need the same attention (the last iteration and the soft
# output; the first two passes of backward) share it while it has at most this
# many elements (128 MiB in float32); beyond, the second pass recomputes it.
# Sharing saves a fifth of a warm-started step, for about 4 bytes per weight
# and attended centroid held within the pass.
CACHE_ELEMENTS = 1 << 25
# Rows grouped by value are first cut into about this many blocks (of at least
# _MIN_BLOCK rows, as planning costs Python time per block), then merged into chunks.
_PLAN_BLOCKS = 512
_MIN_BLOCK = 1024
# One-dimensional rows are grouped into this many buckets of equal width.
_BUCKETS = 1 << 15
# Windows need at least this many clusters to pay for grouping the rows.
_WINDOW_CLUSTERS = 8
# The fixed cost of one more chunk (Python and per-operation overhead), in attention elements.
_CHUNK_OVERHEAD = 1 << 14
# Attention left out of a window is below eps / (n e^_MARGIN) of its row's largest.
_MARGIN = 8.0
# A 1-D chunk whose values span at most 2 sqrt(_NARROW tau) is written around its middle
# o as matmuls of w - o: the terms of the expansion then exceed the distances that matter
# by at most about 3 _NARROW / ln 2 times, so it costs a few dozen ulps of the exponent.
_NARROW = 8.0
# A cluster whose windowed mass is below this attends to every row, so that the
# mass left out of windows (below eps e^-_MARGIN in all) stays negligible next to its own.
_LIGHT_MASS = 1.0
_LOG2_E = 1.0 / math.log(2.0)


def on_host(device: torch.device) -> bool:
    """Whether work on ``device`` is sized for the CPU (small chunks and passes that stay in
    cache, windows) rather than for a GPU (few large ones: ``DEVICE_CHUNK_ELEMENTS``)."""
    return device.type == "cpu"


def chunk_budget(device: torch.device) -> int:
    """The default elements of one chunk's attention block on ``device``."""
    return CHUNK_ELEMENTS if on_host(device) else DEVICE_CHUNK_ELEMENTS


class _Run(NamedTuple):
    """What the forward iterations leave: the soft vectors, and what backward needs.

    codebooks: [C_0 .. C_T], each (k, d); masses: [s_1 .. s_T], each (k,);
    plans: each iteration's chunks ``(start, stop, cols, far)``: rows
    [start, stop) of the processing order, ``cols`` the clusters they attend
    to (None: all), ``far`` whether a row may be so far from every centroid
    that its attention must be shifted by its nearest distance not to underflow.
    order: the processing order of the vectors (None: as given).
    rows: in one dimension with an order, the values in that order (1, n),
    which backward reads again rather than gathering them a second time.
    """

    soft: Tensor | None
    codebooks: list
    masses: list
    plans: list
    order: Tensor | None
    rows: Tensor | None = None


class _Chunk(NamedTuple):
    """Rows [start, stop) of the processing order and how they attend.

    cols: the clusters they attend to (None: all); far: whether a row may be so
    far from every centroid that its attention must be shifted by its nearest
    distance not to underflow; centre: in one dimension, the middle of the rows'
    values when they span at most ``2 sqrt(_NARROW tau)`` (None: wider), around
    which distances and gradients are written as matmuls of ``w - centre``.
    """

    start: int
    stop: int
    cols: Tensor | None
    far: bool
    centre: float | None = None


def _cutoff(dtype: torch.dtype, n: int) -> tuple[float, float]:
    """``(cut, safe)``: attention below ``exp(-cut)`` of its row's largest is negligible;
    a row whose nearest squared distance is below ``safe * tau`` needs no shift."""
    info = torch.finfo(dtype)
    cut = math.log(max(n, 1)) - math.log(info.eps) + _MARGIN
    safe = max(0.0, -math.log(info.tiny) - cut - _MARGIN)
    return cut, safe


def _value_order(values: Tensor) -> Tensor:
    """An order of a 1-D float tensor that sorts it up to ``(max - min) / 2**15``.  # (n,) int64

    A stable sort of 16-bit bucket numbers: chunks only need rows grouped by
    value, and a radix sort of 16-bit keys takes a third of a float sort's time.
    """
    low, high = torch.aminmax(values)
    width = float(high - low)
    if not math.isfinite(width):
        return torch.argsort(values, stable=True)
    # dividing first keeps the scale finite when the spread is subnormal
    position = (values - low).div_(width) if width > 0 else torch.zeros_like(values)
    return torch.argsort(position.mul_(_BUCKETS - 1).to(torch.int16), stable=True)


def _rows(vectors: Tensor, order: Tensor | None, centre: Tensor | None) -> Tensor:
    """The vectors as the rows chunks read.  # (1, n) or (d + 1, n)

    One dimension: the values, in ``order`` if given. More: the coordinates
    less ``centre`` and a row of ones, which the matmuls of backward read.
    """
    if centre is None:
        values = vectors[:, 0]
        return (values if order is None else values.index_select(0, order))[None]
    local = (vectors - centre).T  # (d, n)
    return torch.cat([local, local.new_ones(1, local.shape[1])])


def _unrows(rows: Tensor, order: Tensor | None) -> Tensor:
    """Coordinate rows in processing order back to vectors in the input order.  # (n, d)"""
    if order is None:
        return rows.T.contiguous()
    return torch.empty_like(rows[0]).index_copy_(0, order.long(), rows[0])[:, None]  # (faster than scatter_)


def _dense_plan(n: int, k: int, budget: int) -> list:
    """Chunks of rows that attend to every cluster."""
    rows = max(1, budget // k)
    return [_Chunk(start, min(start + rows, n), None, True) for start in range(0, n, rows)]


def _blocks(values: Tensor, k: int, budget: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Rows grouped by value cut into blocks: starts, stops, smallest and largest value
    of each (float64, so that rounding cannot push a centroid that matters out of a window)."""
    n = values.shape[0]
    block = max(1, min(max(-(-n // _PLAN_BLOCKS), _MIN_BLOCK), budget // k))
    starts = torch.arange(0, n, block, device=values.device)
    full = n // block * block
    low, high = torch.aminmax(values[:full].view(-1, block), dim=1)
    if full < n:
        tail_low, tail_high = torch.aminmax(values[full:])
        low, high = torch.cat([low, tail_low[None]]), torch.cat([high, tail_high[None]])
    return starts, (starts + block).clamp_max(n), low.double(), high.double()


def _window_plan(values: Tensor, codebook: Tensor, tau: float, budget: int, blocks=None) -> list:
    """Chunks of 1-D rows grouped by value, each attending to the centroids that can matter to it.

    A centroid is left out of a chunk only if, for every row of the chunk, its
    squared distance exceeds the row's nearest one by more than ``cut * tau``.
    blocks: ``_blocks(values, k, budget)``, which iterations can share.
    """
    n, k = values.shape[0], codebook.shape[0]
    cut, safe = _cutoff(values.dtype, n)
    starts, stops, low, high = blocks if blocks is not None else _blocks(values, k, budget)
    centres, order = torch.sort(codebook[:, 0].double())
    # over [low, high] the nearest-centroid distance peaks at an end or at a midpoint
    worst = (torch.stack([low, high])[..., None] - centres).pow(2).amin(-1).amax(0)  # (blocks,)
    mids = (centres[1:] + centres[:-1]) / 2
    if k > 1:
        half_gap = ((centres[1:] - centres[:-1]) / 2).pow(2)
        inside = (mids > low[:, None]) & (mids < high[:, None])  # (blocks, k - 1)
        worst = torch.maximum(worst, torch.where(inside, half_gap, torch.zeros_like(half_gap)).amax(1))
    radius = (worst + cut * tau).sqrt() * (1 + 1e-6)
    # the nearest centroids of the ends always belong, whatever the rounding
    first = torch.minimum(torch.searchsorted(centres, low - radius), torch.searchsorted(mids, low))
    last = torch.maximum(torch.searchsorted(centres, high + radius, right=True), torch.searchsorted(mids, high) + 1)
    table = torch.stack([starts, stops, first, last, (worst > safe * tau).long()]).T.tolist()
    spans = torch.stack([low, high]).T.tolist()
    # merge neighbouring blocks while a wider window costs less than another chunk would
    merged = [table[0] + spans[0]]
    for (start, stop, lo, hi, far), (below, above) in zip(table[1:], spans[1:]):
        m_start, m_stop, m_lo, m_hi, m_far, m_below, m_above = merged[-1]
        lo_, hi_ = min(m_lo, lo), max(m_hi, hi)
        together = (stop - m_start) * (hi_ - lo_)
        apart = (m_stop - m_start) * (m_hi - m_lo) + (stop - start) * (hi - lo) + _CHUNK_OVERHEAD
        if together <= budget and together <= apart:
            merged[-1] = [m_start, stop, lo_, hi_, m_far or far, min(m_below, below), max(m_above, above)]
        else:
            merged.append([start, stop, lo, hi, far, below, above])
    narrow = 4.0 * _NARROW * tau  # the largest squared span of a narrow chunk
    return [
        _Chunk(start, stop, order[lo:hi], bool(far), (below + above) / 2 if (above - below) ** 2 <= narrow else None)
        for start, stop, lo, hi, far, below, above in merged
    ]


def _with_clusters(plan: list, clusters: Tensor) -> list:
    """The plan with ``clusters`` added to every chunk's window.

    Their attention can be far below the window's cut and is all their mass,
    so the rows are shifted as softmax does, to reach as far before underflow.
    """
    return [
        chunk._replace(cols=chunk.cols if chunk.cols is None else torch.unique(torch.cat([chunk.cols, clusters])),
                       far=True)
        for chunk in plan
    ]


def _plan_size(plan: list, k: int) -> int:
    """Elements of the attention over a whole plan."""
    return sum((chunk.stop - chunk.start) * (k if chunk.cols is None else chunk.cols.numel()) for chunk in plan)


def _pick(table: Tensor, cols: Tensor | None) -> Tensor:
    return table if cols is None else table.index_select(0, cols)


_LOCAL = threading.local()


def _block(slot: int, shape: tuple[int, int], like: Tensor) -> Tensor:
    """An uninitialised ``shape`` block for a temporary of one chunk, taken from
    buffers kept per thread, device and dtype from one call to the next.

    A fresh block of a few MiB costs the kernel a page fault per 4 KiB on each
    allocation whenever the allocator has handed the pages back, which in a
    training step it often does; kept, they stay mapped and warm in cache. Each
    slot is as large as the largest block it served, at most ``CHUNK_ELEMENTS``
    (2 MiB in float32), and there are four.
    """
    numel = shape[0] * shape[1]
    if numel > CHUNK_ELEMENTS:  # a chunk larger than the default's: not worth keeping
        return like.new_empty(shape)
    pool = getattr(_LOCAL, "pool", None)
    if pool is None:
        pool = _LOCAL.pool = {}
    key = (slot, like.device, like.dtype)
    buffer = pool.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = pool[key] = like.new_empty(numel)
    return buffer[:numel].view(shape)


def _attention(
    chunk: Tensor, centroids: Tensor, tau: float, far: bool, centre: float | None = None, scratch: bool = False
) -> tuple[Tensor, Tensor]:
    """Unnormalised attention ``exp(-||w - c||^2 / tau)`` of a chunk, up to a
    factor per row, and its inverse row sums.  # (m, r), (r,)

    chunk: rows from ``_rows``; centroids: (m, d), centred like the rows;
    centre: a narrow 1-D chunk's ``_Chunk.centre``; scratch: build the block in
    ``_block`` 0 (for an attention used at once, not kept).
    Rows are shifted by their nearest distance, as softmax does, when ``far``
    (always in more dimensions); otherwise the nearest centroid's term cannot
    underflow and the shift would cost a pass. exp2 is twice as fast as exp on
    CPU, so log2(e) is folded into the scale.
    """
    scale = _LOG2_E / tau
    (m, d), r = centroids.shape, chunk.shape[1]
    out = _block(0, (m, r), chunk) if scratch else None
    if d == 1 and centre is None:
        # the exact differences: a wide chunk, where an expanded square would lose digits
        diff = torch.sub(chunk[0][None], centroids, out=out)  # (m, r)
        if far:
            dist = diff.mul_(diff)
            attn = torch.sub(dist.amin(0, keepdim=True), dist, out=dist).mul_(scale)
        else:
            attn = torch.addcmul(diff.new_zeros(()), diff, diff, value=-scale, out=diff)  # one pass
    else:
        # -||w - c||^2 less its per-row term ||w||^2, which softmax removes: one matmul of
        # [2 c, -||c||^2] with the rows (in one dimension, w - centre: the chunk is
        # narrow, so the expansion costs few digits; in more, the centred rows)
        if d == 1:
            rows, centroids = (chunk[0] - centre)[None], centroids - centre
        else:
            rows = chunk[:d]
        bias = centroids.pow(2).sum(1, keepdim=True).mul_(-scale)
        attn = torch.addmm(bias, centroids, rows, alpha=2.0 * scale, out=out)  # (m, r)
        if far or d > 1:
            attn = torch.sub(attn, attn.amax(0, keepdim=True), out=attn)
    attn = attn.exp2_()
    return attn, attn.sum(0).reciprocal_()


def _centroid_stats(rows: Tensor, centroids: Tensor, tau: float, plan: list, keep: bool):
    """``(sum_i A_ij (k,), sum_i A_ij w_i (k, d), [(attn, inv) per chunk] if keep)``."""
    k, d = centroids.shape
    stats = rows.new_zeros(k, d + 1)  # the weighted sum of each coordinate, then the mass
    kept = [] if keep else None
    for start, stop, cols, far, centre in plan:
        chunk = rows[:, start:stop]
        attn, inv = _attention(chunk, _pick(centroids, cols), tau, far, centre, scratch=not keep)
        if d == 1:
            part = torch.stack([attn @ (chunk[0] * inv), attn @ inv], 1)  # (m, 2)
        else:  # more rows than clusters: one matmul with the centred coordinates and the ones
            part = attn @ (chunk[: d + 1] * inv).T  # (m, d + 1)
        if cols is None:
            stats += part
        else:
            stats.index_add_(0, cols, part)
        if keep:
            kept.append((attn, inv))
    return stats[:, d], stats[:, :d], kept


def _cluster(
    vectors: Tensor, codebook: Tensor, tau: float, max_iter: int, epsilon: float, window: bool, budget: int,
    cache: OrderCache | None = None,
) -> _Run:
    """The forward iterations, as ``soft_cluster_reference`` runs them."""
    (n, d), k = vectors.shape, codebook.shape[0]
    order, fresh = None, False
    if window and d == 1 and k >= _WINDOW_CLUSTERS:
        order = cache.take(n, vectors.device) if cache is not None else None
        if order is None:
            # int32 where it fits: the order is saved for backward and kept by the cache, one tensor
            order, fresh = _value_order(vectors[:, 0]), True
            order = order.int() if n < 2**31 else order
    centre = vectors.detach().mean(0) if d > 1 else None
    rows = _rows(vectors, order, centre)
    tiny = torch.finfo(vectors.dtype).tiny
    codebooks, masses, plans = [codebook], [], []
    light = None  # clusters attending to every row, kept from one iteration to the next
    blocks = None if order is None else _blocks(rows[0], k, budget)
    centroids = codebook
    kept, shift = None, None
    for iteration in range(1, max_iter + 1):
        kept = None  # the previous iteration's attention, before this one's is built
        # keep this iteration's attention for the soft output if it may well be the last:
        # the first (a warm start often stops there), the last allowed, or near convergence
        likely_last = iteration in (1, max_iter) or shift <= 2 * epsilon
        local = centroids if centre is None else centroids - centre
        if order is None:
            plan = base = _dense_plan(n, k, budget)
        else:
            base = _window_plan(rows[0], centroids, tau, budget, blocks)
            plan = base if light is None else _with_clusters(base, light)
            if iteration == 1 and cache is not None:
                cache.update(order, _plan_size(base, k), fresh)
        keep = lambda plan: likely_last and _plan_size(plan, k) <= CACHE_ELEMENTS  # noqa: E731
        mass, weighted, kept = _centroid_stats(rows, local, tau, plan, keep(plan))
        if order is not None:
            now_light = (mass < _LIGHT_MASS).nonzero()[:, 0]
            if now_light.numel() and (light is None or not torch.isin(now_light, light).all()):
                light = now_light if light is None else torch.unique(torch.cat([light, now_light]))
                plan, kept = _with_clusters(base, light), None
                mass, weighted, kept = _centroid_stats(rows, local, tau, plan, keep(plan))
        moved = weighted / mass.clamp_min(tiny)[:, None]
        if centre is not None:
            moved = moved + centre
        updated = torch.where(mass[:, None] > 0, moved, centroids)
        shift = (updated - centroids).abs().max().item()
        codebooks.append(updated)
        masses.append(mass)
        plans.append(plan)
        attend, centroids = local, updated
        if shift <= epsilon:
            break
    final = centroids if centre is None else centroids - centre
    soft = rows.new_empty(d, n)  # A_T C_T, A_T from the codebook before the last update
    for index, (start, stop, cols, far, middle) in enumerate(plan):
        if kept is not None:
            (attn, inv), kept[index] = kept[index], None
        else:
            attn, inv = _attention(rows[:, start:stop], _pick(attend, cols), tau, far, middle, scratch=True)
        torch.mul(_pick(final, cols).T @ attn, inv, out=soft[:, start:stop])
    if centre is not None:
        soft += centre[:, None]
    return _Run(_unrows(soft, order), codebooks, masses, plans, order, rows if order is not None else None)


def _cluster_backward(vectors: Tensor | None, grad_soft: Tensor, run: _Run, tau: float) -> Tensor:
    """Gradient with respect to the vectors of ``sum(grad_soft * soft)``.  # (n, d)

    vectors: None when ``run.rows`` holds them.

    Walks the iterations in reverse. For the output ``Y = A_T C_T``:
    ``gA = gY C_T^T`` and ``gC_T = A_T^T gY``. For an update ``C' = A^T W / s``:
    ``gW += A (gC' / s)`` and ``gA_ij = (w_i - C'_j) . gC'_j / s_j``. Through the
    softmax, with ``D = -||w - c||^2``: ``gD = A (gA - rowsum(A gA)) / tau``,
    ``gW_i -= 2 sum_j gD_ij (w_i - c_j)`` and ``gC_j += 2 sum_i gD_ij (w_i - c_j)``.
    gA is written without per-row constants (such as gY_i . w_i, which the
    softmax removes anyway), so they cannot leave rounding behind.
    """
    codebooks, masses, plans, order = run.codebooks, run.masses, run.plans, run.order
    k = codebooks[0].shape[0]
    if run.rows is not None:  # one dimension, the values already in order
        rows, (n, d), centre = run.rows, (run.rows.shape[1], 1), None
    else:
        (n, d) = vectors.shape
        centre = vectors.detach().mean(0) if d > 1 else None
        rows = _rows(vectors, order, centre)
    if centre is None:
        grads = _rows(grad_soft, order, None)  # (1, n)
    else:
        grads = grad_soft.T  # (d, n)
        rows = torch.cat([rows, grads])  # the last iteration's gA matmul reads gY too
        grads = rows[d + 1 :]
    local = codebooks if centre is None else [c - centre for c in codebooks]
    tiny = torch.finfo(rows.dtype).tiny
    iterations = len(masses)

    grad_c = torch.zeros_like(local[-1])  # gC_T = A_T^T gY
    kept = [] if _plan_size(plans[-1], k) <= CACHE_ELEMENTS else None
    for start, stop, cols, far, middle in plans[-1]:
        attn, inv = _attention(rows[:, start:stop], _pick(local[-2], cols), tau, far, middle, scratch=kept is None)
        part = torch.stack([attn @ (grads[j, start:stop] * inv) for j in range(d)], 1)  # (m, d)
        if cols is None:
            grad_c += part
        else:
            grad_c.index_add_(0, cols, part)
        if kept is not None:
            kept.append((attn, inv))

    grad_rows = rows.new_empty(d, n)  # each plan covers every row once: the last iteration writes it all
    scale = 2.0 / tau
    reach = 2.0 * sum(_largest(rows[:d], torch.stack(local))) if n else 0.0
    for t in range(iterations, 0, -1):
        mass = masses[t - 1]
        # A cluster with almost no mass moves by A^T W / s with A of the order of s:
        # its gradient path is of that order too, but gC' / s alone can overflow
        # the dtype before the attention cancels it; such clusters pass no gradient.
        live = _safe_to_divide(grad_c, mass, reach * scale * n)
        grad_new = torch.where(live[:, None], grad_c / mass.clamp_min(tiny)[:, None], torch.zeros_like(grad_c))
        # gA_ij = (w_i - a_j) . g_j, a_j = C'_j where the mass passed clamp_min(tiny), else 0
        anchor = torch.where((mass >= tiny)[:, None], codebooks[t], torch.zeros_like(grad_c))
        if centre is not None:
            anchor = anchor - centre
        table = _gradient_table(local[t - 1], grad_new, anchor, local[-1], last=t == iterations)
        with_bias = t < iterations or bool(((mass > 0) & (mass < tiny)).any())
        grad_c = torch.where(mass[:, None] > 0, torch.zeros_like(grad_c), grad_c) if t > 1 else None
        chunk_grad = _chunk_grad if centre is None else _chunk_grad_nd
        for index, (start, stop, cols, far, middle) in enumerate(plans[t - 1]):
            cached = kept[index] if t == iterations and kept is not None else None
            if cached is not None:
                kept[index] = None
            grad_w, part = chunk_grad(
                rows[:, start:stop], grads[:, start:stop], _pick(table, cols), tau, far, middle, cached,
                last=t == iterations, with_bias=with_bias, need_prev=grad_c is not None,
            )
            if t == iterations:
                grad_rows[:, start:stop] = grad_w
            else:
                grad_rows[:, start:stop] += grad_w
            if part is not None:
                if cols is None:
                    grad_c += part
                else:
                    grad_c.index_add_(0, cols, part)
    return _unrows(grad_rows, order)


def _largest(*tensors: Tensor) -> list[float]:
    """Each tensor's largest magnitude, from one min-max pass (no tensor of magnitudes), all
    read back together (one wait on a GPU)."""
    ends = torch.stack([torch.stack(torch.aminmax(t)) for t in tensors]).tolist()
    return [max(-low, high) for low, high in ends]


def _safe_to_divide(grad_c: Tensor, mass: Tensor, growth: float) -> Tensor:
    """Clusters whose ``gC' / s``, grown by ``growth`` (distances, 1/tau, rows),
    stays well inside the dtype's range; the others are treated as massless."""
    limit = torch.finfo(grad_c.dtype).max / 1024.0
    need = grad_c.detach().double().abs().amax(1) * growth
    return (mass > 0) & (mass.double() * limit > need)


def _gradient_table(attend: Tensor, grad_new: Tensor, anchor: Tensor, final: Tensor, last: bool) -> Tensor:
    """Per-cluster values one backward iteration needs.  # (k, ...)

    attend: the codebook the attention used; grad_new: ``gC' / s``; anchor:
    ``a`` above; final: ``C_T``, whose terms only the last iteration has.
    One dimension, ``[c, g, bias (, C_T - c)]``: gA is written around ``w - c``,
    ``(w - c) g - (a - c) g``, or in the last iteration ``(w - C_T)(g - gY) + (C_T - a) g``.
    More, ``[c, 1, g, -a.g (, C_T)]``: gA is the matmul ``[g, -a.g, C_T] @ [w; 1; gY]``
    and ``[c, 1]`` weighs the moments of backward's sums.
    """
    if attend.shape[1] == 1:
        if last:
            return torch.cat([attend, grad_new, (final - anchor) * grad_new, final - attend], 1)
        return torch.cat([attend, grad_new, (attend - anchor) * grad_new], 1)
    ones = torch.ones_like(attend[:, :1])
    bias = -(anchor * grad_new).sum(1, keepdim=True)
    return torch.cat([attend, ones, grad_new, bias] + ([final] if last else []), 1)


def _chunk_grad(rows, grads, table, tau, far, centre, cached, last, with_bias, need_prev):
    """One chunk's share of one backward iteration, one dimension.

    Returns ``(gW of the chunk's rows (1, r), gC of the attended clusters (m, 1) or None)``.
    """
    (m, r), scale = (table.shape[0], rows.shape[1]), 2.0 / tau
    centroids, g = table[:, :1], table[:, 1:2]
    attn, inv = cached if cached is not None else _attention(rows, centroids, tau, far, centre, scratch=True)
    if centre is None:  # a wide chunk: every term around the exact differences w - c
        diff = torch.sub(rows[0][None], centroids, out=_block(1, (m, r), rows))  # (m, r)
        if last:
            gap = torch.sub(diff, table[:, 3:4], out=_block(2, (m, r), rows))  # w - C_T
            grad_a = torch.mul(gap, g, out=_block(3, (m, r), rows)).addcmul_(gap, grads[:1], value=-1.0)
        else:
            grad_a = torch.mul(diff, g, out=_block(3, (m, r), rows))
        if with_bias:
            grad_a.add_(table[:, 2:3])
        prod = grad_a.mul_(attn)  # (m, r)
        prod.addcmul_(attn, (prod.sum(0) * inv)[None], value=-1.0)  # A (gA - rowsum(A gA)) / inv
        moment = diff.mul_(prod)  # the exact differences, not 2 gD C: see the engine's notes
        grad_w = inv * (g[:, 0] @ attn - scale * moment.sum(0))
        return grad_w[None], (scale * (moment @ inv))[:, None] if need_prev else None
    # a narrow chunk: with x = w - centre and c' = c - centre, gA less its per-row terms is
    # x g + b (and, in the last iteration, + gY (C_T - centre)), one matmul
    x, shifted = rows[0] - centre, centroids - centre  # (r,), (m, 1)
    if last:
        final = table[:, 3:4] + shifted  # C_T - centre
        coef, lhs, bias = torch.cat([g, final], 1), torch.stack([x, grads[0]]), -final * g
    else:
        coef, lhs, bias = g, x[None], -shifted * g
    if with_bias:
        bias = bias + table[:, 2:3]
    prod = torch.addmm(bias, coef, lhs, out=_block(1, (m, r), rows)).mul_(attn)  # gA A  (m, r)
    prod.addcmul_(attn, (prod.sum(0) * inv)[None], value=-1.0)  # A (gA - rowsum(A gA)) / inv
    # sum_j prod_ij (c_j - w_i), both parts kept: the rows of prod sum to zero only up to rounding
    moments = torch.cat([shifted, torch.ones_like(shifted)], 1).T @ prod  # (2, r)
    grad_w = inv * (g[:, 0] @ attn + scale * (moments[0] - x * moments[1]))
    if not need_prev:
        return grad_w[None], None
    sums = torch.stack([prod @ (x * inv), prod @ inv], 1)  # (m, 2): sum_i prod_ij x_i / s_i, sum_i prod_ij / s_i
    return grad_w[None], sums[:, :1].addcmul_(shifted, sums[:, 1:], value=-1.0).mul_(scale)


def _chunk_grad_nd(rows, grads, table, tau, far, centre, cached, last, with_bias, need_prev):
    """One chunk's share of one backward iteration, more dimensions (centred rows).

    Returns ``(gW of the chunk's rows (d, r), gC of the attended clusters (m, d) or None)``.
    """
    (m, r), d = (table.shape[0], rows.shape[1]), grads.shape[0]
    centroids, g, coef = table[:, :d], table[:, d + 1 : 2 * d + 1], table[:, d + 1 :]
    attn, inv = cached if cached is not None else _attention(rows, centroids, tau, far, scratch=True)
    prod = torch.mm(coef, rows[: coef.shape[1]], out=_block(1, (m, r), rows)).mul_(attn)  # gA A  (m, r)
    prod.addcmul_(attn, (prod.sum(0) * inv)[None], value=-1.0)  # A (gA - rowsum(A gA)) / inv
    scale = 2.0 / tau
    # sum_j prod_ij (c_j - w_i), both parts kept: the rows of prod sum to zero only up to rounding
    moments = table[:, : d + 1].T @ prod  # (d + 1, r): sum_j prod_ij c_j and sum_j prod_ij
    grad_w = inv * (g.T @ attn + scale * (moments[:d] - rows[:d] * moments[d]))
    if not need_prev:
        return grad_w, None
    sums = prod @ (rows[: d + 1] * inv).T  # (m, d + 1): sum_i prod_ij w_i / s_i, then sum_i prod_ij / s_i
    return grad_w, sums[:, :d].addcmul_(centroids, sums[:, d:], value=-1.0).mul_(scale)


class _SoftCluster(torch.autograd.Function):
    """``soft_cluster`` whose backward recomputes the attention: saves the vectors
    (usually a view of the caller's weight), in one dimension the order of their
    values (int32, shared with the order cache), and the (k, d) codebooks and
    masses, nothing of size n k."""

    @staticmethod
    def forward(ctx, vectors, codebook, tau, max_iter, epsilon, window, budget, cache):
        run = _cluster(vectors, codebook, tau, max_iter, epsilon, window, budget, cache)
        order = run.order if run.order is not None else vectors.new_empty(0, dtype=torch.long)
        # the vectors, not their values in order: the vectors are usually a view of the
        # caller's weight, which costs nothing to keep; backward gathers the values again
        ctx.save_for_backward(vectors, order, torch.stack(run.codebooks), torch.stack(run.masses))
        ctx.plans, ctx.tau, ctx.sorted = run.plans, tau, run.order is not None
        final = run.codebooks[-1]
        ctx.mark_non_differentiable(final)
        return run.soft, final, len(run.masses)

    @staticmethod
    def backward(ctx, grad_soft, _grad_codebook, _grad_iterations):
        # small work on one thread, by the rule DKMParametrization.forward follows
        with torch.autocast(grad_soft.device.type, enabled=False), threads_for(grad_soft.numel()):
            return _SoftCluster._backward(ctx, grad_soft)

    @staticmethod
    def _backward(ctx, grad_soft):
        vectors, order, codebooks, masses = ctx.saved_tensors
        if ctx.sorted:
            rows = _rows(vectors, order, None)
            vectors, run = None, _Run(None, list(codebooks), list(masses), ctx.plans, order, rows)
        else:
            run = _Run(None, list(codebooks), list(masses), ctx.plans, None)
        return (
            _cluster_backward(vectors, grad_soft.contiguous(), run, ctx.tau),
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )
