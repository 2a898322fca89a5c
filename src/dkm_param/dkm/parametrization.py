"""DKMParametrization: the one module dkm_param attaches to a user's weight."""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor, nn

from ..errors import DKMError, RegistrationError
from ..format import CompressedLayer
from ..ops import kmeans, layout, soft, table
from ..ops.dtypes import compute_dtype
from ..ops.threads import threads_for
from ..spec import FLOAT32_MAX, FLOAT32_TINY, LayerSpec


class DKMParametrization(nn.Module):
    """``weight -> A @ C`` in training mode, ``weight -> C[nearest]`` in eval mode.

    State, all in buffers so ``state_dict`` checkpoints resume exactly:
    ``codebook`` (k, d), or (groups, k, d) with ``spec.group_size``, the
    warm-started centroids; ``tau`` and ``epsilon`` (groups,), the
    temperature and the absolute convergence threshold; ``scale`` (rows,)
    with ``spec.channel_scale``.

    Raises RegistrationError when a temperature derived with ``tau_rel``, or
    the threshold, does not fit float32 (it would be 0 or inf).

    A bfloat16, float16 or float32 weight in one dimension (not scaled per
    channel, no zeros pinned) is clustered by value table (``ops.table``,
    eDKM): a half-precision weight by its distinct values, exactly; a float32
    one on a grid of evenly spaced points between its extremes, as fine as
    the temperature needs, each weight's soft value and slope taken to first
    order from its grid point (the float32 engine takes a layer no grid
    serves, or one small enough that it is quicker). No float32 copy of the weight, and
    nothing of its size kept but the soft weight. Other weights take the
    float32 engine (``ops.soft``), exact to float32's rounding, where each
    group also keeps the order in which its values were last grouped
    (``soft.OrderCache``, 4 bytes a weight, not in ``state_dict``), so that a
    training step does not sort them anew.

    One training-mode result is reused while neither the weight nor the
    codebook changed and its backward has not run, so a weight read several
    times in one step (tied weights, repeated calls) is clustered once and
    every reader sees the same tensor.
    """

    def __init__(
        self, weight: Tensor, spec: LayerSpec, name: str = "", codebook: Tensor | None = None, skipped: tuple = ()
    ):
        """codebook: starting centroids (e.g. from ``palettize``) instead of ``spec.init``."""
        super().__init__()
        _run_eagerly_under_compile()
        self.spec = spec
        self.name = name
        self.skipped = tuple(skipped)
        work = weight.detach().to(compute_dtype(weight.dtype))
        if spec.channel_scale:
            self.register_buffer("scale", layout.channel_scale(work))
        else:
            self.scale = None
        groups = layout.grouped_vectors(work, spec.dim, spec.group_size, self.scale, spec.layout)  # (G, n, d)
        if spec.preserve_zeros:  # fixed at registration: pruned weights stay pruned
            self.register_buffer("zeros", (groups == 0).all(-1))  # (G, n)
        else:
            self.zeros = None
        live = [self._live(g, i) for i, g in enumerate(groups)]
        free = spec.clusters - self._pinned
        if codebook is None:
            books = torch.stack([self._pin(kmeans.init_codebook(v, free, spec.init, spec.seed)) if len(v) else
                                 work.new_zeros(spec.clusters, spec.dim) for v in live])
        else:
            books = codebook.to(device=work.device, dtype=work.dtype).reshape(len(groups), spec.clusters, spec.dim)
            books = torch.stack([self._pin(b[self._pinned:]) for b in books])
        # what tau, epsilon and settling read: the weight's distinct values and their counts
        # (exact, for a weight clustered by value), or a summary of at most SETTLE_POINTS points
        summaries = [self._summary(weight, g, v) for g, v in enumerate(live)]
        self.tau_lowered = False  # set by _temperature where tau_rel's tau passed the collapse limit
        taus = torch.stack([self._temperature(*summary, b[self._pinned:]) for summary, b in zip(summaries, books)])
        self._check_temperatures(taus, live, books)
        spread = torch.stack([_spread(*summary) for summary in summaries])
        epsilon = (spec.epsilon * spread).to(work.dtype)
        if not torch.isfinite(epsilon).all():
            raise RegistrationError(
                f"layer '{name}': the convergence threshold epsilon ({spec.epsilon:g}) x the weight's spread "
                f"({float(spread.double().max()):.3g}) overflows {work.dtype}; lower epsilon in the layer's spec"
            )
        if spec.settle_iter:
            settled = []
            for v, summary, book, tau, std in zip(live, summaries, books, taus, spread):
                if len(v):
                    points, counts = summary if spec.dim == 1 else (v, None)  # settle samples vectors itself
                    book = self._pin(soft.settle(points, book[self._pinned:], float(tau), spec.settle_iter,
                                                 spec.epsilon * float(std) / 4, spec.seed, counts)[0])
                settled.append(book)
            books = torch.stack(settled)
        self.register_buffer("codebook", (books[0] if len(groups) == 1 else books).contiguous())
        self.register_buffer("tau", taus.to(work.dtype))
        self.register_buffer("epsilon", epsilon)
        self._cached: tuple[tuple, Tensor] | None = None
        self.process_group = None  # set by register_dkm; not state (it neither pickles nor copies)
        self.snapping = False  # set within dp.snapped(model): snapped weights in training mode too
        # each group's value order, reused from step to step (not state: a speed-up only)
        self._orders = [soft.OrderCache() for _ in range(len(groups))]

    @property
    def _pinned(self) -> int:
        """Codebook entries not learned: entry 0, pinned at zero, with ``preserve_zeros``."""
        return 1 if self.spec.preserve_zeros else 0

    def _pin(self, learned: Tensor) -> Tensor:
        return torch.cat([learned.new_zeros(self._pinned, learned.shape[1]), learned])

    def _live(self, vectors: Tensor, group: int) -> Tensor:
        """The vectors that are clustered: all, or the non-zero ones with ``preserve_zeros``."""
        return vectors if self.zeros is None else vectors[~self.zeros[group]]

    def _summary(self, weight: Tensor, group: int, vectors: Tensor) -> tuple[Tensor, Tensor | None]:
        """Points that stand for a group's vectors and how many each stands for (None: one each).

        By value: the distinct values and their counts. One dimension: the weighted bin means
        of ``soft.summary``. More: the vectors themselves.
        """
        spec = self.spec
        if self.by_value(weight):
            values = layout.grouped_vectors(weight.detach(), 1, spec.group_size, None, spec.layout)[group, :, 0]
            grid = None if weight.dtype in table.HALF_DTYPES else table.value_grid(*torch.aminmax(values))
            if grid is not None and not math.isfinite(float(grid.step)):
                low, high = (float(v) for v in torch.aminmax(values))
                raise RegistrationError(
                    f"layer '{self.name}': the weight's values span {low:.3g} to {high:.3g}, a range wider than "
                    "float32 holds (or NaN); scale the weight down, or skip the layer in the policy"
                )
            _, distinct, counts = table.distinct_values(weight.dtype, table.value_counts(values, grid), grid)
            return distinct[:, None], counts
        if spec.dim == 1 and len(vectors):
            return soft.summary(vectors, soft.SETTLE_POINTS, spec.seed)
        return vectors, None

    def _temperature(self, vectors: Tensor, counts: Tensor | None, codebook: Tensor) -> Tensor:
        """The group's tau: the spec's, or ``tau_rel`` times the clustering error (the centroids'
        spacing for a weight already on its centroids), at most ``COLLAPSE_FRACTION`` of the
        collapse temperature (``tau_lowered`` is then set); ``_check_temperatures`` vets it.

        vectors: points standing for the group's vectors, ``counts`` of them each (None: one)."""
        if self.spec.tau is not None:
            return torch.tensor(self.spec.tau, dtype=vectors.dtype)
        if not len(vectors):
            return torch.ones((), dtype=vectors.dtype)  # nothing to cluster in this group
        tau = self.spec.tau_rel * _weighted_mean(kmeans.squared_distance_to_nearest(vectors, codebook), counts)
        if tau <= 0:  # the weight sits on its centroids (already snapped): use their spacing
            if (codebook == codebook[:1]).all():  # one value: nothing to tell apart, any tau serves
                return torch.tensor(max(self.spec.tau_rel * FLOAT32_TINY, FLOAT32_TINY), dtype=vectors.dtype)
            tau = self.spec.tau_rel * _spacing(codebook)
            return tau
        # Few centroids for long vectors leave a large error, and tau_rel times it can pass the
        # temperature at which every centroid settles onto the mean: keep well below it.
        limit = (COLLAPSE_FRACTION * _collapse_temperature(vectors, counts)).to(tau.dtype)
        if 0 < limit < tau:
            self.tau_lowered = True  # register_dkm says so, naming the layer
            return limit
        return tau

    def _check_temperatures(self, taus: Tensor, live: list[Tensor], books: Tensor) -> None:
        """Raise RegistrationError for a derived tau that is not a positive normal float32:
        as 0 it would divide by zero, as inf collapse the layer."""
        fits = (taus >= FLOAT32_TINY) & (taus <= FLOAT32_MAX)  # NaN fails both
        if self.spec.tau is not None or bool(fits.all()):
            return
        group = int((~fits).nonzero()[0, 0])
        if not torch.isfinite(live[group]).all():
            raise RegistrationError(self._non_finite("the weight holds NaN or Inf", live[group]))
        vectors, codebook = live[group].double(), books[group, self._pinned:].double()
        error = float(kmeans.squared_distance_to_nearest(vectors, codebook).mean())
        what = "the mean squared distance to the nearest centroid"
        if error == 0:
            what, error = "the centroids' spacing", float(_spacing(codebook))
        tau = self.spec.tau_rel * error
        where = f" (group {group} of {len(taus)})" if len(taus) > 1 else ""
        over = float(taus[group]) > FLOAT32_MAX
        derived = f"the derived temperature tau = tau_rel ({self.spec.tau_rel:g}) x {what} ({error:.3g}) = {tau:.3g}"
        unit = "set channel_scale=True in the layer's spec to cluster each output channel at unit scale"
        reach = float(vectors.abs().max())
        if FLOAT32_TINY <= tau <= FLOAT32_MAX:  # tau itself fits: the squared distances on the way do not
            raise RegistrationError(
                f"layer '{self.name}'{where}: {derived} cannot be computed in {taus.dtype}: the squared distances "
                f"of a weight reaching {reach:.3g} {'overflow to inf' if over else 'underflow to 0'}; "
                f"scale the weight, or {unit}"
            )
        raise RegistrationError(
            f"layer '{self.name}'{where}: {derived} {'overflows' if over else 'underflows'} float32, where it "
            f"must lie in {FLOAT32_TINY:.4g} to {FLOAT32_MAX:.4g} (0 would divide by zero, inf collapse the "
            f"layer; the weight reaches {reach:.3g}); {'lower' if over else 'raise'} tau_rel or set tau= "
            f"explicitly, or {unit}"
        )

    def extra_repr(self) -> str:
        spec = self.spec
        return f"bits={spec.bits}, dim={spec.dim}, groups={self.books().shape[0]}, tau={float(self.tau.mean()):.3g}"

    def books(self) -> Tensor:
        """The codebooks as (groups, k, d), a view of the buffer."""
        return self.codebook.view(-1, self.spec.clusters, self.spec.dim)

    def grouped(self, weight: Tensor) -> Tensor:
        """The weight as (groups, n, d) vectors in the clustering dtype, scaled per channel."""
        spec = self.spec
        return layout.grouped_vectors(
            weight.to(self.codebook.dtype), spec.dim, spec.group_size, self.scale, spec.layout
        )

    def assign(self, weight: Tensor, codebook: Tensor | None = None) -> Tensor:
        """Index of the nearest centroid of every vector, groups in order.  # (n,)

        codebook: centroids to assign to instead of the buffer (same shape).
        """
        books = self.books() if codebook is None else codebook.view_as(self.books())
        with torch.no_grad():
            groups = self.grouped(weight)
            if not torch.isfinite(groups).all():
                raise DKMError(self._non_finite("the weight holds NaN or Inf", weight))
            indices = []
            for i, (g, book) in enumerate(zip(groups, books)):
                found = kmeans.nearest(g, book[self._pinned:]) + self._pinned
                indices.append(found if self.zeros is None else torch.where(self.zeros[i], 0, found))
            return torch.cat(indices)

    def snap(self, weight: Tensor) -> Tensor:
        """Each vector replaced by its nearest centroid (no gradient to the weight)."""
        indices = self.assign(weight)
        return layout.decode(self.codebook, indices, tuple(weight.shape), weight.dtype, self.scale, self.spec.layout)

    def export_layer(self, weight: Tensor, stored: torch.dtype) -> CompressedLayer:
        """The weight as the codebook rounded to ``stored`` and each vector's nearest entry of it.

        Leaves the parametrization as it is. Raises DKMError for a codebook
        that is not finite.
        """
        with torch.no_grad():
            rounded = self.codebook.to(stored)
            if not torch.isfinite(rounded).all():
                raise DKMError(
                    f"layer '{self.name}': the codebook holds NaN or Inf after training (or in {stored}); "
                    "lower the learning rate or raise tau, and resume from a finite checkpoint"
                )
            indices = self.assign(weight, rounded.to(self.codebook.dtype))
        return CompressedLayer(
            shape=tuple(weight.shape),
            dtype=weight.dtype,
            spec=self.spec.storage,
            codebook=rounded.detach().cpu(),
            indices=indices.to(torch.uint8).cpu(),
            scale=None if self.scale is None else self.scale.detach().cpu(),
        )

    # The clustering is data-dependent Python (early exits, windows, caching):
    # torch.compile runs it eagerly and compiles the rest of the model
    # (torch.compiler.disable, applied by _run_eagerly_under_compile).
    def forward(self, weight: Tensor) -> Tensor:
        if not self.training or self.snapping:
            return self.snap(weight)
        key = self._key(weight)
        if self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        # What the clustering saves for backward is its own: activation checkpointing (which
        # re-runs the forward and expects the same saved tensors) gets the cached result on
        # the re-run, so the clustering runs once per step and nothing is counted twice.
        with _own_saved_tensors(), threads_for(weight.numel()):
            out = self._soft_weight(weight)
        if out.requires_grad:
            out.register_hook(self._forget)
        self._cached = (self._key(weight), out)
        return out

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        _run_eagerly_under_compile()  # an unpickled one was not built by __init__

    def by_value(self, weight: Tensor) -> bool:
        """Whether the weight is clustered by value table (``ops.table``): a bfloat16, float16
        or float32 weight in one dimension, neither scaled per channel nor with zeros pinned."""
        return weight.dtype in table.TABLE_DTYPES and self.spec.dim == 1 and self.scale is None and self.zeros is None

    def _soft_weight(self, weight: Tensor) -> Tensor:
        """The soft-clustered weight, advancing the warm-started codebook."""
        if self.by_value(weight):
            return self._soft_by_value(weight)
        groups = self.grouped(weight)
        finite, taus, epsilons = self._read_with_settings(_finite(groups.detach()))
        if not finite:
            raise DKMError(self._non_finite("the weight holds NaN or Inf", weight))
        softs, books = [], []
        # one group as a view (squeeze): iterating the tensor would cost backward a weight-sized stack
        for g, (vectors, book) in enumerate(zip(_unbound(groups), self.books())):
            live = self._live(vectors, g)
            if not len(live):
                softs.append(torch.zeros_like(vectors))
                books.append(book)
                continue
            soft_vectors, updated, _ = soft.soft_cluster(
                live, book[self._pinned:].clone(), taus[g], self.spec.max_iter, epsilons[g],
                order_cache=self._orders[g],
            )
            if self.zeros is not None:  # zero vectors stay exactly zero
                soft_vectors = torch.zeros_like(vectors).index_put((torch.nonzero(~self.zeros[g])[:, 0],), soft_vectors)
            softs.append(soft_vectors)
            books.append(self._pin(updated))
        return self._assemble(weight, softs, books)

    def _soft_by_value(self, weight: Tensor) -> Tensor:
        """``_soft_weight`` by value table: no float32 copy of the weight, memory O(table)."""
        groups = layout.grouped_vectors(weight, 1, self.spec.group_size, None, self.spec.layout)  # (G, n, 1)
        lows, highs = _extremes(groups.detach())  # a float32 grid's ends too
        # NaN and Inf reach the extremes
        finite, taus, epsilons = self._read_with_settings(torch.isfinite(lows).all() & torch.isfinite(highs).all())
        if not finite:
            raise DKMError(self._non_finite("the weight holds NaN or Inf", weight))
        softs, books = [], []
        for g, (group, book) in enumerate(zip(_unbound(groups), self.books())):
            soft_values, updated = self._table_group(g, group.squeeze(1), book, lows[g], highs[g], taus[g], epsilons[g])
            softs.append(soft_values[:, None])
            books.append(updated)
        return self._assemble(weight, softs, books)

    def _table_group(self, g: int, values: Tensor, book: Tensor, low: Tensor, high: Tensor, tau: float,
                     epsilon: float) -> tuple[Tensor, Tensor]:
        """Group ``g``'s soft values and updated codebook by value table (``low`` and ``high``: its
        extremes; ``tau`` and ``epsilon``: its settings). A float32 group is counted on a grid as
        fine as its temperature needs (``table.grid_size``), and takes the float32 engine when no
        grid is fine enough."""
        max_iter = self.spec.max_iter
        if values.dtype in table.HALF_DTYPES:
            counts = self._value_counts(values.detach())
            return table.table_cluster(values, book, tau, max_iter, epsilon, counts=counts)[:2]
        size = None if self._float32_engine else table.grid_size(low, high, book, tau)
        if size is not None and not _grid_pays(values.numel(), size, self.spec.bits):
            size = None
        while size is not None:
            grid = table.value_grid(low, high, size)
            counts = self._value_counts(values.detach(), grid)
            try:
                return table.table_cluster(values, book, tau, max_iter, epsilon, counts=counts, grid=grid,
                                           sized=True)[:2]
            except table.GridTooCoarse as coarse:  # the iterations moved the centroids closer
                size = coarse.size
        out, updated, _ = soft.soft_cluster(values[:, None], book.clone(), tau, max_iter, epsilon,
                                            order_cache=self._orders[g])
        return out.squeeze(1), updated

    # float32 weights on the float32 engine, whatever the temperature (for comparing with it)
    _float32_engine = False

    def _value_counts(self, values: Tensor, grid: table.Grid | None = None) -> Tensor:
        """``table.value_counts`` of the values: with a ``process_group``, each rank counts its
        slice and the counts are summed across the group (whole numbers: exactly the count of all).
        Every rank holds the whole weight, so the extremes that place a float32 grid agree."""
        group = self.process_group
        if group is None:
            return table.value_counts(values, grid)
        import torch.distributed as dist

        rank, ranks, n = dist.get_rank(group), dist.get_world_size(group), values.numel()
        counts = table.value_counts(values[rank * n // ranks : (rank + 1) * n // ranks], grid)
        dist.all_reduce(counts, group=group)
        return counts

    def _assemble(self, weight: Tensor, softs: list[Tensor], books: list[Tensor]) -> Tensor:
        """The groups' soft vectors as the weight, keeping the updated codebooks as the warm start."""
        books = torch.stack(books)
        if not torch.isfinite(books).all():  # never pass NaN on to the model
            raise DKMError(self._non_finite("clustering produced NaN or Inf centroids", weight))
        if torch.is_grad_enabled():  # a forward without gradient (an evaluation, a re-entrant checkpoint's
            with torch.no_grad():  # first pass) leaves the warm start where the training step will find it
                self.codebook.copy_(books.view_as(self.codebook))
        # (one group, the usual case: a view, not a copy of the weight)
        flat = (softs[0][None] if len(softs) == 1 else torch.stack(softs)).reshape(layout.rows(tuple(weight.shape)), -1)
        if self.scale is not None:
            flat = flat * self.scale[:, None]
        return layout.from_layout(flat, tuple(weight.shape), self.spec.layout).to(weight.dtype)

    def _non_finite(self, what: str, weight: Tensor) -> str:
        bad = int((~torch.isfinite(weight.detach())).sum())
        return (
            f"layer '{self.name}' ({self.spec.bits} bits, dim {self.spec.dim}): {what} "
            f"({bad} of {weight.numel()} weights are not finite); lower the learning rate or clip "
            "gradients, and resume from the last finite checkpoint"
        )

    def __getstate__(self):
        # the cached result holds an autograd graph, which neither pickles nor deep-copies
        state = self.__dict__.copy()
        state["_cached"] = None
        state["process_group"] = None
        return state

    def _read_with_settings(self, flag: Tensor) -> tuple[bool, list[float], list[float]]:
        """``flag`` (0-d) read back with each group's tau and epsilon, as Python floats, in one
        transfer: on a GPU each read waits for the device to finish its work."""
        parts = [_whole(t).detach().double().reshape(-1) for t in (flag, self.tau, self.epsilon)]
        values = torch.cat(parts).tolist()
        groups = parts[1].numel()
        return bool(values[0]), values[1 : 1 + groups], values[1 + groups :]

    def _key(self, weight: Tensor) -> tuple:
        # any change to the clustering's own state (codebook, tau, epsilon) makes a new result
        state = (self.codebook._version, self.tau._version, self.epsilon._version)
        return (weight.data_ptr(), weight._version, state, torch.is_grad_enabled())

    def _forget(self, grad: Tensor) -> None:
        # backward has consumed the graph: the next read must build a new one
        self._cached = None


# A derived tau stays below this fraction of the collapse temperature (``_collapse_temperature``).
# It leaves scalar clustering at 2 bits and more untouched (there tau_rel=2.0 gives about a tenth
# of it) and a Gaussian layer at 1 bit too (0.36); vectors of 4 at 2 bits otherwise reach 1.6-2.3.
COLLAPSE_FRACTION = 0.4


def _grid_pays(n: int, size: int, bits: int) -> bool:
    """Whether clustering ``n`` float32 weights on a grid of ``size`` points is expected to be
    faster than the float32 engine: the grid's fixed cost and its attention, at most
    ``min(n, size)`` points by ``2**bits`` centroids, against the engine's cost a weight, which
    grows with the bits (both in nanoseconds, fitted on a 2-core CPU; a layer where it misses
    is a small one, where either is quick)."""
    grid = 2_000 + 10 * n + 10 * min(n, size) * (1 << bits)
    engine = 800 + (8 + 7 * bits) * n
    return grid < engine


def _run_eagerly_under_compile() -> None:
    """Give ``DKMParametrization.forward`` torch.compiler.disable, once, when the first one is built.

    Not a decorator: torch.compiler.disable imports torch._dynamo (over a
    second), which ``import dkm_param`` must not cost.
    """
    forward = DKMParametrization.forward
    if not getattr(forward, "_dkm_eager", False):
        eager = torch.compiler.disable(forward)
        eager._dkm_eager = True
        DKMParametrization.forward = eager


def _spacing(codebook: Tensor) -> Tensor:
    """Mean squared error a uniform spread of vectors would have around these
    centroids: the squared distance to the nearest other centroid, over 12."""
    if codebook.shape[0] < 2:
        return codebook.new_zeros(())
    gaps = torch.cdist(codebook, codebook).pow(2).fill_diagonal_(float("inf")).min(1).values
    return gaps[torch.isfinite(gaps) & (gaps > 0)].mean().nan_to_num(0.0) / 12


def _collapse_temperature(vectors: Tensor, counts: Tensor | None) -> Tensor:
    """The temperature above which soft clustering's only fixed point puts every centroid on the
    vectors' mean: twice the largest variance along one direction (deterministic annealing's first
    critical temperature, Rose 1998), of the points each counted ``counts`` times (None: once)."""
    points = vectors.double()
    weights = points.new_ones(len(points)) if counts is None else counts.double()
    centered = points - (points * weights[:, None]).sum(0) / weights.sum()
    if points.shape[1] == 1:
        return 2 * (centered[:, 0] ** 2 * weights).sum() / weights.sum()
    covariance = (centered * weights[:, None]).T @ centered / weights.sum()
    return 2 * torch.linalg.eigvalsh(covariance)[-1]


def _weighted_mean(values: Tensor, counts: Tensor | None) -> Tensor:
    """The mean of ``values``, each counted ``counts`` times (None: once)."""
    if counts is None:
        return values.mean()
    return (values * counts).sum() / counts.sum()


def _spread(points: Tensor, counts: Tensor | None) -> Tensor:
    """The standard deviation of all the values the points stand for (0 for fewer than two)."""
    if counts is None:
        return points.std(unbiased=False) if points.numel() > 1 else points.new_zeros(())
    total = counts.sum()
    mean = (points[:, 0] * counts).sum() / total
    return (((points[:, 0] - mean) ** 2 * counts).sum() / total).sqrt()


def _finite(values: Tensor) -> Tensor:
    """Whether every value is finite (0-d, not read back), from one min-max pass (NaN and Inf
    reach the extremes)."""
    if not values.numel():
        return torch.ones((), dtype=torch.bool, device=values.device)
    low, high = torch.aminmax(values)
    return torch.isfinite(low) & torch.isfinite(high)


def _whole(tensor: Tensor) -> Tensor:
    """A distributed tensor (``DTensor``) as the whole tensor on this rank; any other as it is."""
    full = getattr(tensor, "full_tensor", None)
    return full() if full is not None else tensor


def _extremes(groups: Tensor) -> tuple[Tensor, Tensor]:
    """Each group's least and greatest value.  # (G,), (G,)"""
    if len(groups) == 1:  # a whole-tensor reduction: several times quicker than one along a dim
        low, high = torch.aminmax(groups)
        return low[None], high[None]
    return torch.aminmax(groups.reshape(len(groups), -1), dim=1)


def _unbound(groups: Tensor) -> tuple[Tensor, ...]:
    """The (G, n, d) groups one by one; one group as a view, whose backward copies nothing
    (selecting it writes the gradient into a zeroed tensor of the weight's size, unbinding
    stacks it)."""
    return (groups.squeeze(0),) if len(groups) == 1 else groups.unbind(0)


def _keep(tensor: Tensor) -> Tensor:
    return tensor


@contextlib.contextmanager
def _own_saved_tensors():
    """Tensors saved for backward inside are kept as autograd keeps them, whatever hooks an
    enclosing region (activation checkpointing, offloading) has set."""
    try:
        hooks = torch.autograd.graph.saved_tensors_hooks(_keep, _keep)
        hooks.__enter__()
    except RuntimeError:  # saved-tensor hooks are disabled here (e.g. while compiling): nothing to shield from
        yield
        return
    try:
        yield
    finally:
        hooks.__exit__(None, None, None)
