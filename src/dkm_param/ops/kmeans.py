"""Hard k-means on tensors: nearest-centroid assignment, seeding, Lloyd iterations."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

# Distances are computed over row chunks of at most this many (vector, centroid) pairs.
_PAIRS_PER_CHUNK = 1 << 22
# Seeding and the initial Lloyd refinement run on at most this many vectors.
_SEED_SAMPLE = 1 << 16
# 1-D k-means of more values than this clusters a histogram of _BINS bins.
_HISTOGRAM_ABOVE = 1 << 18
_BINS = 1 << 20
_HISTOGRAM_CHUNK = 1 << 22  # values binned at a time
# 1-D k-means runs the Lloyd steps of several inputs together, padded to at most this many values.
_BATCH_VALUES = 1 << 21


def nearest(vectors: Tensor, codebook: Tensor) -> Tensor:
    """Index of the nearest centroid for every vector.  # (n,) int32 in one dimension, else int64

    Memory stays O(n + k): 1-D uses a binary search over the sorted centroids
    (4-byte indices: a layer of millions of weights), vectors use chunked exact distances.
    """
    if codebook.shape[1] == 1:
        order = torch.argsort(codebook[:, 0], stable=True)
        ordered = codebook[order, 0]
        midpoints = (ordered[1:] + ordered[:-1]) / 2
        found = torch.searchsorted(midpoints, vectors[:, 0].contiguous(), right=False, out_int32=True)
        return order.int()[found]
    rows = max(1, _PAIRS_PER_CHUNK // codebook.shape[0])
    out = torch.empty(vectors.shape[0], dtype=torch.long, device=vectors.device)
    for start in range(0, vectors.shape[0], rows):
        chunk = vectors[start : start + rows]
        dist = torch.cdist(chunk, codebook, compute_mode="donot_use_mm_for_euclid_dist")
        out[start : start + rows] = dist.argmin(1)
    return out


def _lloyd_on_line(values: Tensor, codebook: Tensor, iterations: int) -> Tensor:
    """``lloyd`` in one dimension on the values sorted once: each cluster is a run of them, its
    count and sum two lookups in prefix sums, so an iteration is O(k log n).  # (k, 1)"""
    ordered = _ascending(values)
    x = values[ordered]
    sums = torch.cat([x.new_zeros(1, dtype=torch.float64), torch.cumsum(x.double(), 0)])
    ends = torch.tensor([0, x.numel()], device=x.device)
    for _ in range(iterations):
        order = codebook[:, 0].argsort()
        centroids = codebook[order, 0]
        # a value on a midpoint between two centroids goes to the lower one
        cuts = torch.searchsorted(x, (centroids[1:] + centroids[:-1]) / 2, right=True)
        bounds = torch.cat([ends[:1], cuts, ends[1:]])
        counts = (bounds[1:] - bounds[:-1]).to(torch.float64)
        means = ((sums[bounds[1:]] - sums[bounds[:-1]]) / counts.clamp_min(1)).to(codebook.dtype)
        moved = torch.where(counts > 0, means, centroids)
        updated = torch.empty_like(codebook).index_put_((order,), moved[:, None])
        if torch.equal(updated, codebook):
            break
        codebook = updated
    return codebook


def squared_distance_to_nearest(vectors: Tensor, codebook: Tensor) -> Tensor:
    """``min_j ||w_i - c_j||^2`` for every vector.  # (n,)"""
    return (vectors - codebook[nearest(vectors, codebook)]).pow(2).sum(1)


