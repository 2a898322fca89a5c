"""The DKM engine (``soft.soft_cluster``) against the plain unrolled reference.

Tolerances, relative to the largest magnitude of the reference's tensor:
float64: output, final codebook and gradient within 1e-9 (measured: below
1e-12); float32: output and codebook within 1e-4, gradient within 2e-3
(measured: 1e-5 and 2e-4; the reference's own float32 error is of the same
order). Iteration counts are equal. Inputs where the reference meets a
cluster mass near the subnormal range are left out (see ``well_posed``).
"""

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from dkm_param.ops import _engine, kmeans, soft
from strategies import bits, dims, seeds, weights

TIGHT = 1e-9  # float64
OUTPUT_32 = 1e-4
GRADIENT_32 = 2e-3


def realistic_start(vectors: torch.Tensor, k: int, seed: int = 0) -> tuple[torch.Tensor, float, float]:
    """Codebook, tau and epsilon as the parametrization sets them up."""
    codebook = kmeans.init_codebook(vectors, k, "kmeans++", seed)
    tau = 2.0 * float(kmeans.squared_distance_to_nearest(vectors, codebook).mean())
    if tau <= 0:  # at most k distinct vectors
        tau = 2.0 * float(vectors.pow(2).mean().clamp_min(torch.finfo(vectors.dtype).tiny))
    return codebook, tau, 1e-3 * float(vectors.std(unbiased=False))