def kmeans_plusplus(vectors: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding (Arthur and Vassilvitskii): each new centroid drawn
    with probability proportional to its squared distance to the chosen ones.  # (k, d)"""
    n = vectors.shape[0]
    first = torch.randint(n, (1,), generator=generator, device="cpu").item()
    # every draw at once from the (CPU) generator: nothing is read back from the vectors' device,
    # where each read would wait for it
    draws = torch.rand(k - 1, generator=generator, dtype=torch.float64).to(vectors.device)
    centroids = [vectors[first]]
    closest = (vectors - vectors[first]).pow(2).sum(1)
    for draw in draws[:, None]:
        cumulative = torch.cumsum(closest.double(), 0)
        total = cumulative[-1]
        # an inverse-CDF draw (far cheaper than torch.multinomial on large n), or where every
        # vector already sits on a centroid (total 0), a uniform one: a centroid repeated
        pick = torch.where(total > 0, torch.searchsorted(cumulative, draw * total, right=True), (draw * n).long())
        chosen = vectors.index_select(0, pick.clamp_max(n - 1))  # (1, d)
        centroids.append(chosen[0])
        closest = torch.minimum(closest, (vectors - chosen).pow(2).sum(1))
    return torch.stack(centroids)


def lloyd(vectors: Tensor, codebook: Tensor, iterations: int) -> Tensor:
    """Plain Lloyd iterations; an empty cluster keeps its centroid.  # (k, d)"""
    if vectors.shape[1] == 1:
        return _lloyd_on_line(vectors[:, 0], codebook, iterations)
    k = codebook.shape[0]
    for _ in range(iterations):
        assign = nearest(vectors, codebook)
        counts = torch.bincount(assign, minlength=k).to(vectors.dtype)
        # (an int64 index: index_add_ takes a path tens of times slower for int32)
        sums = torch.zeros_like(codebook).index_add_(0, assign.long(), vectors)
        updated = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], codebook)
        if torch.equal(updated, codebook):
            break
        codebook = updated
    return codebook


def init_codebook(vectors: Tensor, k: int, method: str, seed: int, refine: int = 10) -> Tensor:
    """Seed a (k, d) codebook for ``vectors`` by ``method`` and refine it with Lloyd.

    method: ``kmeans++``, ``linear`` (evenly spaced between each coordinate's
    extremes) or ``quantile`` (each coordinate's quantiles, so dense regions
    get more centroids). Runs on a fixed-seed subsample of large inputs.
    """
    generator = torch.Generator().manual_seed(seed)
    sample = vectors
    if vectors.shape[0] > _SEED_SAMPLE:
        # drawn with replacement: a permutation of millions of rows costs more than the seeding
        pick = torch.randint(vectors.shape[0], (_SEED_SAMPLE,), generator=generator)
        sample = vectors[pick.to(vectors.device)]
    if method == "kmeans++":
        codebook = kmeans_plusplus(sample, k, generator)
    elif method == "linear":
        steps = torch.linspace(0, 1, k, dtype=sample.dtype, device=sample.device)[:, None]
        low, high = sample.min(0).values, sample.max(0).values
        codebook = low + steps * (high - low)
    elif method == "quantile":
        levels = (torch.arange(k, dtype=sample.dtype, device=sample.device) + 0.5) / k
        codebook = torch.quantile(sample, levels, dim=0)
    else:
        raise ValueError(f"unknown init {method!r}")
    return lloyd(sample, codebook, refine)


# -- post-training engines ---------------------------------------------------


class EmptyClusterError(ValueError):
    """k-means could not fill every cluster, even after repairs (callers name the layer)."""


def _ascending(values: Tensor) -> Tensor:
    """The order that sorts finite 1-D ``values`` (an argsort): float32 and float64 by an integer key of
    their bits that sorts the same (torch sorts integers several times faster than floats)."""
    ints = {torch.float32: torch.int32, torch.float64: torch.int64}.get(values.dtype)
    if ints is None:
        return torch.argsort(values)
    bits = values.contiguous().view(ints)
    # a negative float's bits, read as an integer, grow as it does: flip all but the sign to reverse them
    key = torch.where(bits < 0, bits ^ torch.iinfo(ints).max, bits)
    return torch.sort(key).indices


class _Sorted:
    """1-D values sorted once, with weighted prefix sums: any cluster's count,
    sum and squared error is then O(1), a Lloyd step O(k log n)."""

    def __init__(self, values: Tensor, weights: Tensor | None, presorted: bool = False):
        if presorted:
            self.x = values.double()
            w = torch.ones_like(self.x) if weights is None else weights.double()
        else:
            order = _ascending(values)
            self.x = values[order].double()  # (n,)
            w = torch.ones_like(self.x) if weights is None else weights[order].double()
        zero = self.x.new_zeros(1)
        self.s0 = torch.cat([zero, torch.cumsum(w, 0)])  # (n+1,)
        self.s1 = torch.cat([zero, torch.cumsum(w * self.x, 0)])
        self.s2 = torch.cat([zero, torch.cumsum(w * self.x * self.x, 0)])

    def distinct(self) -> int:
        return 1 + int((self.x[1:] != self.x[:-1]).sum())

    def cost(self, start: Tensor, stop: Tensor) -> Tensor:
        """Weighted squared error of values[start:stop] around their mean."""
        w = self.s0[stop] - self.s0[start]
        s = self.s1[stop] - self.s1[start]
        sse = self.s2[stop] - self.s2[start] - s * s / w.clamp_min(1e-300)
        return torch.where(w > 0, sse.clamp_min(0), torch.zeros_like(sse))