@st.composite
def problems(draw, dtype=torch.float64, realistic: bool = False):
    """(vectors (n, d), codebook (k, d), tau, max_iter, epsilon) with n k small enough to be quick.

    The codebook is a k-means++ start, a warm start (converged iterations) or,
    unless ``realistic``, random points; tau is the realistic one times 0.1, 1 or 10.
    """
    b = draw(bits)
    k = 1 << b
    weight, d = draw(weights(min_vectors=1, max_vectors=max(1, min(300, 20_000 // k))))
    vectors = weight.reshape(-1, d).to(dtype)
    codebook, tau, epsilon = realistic_start(vectors, k, draw(seeds))
    start = draw(st.sampled_from(["kmeans++", "warm"] if realistic else ["kmeans++", "warm", "random"]))
    if start == "warm":
        _, codebook, _ = soft.soft_cluster_reference(vectors, codebook, tau, 20, 0.0)
    elif start == "random":
        gen = torch.Generator().manual_seed(draw(seeds))
        codebook = torch.randn(k, d, generator=gen, dtype=dtype) * vectors.abs().max().clamp_min(1e-30)
    if not realistic:
        tau *= draw(st.sampled_from([0.1, 1.0, 10.0]))
    # epsilon well above the rounding of the centroids: below it, whether an iteration
    # stops is a coin toss of rounding (test_epsilon_stops_the_iterations_early covers 0)
    size = float(vectors.abs().max().clamp_min(1e-30))
    least = 1e3 * torch.finfo(dtype).eps * size
    epsilon = draw(st.sampled_from([least, max(epsilon, least), 0.1 * size]))
    problem = vectors, codebook, tau, draw(st.integers(1, 6)), epsilon
    assume(well_posed(*problem))
    return problem


def well_posed(vectors, codebook, tau, max_iter, epsilon) -> bool:
    """Whether the reference's iterations stay clear of cluster masses near the subnormal
    range: below ``tiny`` it divides by ``finfo.tiny`` (its ``clamp_min``); below
    ``tiny / eps`` the products of its gradient fall among subnormal numbers, whose
    few digits leave both engines far from the exact gradient (checked at 60 digits:
    5e-3 relative error in float64), so there is nothing to match."""
    info = torch.finfo(vectors.dtype)
    for _ in range(max_iter):
        attn = soft.attention(vectors, codebook, tau)
        mass = attn.sum(0)
        if ((mass > 0) & (mass < info.tiny / info.eps)).any() or not torch.isfinite(attn).all():
            return False
        updated = soft.centroid_update(vectors, attn, codebook)
        shift, codebook = (updated - codebook).abs().max(), updated
        if shift <= epsilon:
            break
    return True


def run(fn, vectors, codebook, tau, max_iter, epsilon, grad_seed: int = 0, **options):
    """(out, final codebook, iterations, gradient of sum(out * g) for a fixed random g)."""
    vectors = vectors.detach().clone().requires_grad_(True)
    out, final, iterations = fn(vectors, codebook.clone(), tau, max_iter, epsilon, **options)
    gen = torch.Generator().manual_seed(grad_seed)  # on the CPU, wherever ``out`` is: the same draws
    upstream = torch.randn(out.shape, generator=gen, dtype=out.dtype).to(out.device)
    (out * upstream).sum().backward()
    return out.detach(), final, iterations, vectors.grad


def reference(*problem):
    """The reference's results, when they are finite: with a near-empty cluster its
    gradient can overflow (it forms w.g and c.g apart), and then there is nothing to match."""
    out = run(soft.soft_cluster_reference, *problem)
    assume(all(torch.isfinite(t).all() for t in (out[0], out[1], out[3])))
    return out


def assert_near(got: torch.Tensor, want: torch.Tensor, tolerance: float) -> None:
    """Within ``tolerance`` times the largest magnitude of ``want``."""
    scale = want.abs().max().item() if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=0.0, atol=tolerance * scale + 1e-300)


def assert_same_step(got, want, tolerance: float = TIGHT) -> None:
    """Same iterations; output, final codebook and gradient within ``tolerance``."""
    assert got[2] == want[2]
    for a, b in zip(got[:2] + got[3:], want[:2] + want[3:]):
        assert_near(a, b, tolerance)


@given(problem=problems())
def test_engine_matches_reference_output(problem):
    ref = reference(*problem)
    got = run(soft.soft_cluster, *problem)
    assert got[2] == ref[2]
    assert_near(got[0], ref[0], TIGHT)
    assert_near(got[1], ref[1], TIGHT)


@given(problem=problems())
def test_engine_matches_reference_gradient(problem):
    ref = reference(*problem)
    got = run(soft.soft_cluster, *problem)
    assert_near(got[3], ref[3], TIGHT)


@given(problem=problems())
def test_window_changes_nothing_but_speed(problem):
    windowed = run(soft.soft_cluster, *problem, window=True)
    dense = run(soft.soft_cluster, *problem, window=False)
    assert_same_step(windowed, dense)


@given(problem=problems(dtype=torch.float32, realistic=True))
def test_engine_matches_reference_in_float32(problem):
    ref = reference(*problem)
    got = run(soft.soft_cluster, *problem)
    assert got[2] == ref[2]
    assert_near(got[0], ref[0], OUTPUT_32)
    assert_near(got[1], ref[1], OUTPUT_32)
    assert_near(got[3], ref[3], GRADIENT_32)


@given(problem=problems(dtype=torch.float32, realistic=True), far=st.sampled_from([0.0, 1e3, 1e6]))
def test_engine_gradients_are_finite(problem, far):
    vectors, codebook, tau, max_iter, epsilon = problem
    if far:  # an outlier weight, far beyond every centroid
        vectors = vectors.clone()
        vectors[0] = far * vectors.abs().max().clamp_min(1e-30)
    out, final, _, grad = run(soft.soft_cluster, vectors, codebook, tau, max_iter, epsilon)
    assert torch.isfinite(out).all() and torch.isfinite(final).all() and torch.isfinite(grad).all()


@given(problem=problems())
def test_no_grad_gives_the_same_result_and_no_graph(problem):
    vectors, codebook, tau, max_iter, epsilon = problem
    with torch.no_grad():
        leaf = vectors.clone().requires_grad_(True)
        out, final, iterations = soft.soft_cluster(leaf, codebook, tau, max_iter, epsilon)
    assert out.grad_fn is None and not out.requires_grad
    want = run(soft.soft_cluster, vectors, codebook, tau, max_iter, epsilon)
    assert iterations == want[2]
    assert torch.equal(out, want[0]) and torch.equal(final, want[1])


@given(problem=problems(), chunk=st.sampled_from([1, 3, 16, 100, 1000]))
def test_chunk_size_changes_nothing(problem, chunk):
    ref = reference(*problem)
    assert_same_step(run(soft.soft_cluster, *problem, chunk_elements=chunk), ref)


@given(d=dims, seed=seeds, n=st.integers(1, 3000), cache=st.sampled_from([0, 1 << 25]))
def test_chunk_boundaries_and_attention_cache(d, seed, n, cache):
    # many chunks, n not a multiple of any of them; with and without the shared attention
    gen = torch.Generator().manual_seed(seed)
    vectors = torch.randn(n, d, generator=gen, dtype=torch.float64)
    codebook, tau, epsilon = realistic_start(vectors, 8)
    # fewer vectors than centroids: centroids repeat on a vector at a temperature at float64's floor
    # (no clustering error), where the reference's gradient is its roundoff times 1 / tau
    assume(len(torch.unique(codebook, dim=0)) == len(codebook))
    ref = run(soft.soft_cluster_reference, vectors, codebook, tau, 3, epsilon)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_engine, "CHUNK_ELEMENTS", 97)
        patch.setattr(_engine, "CACHE_ELEMENTS", cache)
        got = run(soft.soft_cluster, vectors, codebook, tau, 3, epsilon)
    assert_same_step(got, ref)


def test_windows_attend_to_few_centroids_and_match_reference():
    gen = torch.Generator().manual_seed(1)
    vectors = torch.randn(20_000, 1, generator=gen, dtype=torch.float64) * 0.05
    codebook, tau, epsilon = realistic_start(vectors, 64)
    budget = 1 << 14  # chunks of 20,000 rows' data as small as those of a million-weight layer
    order = _engine._value_order(vectors[:, 0])
    plan = _engine._window_plan(vectors[order, 0], codebook, tau, budget)
    assert _engine._plan_size(plan, 64) < 0.25 * 20_000 * 64
    ref = run(soft.soft_cluster_reference, vectors, codebook, tau, 5, epsilon)
    got = run(soft.soft_cluster, vectors, codebook, tau, 5, epsilon, chunk_elements=budget)
    assert ref[2] == 5
    assert_same_step(got, ref)


@pytest.mark.parametrize(
    "dtype, output, gradient", [(torch.float64, TIGHT, TIGHT), (torch.float32, OUTPUT_32, GRADIENT_32)]
)
@pytest.mark.parametrize("b, settled", [(4, False), (4, True), (6, False)])
def test_narrow_chunks_written_around_their_middle_match_reference(dtype, output, gradient, b, settled):
    # narrow chunks (most of a layer's) take the matmul form around their middle value,
    # wide ones (the tails) the exact differences: both within the tolerances
    gen = torch.Generator().manual_seed(7)
    vectors = (torch.randn(40_000, 1, generator=gen) * 0.05).to(dtype)
    codebook, tau, epsilon = realistic_start(vectors, 1 << b)
    if settled:
        codebook, _ = soft.settle(vectors, codebook, tau, 300, epsilon / 4)
    budget = 1 << 14
    plan = _engine._window_plan(vectors[_engine._value_order(vectors[:, 0]), 0], codebook, tau, budget)
    narrow = [chunk for chunk in plan if chunk.centre is not None]
    assert 0 < len(narrow) < len(plan)
    assert all(abs(chunk.centre) < float(vectors.abs().max()) for chunk in narrow)
    ref = run(soft.soft_cluster_reference, vectors, codebook, tau, 4, epsilon)
    got = run(soft.soft_cluster, vectors, codebook, tau, 4, epsilon, chunk_elements=budget)
    assert got[2] == ref[2]
    assert_near(got[0], ref[0], output)
    assert_near(got[1], ref[1], output)
    assert_near(got[3], ref[3], gradient)


@pytest.mark.parametrize("d, b", [(1, 4), (1, 2), (2, 4)])
def test_autocast_changes_nothing(d, b):
    # under a caller's bfloat16 autocast the engine's matmuls still run in float32
    gen = torch.Generator().manual_seed(9)
    vectors = torch.randn(20_000 // d, d, generator=gen) * 0.05
    problem = (vectors, *realistic_start(vectors, 1 << b)[:2], 3, 0.0)
    plain = run(soft.soft_cluster, *problem)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = run(soft.soft_cluster, *problem)
    assert plain[2] == cast[2]
    for a, c in zip(plain[:2] + plain[3:], cast[:2] + cast[3:]):
        assert c.dtype == torch.float32 and torch.equal(a, c)


def test_scratch_blocks_are_reused_and_change_nothing():
    # temporaries come from buffers kept from call to call: a call between two identical
    # ones (another shape, another dtype) leaves their results bitwise equal
    gen = torch.Generator().manual_seed(8)
    first = torch.randn(30_000, 1, generator=gen) * 0.05
    other = torch.randn(5_000, 2, generator=gen, dtype=torch.float64)
    problem = (first, *realistic_start(first, 16)[:2], 3, 0.0)
    before = run(soft.soft_cluster, *problem)
    pool = dict(_engine._LOCAL.pool)
    run(soft.soft_cluster, other, *realistic_start(other, 8)[:2], 3, 0.0)
    run(soft.soft_cluster, first[:777], *realistic_start(first[:777], 4)[:2], 3, 0.0)
    after = run(soft.soft_cluster, *problem)
    assert before[2] == after[2] and all(
        torch.equal(a, b) for a, b in zip(before[:2] + before[3:], after[:2] + after[3:])
    )
    kept = [key for key in pool if key[2] == torch.float32]
    assert kept and all(_engine._LOCAL.pool[key] is pool[key] for key in kept)  # not allocated again
    assert all(buffer.numel() <= _engine.CHUNK_ELEMENTS for buffer in _engine._LOCAL.pool.values())


@given(problem=problems(), seed=seeds)
def test_any_kept_order_changes_nothing_but_speed(problem, seed):
    # an order kept from other weights (here: any permutation) still gives the same step
    vectors = problem[0]
    cache = soft.OrderCache()
    cache.update(torch.randperm(len(vectors), generator=torch.Generator().manual_seed(seed)), 1 << 40, fresh=True)
    assert cache.take(len(vectors), vectors.device) is not None
    kept = run(soft.soft_cluster, *problem, order_cache=cache)
    assert_same_step(kept, run(soft.soft_cluster, *problem))


def test_order_cache_is_reused_then_sorted_anew_when_it_costs_too_much():
    gen = torch.Generator().manual_seed(5)
    vectors = torch.randn(50_000, 1, generator=gen) * 0.05
    codebook, tau, epsilon = realistic_start(vectors, 16)
    cache = soft.OrderCache()
    soft.soft_cluster(vectors, codebook, tau, 2, epsilon, order_cache=cache)
    fresh = cache.order
    assert cache.order.dtype == torch.int32 and not cache.stale
    assert torch.equal(fresh.long(), _engine._value_order(vectors[:, 0]))
    moved = vectors + 1e-4 * torch.randn(vectors.shape, generator=gen)  # a training step's worth
    soft.soft_cluster(moved, codebook, tau, 2, epsilon, order_cache=cache)
    assert cache.order is fresh and not cache.stale  # reused, still good
    shuffled = vectors[torch.randperm(len(vectors), generator=gen)]  # the old order groups nothing
    soft.soft_cluster(shuffled, codebook, tau, 2, epsilon, order_cache=cache)
    assert cache.stale
    soft.soft_cluster(shuffled, codebook, tau, 2, epsilon, order_cache=cache)
    assert not cache.stale and torch.equal(cache.order.long(), _engine._value_order(shuffled[:, 0]))
    # an order for another length or device is never used
    assert cache.take(49_999, vectors.device) is None


def test_light_cluster_attends_to_every_vector():
    # a centroid far out in the tail: no window reaches it, yet its tiny mass moves it in
    # the reference, so it must attend to every vector, exactly
    gen = torch.Generator().manual_seed(2)
    vectors = torch.randn(5000, 1, generator=gen, dtype=torch.float64)
    codebook, tau, _ = realistic_start(vectors, 16)
    codebook[0] = vectors.max() + 12 * tau**0.5
    budget = 1 << 12
    rows = vectors[_engine._value_order(vectors[:, 0]), 0][None]
    windowed, _, _ = _engine._centroid_stats(
        rows, codebook, tau, _engine._window_plan(rows[0], codebook, tau, budget), False
    )
    assert windowed[0] == 0
    ref = run(soft.soft_cluster_reference, vectors, codebook, tau, 4, 0.0)
    got = run(soft.soft_cluster, vectors, codebook, tau, 4, 0.0, chunk_elements=budget)
    assert 0 < ref[1][0, 0] < codebook[0, 0]  # it moved, by a tiny mass's pull
    assert_same_step(got, ref)


@pytest.mark.parametrize("d", [1, 2, 4])
def test_cluster_with_zero_mass_keeps_its_centroid(d):
    gen = torch.Generator().manual_seed(3)
    vectors = torch.randn(500, d, generator=gen, dtype=torch.float64)
    codebook, tau, _ = realistic_start(vectors, 8)
    codebook[3] = 1e6  # exp(-1e12 / tau) is exactly zero
    ref = run(soft.soft_cluster_reference, vectors, codebook, tau, 3, 0.0)
    got = run(soft.soft_cluster, vectors, codebook, tau, 3, 0.0)
    assert torch.equal(got[1][3], codebook[3]) and torch.equal(ref[1][3], codebook[3])
    assert torch.isfinite(got[3]).all()
    assert_same_step(got, ref)


@pytest.mark.parametrize("d", [1, 4])
def test_epsilon_stops_the_iterations_early(d):
    gen = torch.Generator().manual_seed(4)
    vectors = torch.randn(2000, d, generator=gen, dtype=torch.float64)
    codebook, tau, epsilon = realistic_start(vectors, 16)
    _, warm, _ = soft.soft_cluster_reference(vectors, codebook, tau, 30, 0.0)
    step = soft.centroid_update(vectors, soft.attention(vectors, warm, tau), warm)
    settled = 2 * float((step - warm).abs().max())  # the warm start moves less than this
    cases = [(warm, settled, 1), (codebook, float("inf"), 1), (codebook, 0.0, 7), (codebook, epsilon, None)]
    for start, eps, expect in cases:
        ref = run(soft.soft_cluster_reference, vectors, start, tau, 7, eps)
        got = run(soft.soft_cluster, vectors, start, tau, 7, eps)
        assert ref[2] == (expect or ref[2])
        assert_same_step(got, ref)


@pytest.mark.parametrize("d, b", [(1, 8), (1, 4), (2, 6), (4, 4)])
def test_autograd_keeps_nothing_of_size_n_k(d, b):
    n, k, max_iter = 4096, 1 << b, 5
    gen = torch.Generator().manual_seed(5)
    vectors = torch.randn(n, d, generator=gen, requires_grad=True)
    codebook, tau, _ = realistic_start(vectors.detach(), k)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out, _, iterations = soft.soft_cluster(vectors, codebook, tau, max_iter, 0.0)
    assert iterations == max_iter
    # the vectors, their order and each iteration's codebook and masses
    assert sum(saved) <= n * d + n + (max_iter + 1) * k * d + max_iter * k
    assert sum(saved) < n * k / 2
    out.sum().backward()
    assert torch.isfinite(vectors.grad).all()
    reference = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: reference.append(t.numel()) or t, lambda t: t):
        soft.soft_cluster_reference(vectors, codebook, tau, max_iter, 0.0)
    assert sum(reference) > max_iter * n * k  # the hooks do see what the plain unrolling keeps


def test_codebook_gets_no_gradient_and_is_returned_detached():
    gen = torch.Generator().manual_seed(6)
    vectors = torch.randn(300, 1, generator=gen, requires_grad=True)
    codebook, tau, epsilon = realistic_start(vectors.detach(), 4)
    codebook.requires_grad_(True)
    out, final, _ = soft.soft_cluster(vectors, codebook, tau, 3, epsilon)
    assert not final.requires_grad
    out.sum().backward()
    assert codebook.grad is None and vectors.grad is not None


def test_max_iter_below_one_is_an_error():
    with pytest.raises(ValueError, match="max_iter"):
        soft.soft_cluster(torch.zeros(4, 1), torch.zeros(2, 1), 1.0, 0, 0.0)


@given(values=st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=1, max_size=300))
def test_value_order_sorts_up_to_a_bucket(values):
    tensor = torch.tensor(values, dtype=torch.float32)
    ordered = tensor[_engine._value_order(tensor)].double()
    width = (ordered.max() - ordered.min()) / _engine._BUCKETS
    assert (ordered.cummax(0).values - ordered).max() <= width * 1.01


@pytest.mark.parametrize("d, n", [(1, 200_000), (1, 3000), (2, 60_000)])
def test_settle_starts_training_at_the_soft_fixed_point(d, n):
    # from a hard k-means++ seed the out iterations take many steps to settle;
    # after settle a full-data step on the same weights stops after one iteration
    gen = torch.Generator().manual_seed(4)
    vectors = torch.randn(n, d, generator=gen) * 0.05
    codebook, tau, epsilon = realistic_start(vectors, 16)
    assert soft.soft_cluster(vectors, codebook, tau, 5, epsilon)[2] == 5
    settled, iterations = soft.settle(vectors, codebook, tau, 500, epsilon / 4)
    assert 5 < iterations < 500
    if d == 1:  # the histogram stands for the data to well within epsilon
        assert soft.soft_cluster(vectors, settled, tau, 5, epsilon)[2] == 1
    else:  # a sample: the rest is sampling noise, far below the seed's distance
        _, after, _ = soft.soft_cluster(vectors, settled, tau, 1, 0.0)
        _, before, _ = soft.soft_cluster(vectors, codebook, tau, 1, 0.0)
        assert (after - settled).abs().max() < 0.2 * (before - codebook).abs().max()


@given(values=weights(max_vectors=3000), points=st.sampled_from([1, 7, 100, 1 << 14]), seed=seeds)
def test_summary_keeps_count_mean_and_range(values, points, seed):
    weight, d = values
    vectors = weight.reshape(-1, d).double()
    summary, counts = _engine._summary(vectors, points, seed)
    assert summary.shape[1] == d and summary.shape[0] == counts.shape[0] <= max(points, 1)
    assert (counts > 0).all()
    low, high = vectors.min(0).values, vectors.max(0).values
    assert ((summary >= low) & (summary <= high)).all()
    if d == 1 or len(vectors) <= points:  # bins (or the vectors themselves) keep every vector
        assert counts.sum() == len(vectors)
        mean = (summary * counts[:, None]).sum(0) / counts.sum()
        assert torch.allclose(mean, vectors.mean(0), rtol=1e-9, atol=1e-12 * float(vectors.abs().max()))
    else:  # a sample of distinct rows, the same for the same seed
        again, _ = _engine._summary(vectors, points, seed)
        assert torch.equal(summary, again)
        assert all((vectors == row).all(1).any() for row in summary)


@given(seed=seeds, distinct=st.integers(2, 400), repeats=st.integers(1, 60), b=st.integers(1, 4))
def test_settling_distinct_values_with_counts_is_settling_the_values(seed, distinct, repeats, b):
    # what registration does for a half-precision weight: its distinct values, weighted by their counts
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(distinct, generator=gen, dtype=torch.float64)
    counts = torch.randint(1, repeats + 1, (distinct,), generator=gen).double()
    expanded = values.repeat_interleave(counts.long())[:, None]
    codebook, tau, epsilon = realistic_start(expanded, 1 << b)
    want, want_iterations = soft.settle(expanded, codebook, tau, 50, epsilon)
    points, weights = soft.summary(values[:, None], counts=counts)
    got, iterations = soft.settle(points, codebook, tau, 50, epsilon, counts=weights)
    if expanded.shape[0] <= soft.SETTLE_POINTS:  # the same points either way: the same iterations
        assert iterations == want_iterations
        torch.testing.assert_close(got, want, rtol=0, atol=1e-9 * float(values.abs().max()))
    assert float(weights.sum()) == expanded.shape[0]


def test_settle_counts_weigh_one_dimension_only():
    with pytest.raises(ValueError, match="one-dimensional"):
        soft.settle(torch.zeros(4, 2), torch.zeros(2, 2), 1.0, 5, 0.0, counts=torch.ones(4))


@given(problem=problems(realistic=True))
def test_settle_keeps_centroids_finite_and_inside_the_data(problem):
    vectors, codebook, tau, _, epsilon = problem
    settled, iterations = soft.settle(vectors, codebook, tau, 50, epsilon)
    assert settled.shape == codebook.shape and 1 <= iterations <= 50
    low, high = vectors.min(0).values, vectors.max(0).values
    slack = 1e-9 * float((high - low).abs().max().clamp_min(1e-300))
    assert torch.isfinite(settled).all()
    assert ((settled >= low - slack) & (settled <= high + slack)).all()