class _Rows:
    """Several ``_Sorted`` sequences padded to one length (values +inf, prefix sums held at their
    total), for Lloyd steps that serve every row at once: a step's few tensor operations, most of
    the cost of a small layer, are paid once for all of them. A row's results are those it gets alone.
    """

    def __init__(self, rows: list[_Sorted]):
        n = max(row.x.numel() for row in rows)
        self.lengths = [row.x.numel() for row in rows]

        def padded(t: Tensor, size: int, fill: Tensor | float) -> Tensor:
            if t.numel() == size:
                return t
            extra = t.new_full((size - t.numel(),), fill) if isinstance(fill, float) else fill.expand(size - t.numel())
            return torch.cat([t, extra])

        if len(rows) == 1:  # views, no copy
            self.x, self.s0, self.s1, self.s2 = (getattr(rows[0], name)[None] for name in ("x", "s0", "s1", "s2"))
            return
        self.x = torch.stack([padded(row.x, n, float("inf")) for row in rows])  # (B, n)
        self.s0, self.s1, self.s2 = (
            torch.stack([padded(getattr(row, name), n + 1, getattr(row, name)[-1:]) for row in rows])
            for name in ("s0", "s1", "s2")
        )  # (B, n+1)

    def bounds(self, centroids: Tensor) -> Tensor:
        """Start of each sorted centroid's run of values, plus n.  # (B, S, k+1) for (B, S, k)"""
        rows, starts, k = centroids.shape
        mids = (centroids[..., 1:] + centroids[..., :-1]) / 2
        inner = torch.searchsorted(self.x, mids.reshape(rows, -1).contiguous(), right=True).reshape(rows, starts, k - 1)
        edge = (rows, starts, 1)
        return torch.cat([inner.new_zeros(edge), inner, inner.new_full(edge, self.x.shape[1])], -1)

    def _sums(self, bounds: Tensor, orders: int) -> list[Tensor]:
        """The weight, weighted sum (and sum of squares, orders 3) of each run between ``bounds``.  # (B, S, k)"""
        index = bounds.reshape(bounds.shape[0], -1)
        sums = []
        for prefix in (self.s0, self.s1, self.s2)[:orders]:
            at = torch.gather(prefix, 1, index).reshape(bounds.shape)
            sums.append(at[..., 1:] - at[..., :-1])
        return sums

    def cost(self, bounds: Tensor) -> Tensor:
        """Weighted squared error of each run between ``bounds`` around its mean.  # (B, S, k)"""
        w, s, q = self._sums(bounds, 3)
        sse = q - s * s / w.clamp_min(1e-300)
        return torch.where(w > 0, sse.clamp_min(0), torch.zeros_like(sse))

    def step(self, centroids: Tensor, bounds: Tensor | None = None) -> Tensor:
        """One Lloyd step from sorted ``centroids`` (B, S, k) (whose ``bounds`` may be given), each
        start on its own: each centroid moves to its cluster's mean, an empty one into the worst
        cluster of its start.  # (B, S, k) sorted"""
        b = self.bounds(centroids) if bounds is None else bounds
        w, s = self._sums(b, 2)
        new = torch.where(w > 0, s / w.clamp_min(1e-300), centroids)
        if (w <= 0).any():  # move each empty centroid into the worst cluster of its start
            sse = self.cost(b)
            for row, start, j in torch.nonzero(w <= 0).tolist():
                worst = int(sse[row, start].argmax())
                lo, hi = int(b[row, start, worst]), min(int(b[row, start, worst + 1]), self.lengths[row])
                new[row, start, j] = self.x[row, (lo + hi) // 2] if hi - lo > 1 else new[row, start, j]
                sse[row, start, worst] = 0
        return torch.sort(new, -1).values

    def error(self, centroids: Tensor) -> tuple[Tensor, Tensor]:
        """The squared error of sorted ``centroids`` (B, S, k), and their bounds.  # (B, S), (B, S, k+1)"""
        b = self.bounds(centroids)
        return self.cost(b).sum(-1), b

    def lloyd(self, starts: Tensor, max_iter: int, tol: float = 1e-7) -> tuple[Tensor, Tensor]:
        """Lloyd from each start (B, S, k), repairing empty clusters, accelerated by SQUAREM
        (Varadhan and Roland, 2008: two steps extrapolated along their difference, then one more,
        kept only where it lowers the error), until the clusters stop changing or the squared error
        improves by less than ``tol`` (relative) in a cycle. ``max_iter`` bounds the Lloyd steps.

        The starts run together, each on its own (one that has converged is left as it is).
        Returns each row's centroids (B, k) of its start with the lowest error, and that error (B,).
        """
        c = torch.sort(starts.double(), -1).values
        error, b = self.error(c)
        done = torch.zeros(c.shape[:2], dtype=torch.bool, device=c.device)
        count = c.shape[1]
        steps = 0
        while steps < max_iter and not bool(done.all()):
            c1 = self.step(c, b)
            c2 = self.step(c1)
            steps += 2
            r, v = c1 - c, c2 - 2 * c1 + c
            r_norm, v_norm = r.norm(dim=-1), v.norm(dim=-1)
            fixed = v_norm == 0  # a fixed point, or moving by equal steps: plain Lloyd's c2
            alpha = (-r_norm / torch.where(fixed, 1.0, v_norm)).clamp(max=-1.0)[..., None]  # -1: plain Lloyd's c2
            trial = self.step(torch.sort(c - 2 * alpha * r + alpha * alpha * v, -1).values)
            steps += 1
            both, both_b = self.error(torch.cat([trial, c2], 1))  # one call for the two candidates' errors
            now, plain = both[:, :count], both[:, count:]
            moved, plain_b = both_b[:, :count], both_b[:, count:]
            take_plain = fixed | (plain < now)
            trial = torch.where(take_plain[..., None], c2, trial)
            moved = torch.where(take_plain[..., None], plain_b, moved)
            now = torch.where(take_plain, plain, now)
            finished = fixed | (moved == b).all(-1) | (error - now <= tol * now)
            c = torch.where(done[..., None], c, trial)
            b = torch.where(done[..., None], b, moved)
            error = torch.where(done, error, torch.minimum(error, now))
            done = done | finished
        final = self.error(c)[0]
        best = final.argmin(-1)  # (B,): the first of equals
        rows = torch.arange(len(c), device=c.device)
        return c[rows, best], final[rows, best]


def kmeans_1d(
    values: Tensor,
    k: int,
    weights: Tensor | None = None,
    seed: int = 0,
    restarts: int | None = None,
    max_iter: int = 300,
) -> tuple[Tensor, float]:
    """Weighted 1-D k-means on sorted values with prefix sums.

    Lloyd from several starts, the lowest squared error winning: the
    asymptotically optimal spacing (centroid density proportional to the
    cube root of the data's density, Panter and Dite), the quantiles, and
    ``restarts`` k-means++ seedings. Each step costs O(k log n) after one
    sort; above _HISTOGRAM_ABOVE values a fine histogram replaces the sort.
    restarts: k-means++ starts; by default one for up to _HISTOGRAM_ABOVE
        values, where a few outliers can dominate the error and the
        density-based starts under-serve them, none above.
    Returns (sorted centroids (k,), inertia).
    """
    return kmeans_1d_many([values], k, [weights], seed, restarts, max_iter)[0]


def kmeans_1d_many(
    values: Sequence[Tensor],
    k: int | Sequence[int],
    weights: Sequence[Tensor | None] | None = None,
    seed: int | Sequence[int] = 0,
    restarts: int | None = None,
    max_iter: int = 300,
) -> list[tuple[Tensor, float]]:
    """``kmeans_1d`` of each of ``values`` (with the matching ``k``, ``weights`` and ``seed``
    where those are sequences), each result the one it gets alone, with the Lloyd steps of inputs
    of the same k and similar size run together (batches of at most _BATCH_VALUES padded values):
    many small layers or groups pay a step's few tensor operations, most of a small input's time,
    once. Returns [(sorted centroids (k,), inertia)] in the order of ``values``.
    """
    count = len(values)
    ks = [k] * count if isinstance(k, int) else list(k)
    seeds = [seed] * count if isinstance(seed, int) else list(seed)
    weights = [None] * count if weights is None else list(weights)
    if not len(ks) == len(seeds) == len(weights) == count:
        raise ValueError(f"{count} inputs but {len(ks)} k, {len(seeds)} seeds and {len(weights)} weights")
    results: list = [None] * count
    with torch.inference_mode():  # no autograd bookkeeping in the many small steps
        pending = []
        for i, (each, clusters, mass, start_seed) in enumerate(zip(values, ks, weights, seeds)):
            data, starts = _prepared(each.reshape(-1), clusters, mass, start_seed, restarts)
            if starts is None:  # exact: every distinct value is a centroid
                results[i] = (_pad(torch.unique_consecutive(data.x), clusters).to(each.dtype), 0.0)
            else:
                pending.append((i, data, starts, each.dtype))
        # the same k, and similar lengths together: little padding
        pending.sort(key=lambda item: (len(item[2][0]), item[1].x.numel()))
        batch: list = []
        for item in pending:
            full = batch and (len(batch) + 1) * item[1].x.numel() > _BATCH_VALUES
            if batch and (full or len(batch[0][2][0]) != len(item[2][0])):
                _lloyd_batch(batch, max_iter, results)
                batch = []
            batch.append(item)
        if batch:
            _lloyd_batch(batch, max_iter, results)
    # clones made out of inference mode are ordinary tensors
    return [(centroids.clone(), error) for centroids, error in results]


def _prepared(
    values: Tensor, k: int, weights: Tensor | None, seed: int, restarts: int | None
) -> tuple[_Sorted, list[Tensor] | None]:
    """The sorted values (or their histogram) and Lloyd's starts; no starts where there are at
    most ``k`` distinct values."""
    large = values.numel() > _HISTOGRAM_ABOVE
    data = _histogram(values, weights) if large else _Sorted(values, weights)
    if restarts is None:
        restarts = 0 if large else 1
    if data.distinct() <= k:
        return data, None
    levels = (torch.arange(k, dtype=torch.float64, device=values.device) + 0.5) / k
    starts = [_quantiles(data, levels, power=1 / 3), _quantiles(data, levels, power=1.0)]
    generator = torch.Generator().manual_seed(seed)
    sample = data.x[
        torch.randint(data.x.numel(), (min(data.x.numel(), _SEED_SAMPLE),), generator=generator).to(data.x.device)
    ]
    starts += [kmeans_plusplus(sample[:, None], k, generator)[:, 0] for _ in range(restarts)]
    return data, [start.double() for start in starts]


def _lloyd_batch(batch: list, max_iter: int, results: list) -> None:
    """Lloyd on the rows of ``batch`` (index, data, starts, dtype) together, into ``results``.
    Rows with fewer starts repeat their first (the same run twice: the result is unchanged)."""
    count = max(len(starts) for _, _, starts, _ in batch)
    starts = torch.stack([torch.stack(s + s[:1] * (count - len(s))) for _, _, s, _ in batch])  # (B, S, k)
    centroids, errors = _Rows([data for _, data, _, _ in batch]).lloyd(starts, max_iter)
    for (i, _, _, dtype), found, error in zip(batch, centroids, errors.tolist()):
        results[i] = (found.to(dtype), error)


def _quantiles(data: _Sorted, levels: Tensor, power: float) -> Tensor:
    """Values at the ``levels`` quantiles of the data's density raised to ``power``.

    power 1: ordinary quantiles; 1/3: the spacing that minimises the squared
    error for many clusters. The density is read on a grid of the values.
    """
    grid = min(4096, data.x.numel())
    edges = torch.linspace(float(data.x[0]), float(data.x[-1]), grid + 1, dtype=torch.float64, device=data.x.device)
    cuts = torch.searchsorted(data.x, edges[1:-1])
    bounds = torch.cat([cuts.new_zeros(1), cuts, cuts.new_full((1,), data.x.numel())])
    density = (data.s0[bounds[1:]] - data.s0[bounds[:-1]]).clamp_min(0).pow(power)
    cum = torch.cumsum(density, 0)
    cells = torch.searchsorted(cum / cum[-1], levels).clamp_max(grid - 1)
    return (edges[cells] + edges[cells + 1]) / 2


def _histogram(values: Tensor, weights: Tensor | None) -> _Sorted:
    """Values binned into _BINS equal-width bins, each standing for its weighted mean.

    A few passes instead of a sort; the squared error inside a bin is about
    (range / _BINS)^2 / 12 a value, far below any clustering's.
    """
    low, high = torch.aminmax(values)
    if high <= low:
        total = values.new_tensor([float(values.numel())]) if weights is None else weights.sum()[None]
        return _Sorted(values[:1], total, presorted=True)
    mass = torch.zeros(_BINS, dtype=torch.float64, device=values.device)
    sums = torch.zeros_like(mass)
    flat_weights = None if weights is None else weights.reshape(-1).to(values.dtype)
    # in chunks, so that the bin indices and the weights' products take a few MiB, not the layer's size
    for start in range(0, values.numel(), _HISTOGRAM_CHUNK):
        chunk = values[start : start + _HISTOGRAM_CHUNK]
        index = ((chunk - low) * (_BINS / (high - low))).int().clamp_(0, _BINS - 1)
        if flat_weights is None:
            mass += torch.bincount(index, minlength=_BINS)
            sums += torch.bincount(index, weights=chunk, minlength=_BINS)
        else:
            w = flat_weights[start : start + _HISTOGRAM_CHUNK]
            mass += torch.bincount(index, weights=w, minlength=_BINS)
            sums += torch.bincount(index, weights=w * chunk, minlength=_BINS)
    full = mass > 0
    return _Sorted(sums[full] / mass[full], mass[full], presorted=True)


def kmeans_1d_optimal(values: Tensor, k: int, weights: Tensor | None = None) -> tuple[Tensor, float]:
    """Globally optimal weighted 1-D k-means by dynamic programming (as Ckmeans.1d.dp).

    Each of the k rows of the table is filled by divide and conquer over the
    monotone split points, vectorized level by level: O(k n log n) time and
    k*n int32 of memory. Returns (sorted centroids (k,), inertia).
    """
    values = values.reshape(-1)
    data = _Sorted(values, weights)
    if data.distinct() <= k:
        return _pad(torch.unique_consecutive(data.x), k).to(values.dtype), 0.0
    n = data.x.numel()
    every = torch.arange(n + 1, device=values.device)
    prev = data.cost(torch.zeros_like(every), every)  # D[1][i]: first i values in one cluster
    splits = []
    for m in range(2, k + 1):
        cur, arg = _dp_row(data, prev, m, n)
        splits.append(arg)
        prev = cur
    cuts = [n]
    for arg in reversed(splits):
        cuts.append(int(arg[cuts[-1]]))
    cuts.append(0)
    b = torch.tensor(cuts[::-1], device=values.device)
    w = data.s0[b[1:]] - data.s0[b[:-1]]
    centroids = (data.s1[b[1:]] - data.s1[b[:-1]]) / w
    return centroids.to(values.dtype), float(prev[n])


def _dp_row(data: _Sorted, prev: Tensor, m: int, n: int) -> tuple[Tensor, Tensor]:
    """D[m][i] = min_j D[m-1][j] + cost(j, i) for i in m..n, with its argmin j."""
    cur = torch.full_like(prev, float("inf"))
    arg = torch.zeros(n + 1, dtype=torch.int32, device=prev.device)
    lo = torch.tensor([m], device=prev.device)
    hi = torch.tensor([n], device=prev.device)
    optlo = torch.tensor([m - 1], device=prev.device)
    opthi = torch.tensor([n - 1], device=prev.device)
    while lo.numel():
        mid = (lo + hi) // 2
        top = torch.minimum(mid - 1, opthi)
        length = top - optlo + 1  # >= 1: opt(mid) lies in [m-1, mid-1]
        seg = torch.repeat_interleave(torch.arange(lo.numel(), device=prev.device), length)
        offsets = torch.cumsum(length, 0) - length
        j = optlo[seg] + torch.arange(seg.numel(), device=prev.device) - offsets[seg]
        value = prev[j] + data.cost(j, mid[seg])
        best = torch.full((lo.numel(),), float("inf"), dtype=value.dtype, device=prev.device)
        best = best.scatter_reduce(0, seg, value, "amin")
        first = torch.full((lo.numel(),), n, dtype=j.dtype, device=prev.device)
        first = first.scatter_reduce(0, seg, torch.where(value <= best[seg], j, n), "amin")
        cur[mid] = best
        arg[mid] = first.to(torch.int32)
        left, right = lo <= mid - 1, mid + 1 <= hi
        lo, hi, optlo, opthi = (
            torch.cat([lo[left], mid[right] + 1]),
            torch.cat([mid[left] - 1, hi[right]]),
            torch.cat([optlo[left], first[right]]),
            torch.cat([first[left], opthi[right]]),
        )
    return cur, arg


def kmeans_vectors(
    vectors: Tensor,
    k: int,
    weights: Tensor | None = None,
    seed: int = 0,
    max_iter: int = 100,
    tol: float = 1e-6,
    retries: int = 10,
    eps: float = 1e-6,
) -> tuple[Tensor, float]:
    """Weighted k-means by EM on (n, d) vectors: k-means++ seeding, chunked
    exhaustive assignment, and the iPQ empty-cluster repair (copy the most
    populated cluster's centroid, push the two apart by ``eps`` times the
    data's spread, reassign; at most ``retries`` times in a row).

    Returns (codebook (k, d), inertia). Raises EmptyClusterError when a
    cluster stays empty after ``retries`` repairs.
    """
    distinct = torch.unique(vectors, dim=0)
    if distinct.shape[0] <= k:
        return _pad(distinct, k), 0.0
    generator = torch.Generator().manual_seed(seed)
    w = (
        torch.ones(vectors.shape[0], dtype=vectors.dtype, device=vectors.device)
        if weights is None
        else weights.to(vectors.dtype)
    )
    sample = vectors
    if vectors.shape[0] > _SEED_SAMPLE:
        sample = vectors[torch.randperm(vectors.shape[0], generator=generator)[:_SEED_SAMPLE].to(vectors.device)]
    codebook = kmeans_plusplus(sample, k, generator)
    spread = vectors.std(0).clamp_min(torch.finfo(vectors.dtype).tiny)
    repairs = 0
    for _ in range(max_iter):
        assign = nearest(vectors, codebook).long()  # index_add_ is tens of times slower for int32
        mass = torch.zeros(k, dtype=w.dtype, device=w.device).index_add_(0, assign, w)
        counts = torch.bincount(assign, minlength=k)
        empty = torch.nonzero(counts == 0).flatten()
        if empty.numel():
            repairs += 1
            if repairs > retries:
                raise EmptyClusterError(
                    f"{empty.numel()} of {k} clusters stayed empty after {retries} repairs; "
                    "use fewer bits or a larger dim for this layer"
                )
            for j in empty.tolist():
                full = int(counts.argmax())
                push = (
                    eps
                    * spread
                    * torch.randn(vectors.shape[1], generator=generator, dtype=vectors.dtype).to(vectors.device)
                )
                codebook[j] = codebook[full] + push
                codebook[full] = codebook[full] - push
                counts[full] = 0  # split a different cluster for the next empty one
            continue
        repairs = 0
        sums = torch.zeros_like(codebook).index_add_(0, assign, vectors * w[:, None])
        updated = torch.where(mass[:, None] > 0, sums / mass.clamp_min(torch.finfo(w.dtype).tiny)[:, None], codebook)
        shift = (updated - codebook).abs().max()
        codebook = updated
        if shift <= tol * spread.max():
            break
    inertia = float((w * squared_distance_to_nearest(vectors, codebook)).sum())
    return codebook, inertia


def _pad(distinct: Tensor, k: int) -> Tensor:
    """``distinct`` values (or rows) repeated at the end to fill k centroids."""
    if distinct.dim() == 1:
        distinct = distinct[:, None]
        return torch.cat([distinct, distinct[-1:].expand(k - distinct.shape[0], 1)])[:, 0]
    return torch.cat([distinct, distinct[-1:].expand(k - distinct.shape[0], distinct.shape[1])])
