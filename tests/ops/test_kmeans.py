import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dkm_param.ops import kmeans
from strategies import dims, seeds


@given(n=st.integers(1, 300), k=st.integers(1, 40), d=dims, seed=seeds)
def test_nearest_matches_exhaustive_argmin(n, k, d, seed):
    gen = torch.Generator().manual_seed(seed)
    vectors = torch.randn(n, d, generator=gen, dtype=torch.float64)
    codebook = torch.randn(k, d, generator=gen, dtype=torch.float64)
    got = kmeans.nearest(vectors, codebook)
    dist = (vectors[:, None] - codebook[None]).pow(2).sum(-1)
    best = dist.min(1).values
    assert torch.allclose(dist.gather(1, got[:, None])[:, 0], best, rtol=0, atol=1e-12)


def test_nearest_chunks_large_inputs(monkeypatch):
    monkeypatch.setattr(kmeans, "_PAIRS_PER_CHUNK", 64)
    gen = torch.Generator().manual_seed(0)
    vectors, codebook = torch.randn(1001, 3, generator=gen), torch.randn(16, 3, generator=gen)
    expect = torch.cdist(vectors, codebook).argmin(1)
    assert torch.equal(kmeans.nearest(vectors, codebook), expect)


@given(method=st.sampled_from(["kmeans++", "linear", "quantile"]), d=dims, k=st.sampled_from([2, 4, 16]), seed=seeds)
def test_init_codebook_lies_inside_the_data_range(method, d, k, seed):
    gen = torch.Generator().manual_seed(seed)
    vectors = torch.randn(200, d, generator=gen) * 3 + 1
    codebook = kmeans.init_codebook(vectors, k, method, seed)
    assert codebook.shape == (k, d)
    assert (codebook >= vectors.min(0).values - 1e-6).all() and (codebook <= vectors.max(0).values + 1e-6).all()


def test_init_codebook_is_repeatable_and_leaves_global_rng_alone():
    vectors = torch.randn(5000, 1)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = kmeans.init_codebook(vectors, 16, "kmeans++", seed=3)
    after = torch.rand(1)
    b = kmeans.init_codebook(vectors, 16, "kmeans++", seed=3)
    assert torch.equal(a, b) and torch.equal(before, after)


def test_lloyd_lowers_the_clustering_error():
    vectors = torch.randn(2000, 2)
    start = vectors[:8].clone()
    refined = kmeans.lloyd(vectors, start, 20)
    err = lambda c: kmeans.squared_distance_to_nearest(vectors, c).mean()  # noqa: E731
    assert err(refined) < err(start)


def brute_force_1d(values, k):
    import itertools

    xs = torch.sort(values.double()).values
    n = xs.numel()
    best = float("inf")
    for cuts in itertools.combinations(range(1, n), k - 1):
        edges = (0, *cuts, n)
        best = min(best, sum(float(((xs[a:b] - xs[a:b].mean()) ** 2).sum()) for a, b in zip(edges, edges[1:])))
    return best


@given(n=st.integers(4, 11), k=st.integers(2, 4), seed=seeds)
def test_optimal_1d_matches_brute_force(n, k, seed):
    values = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    centroids, inertia = kmeans.kmeans_1d_optimal(values, k)
    assert abs(inertia - brute_force_1d(values, k)) <= 1e-9 * max(1.0, inertia)
    assert torch.all(centroids[1:] >= centroids[:-1])


@given(n=st.integers(20, 400), k=st.sampled_from([2, 4, 8, 16]), seed=seeds)
def test_fast_1d_is_a_lloyd_fixed_point_never_better_than_optimal(n, k, seed):
    values = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    centroids, inertia = kmeans.kmeans_1d(values, k)
    _, best = kmeans.kmeans_1d_optimal(values, k)
    assert inertia >= best - 1e-9
    assign = kmeans.nearest(values[:, None], centroids[:, None])
    assert torch.bincount(assign, minlength=k).min() > 0  # no empty cluster
    for j in range(k):
        assert torch.isclose(values[assign == j].mean(), centroids[j], rtol=1e-9, atol=1e-12)


@given(seed=seeds, optimal=st.booleans())
def test_integer_weights_equal_repeated_values(seed, optimal):
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(60, generator=gen, dtype=torch.float64)
    counts = torch.randint(1, 4, (60,), generator=gen)
    engine = kmeans.kmeans_1d_optimal if optimal else kmeans.kmeans_1d
    _, weighted = engine(values, 4, weights=counts.double())
    _, repeated = engine(torch.repeat_interleave(values, counts), 4)
    if optimal:
        assert abs(weighted - repeated) <= 1e-9 * repeated
    else:
        assert weighted > 0 and repeated > 0


def test_fewer_distinct_values_than_clusters_is_exact():
    values = torch.tensor([0.5, -1.0, 0.5, 2.0, -1.0])
    for engine in (kmeans.kmeans_1d, kmeans.kmeans_1d_optimal):
        centroids, inertia = engine(values, 8)
        assert inertia == 0.0 and set(centroids.tolist()) == {-1.0, 0.5, 2.0} and centroids.numel() == 8
    codebook, inertia = kmeans.kmeans_vectors(torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 0.0]]), 4)
    assert inertia == 0.0 and codebook.shape == (4, 2)


@given(d=st.sampled_from([2, 4]), k=st.sampled_from([4, 16]), seed=seeds)
def test_vector_kmeans_fills_every_cluster_and_beats_its_seeding(d, k, seed):
    vectors = torch.randn(500, d, generator=torch.Generator().manual_seed(seed))
    codebook, inertia = kmeans.kmeans_vectors(vectors, k, seed=seed)
    assert torch.bincount(kmeans.nearest(vectors, codebook), minlength=k).min() > 0
    seeded = kmeans.kmeans_plusplus(vectors, k, torch.Generator().manual_seed(seed))
    assert inertia <= float(kmeans.squared_distance_to_nearest(vectors, seeded).sum()) + 1e-4


def test_empty_cluster_is_repaired_or_reported(monkeypatch):
    vectors = torch.randn(300, 2, generator=torch.Generator().manual_seed(0))
    duplicated = lambda v, k, g: v[:1].repeat(k, 1)  # noqa: E731  every seed on one point
    monkeypatch.setattr(kmeans, "kmeans_plusplus", duplicated)
    codebook, _ = kmeans.kmeans_vectors(vectors, 4)
    assert torch.bincount(kmeans.nearest(vectors, codebook), minlength=4).min() > 0
    with pytest.raises(kmeans.EmptyClusterError, match=r"clusters stayed empty after 0 repairs; use fewer bits"):
        kmeans.kmeans_vectors(vectors, 4, retries=0)


@given(
    st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=1, max_size=200),
    st.sampled_from([torch.float32, torch.float64]),
)
def test_sorting_by_integer_keys_orders_floats_as_argsort_does(values, dtype):
    tensor = torch.tensor(values, dtype=dtype)
    assert torch.equal(tensor[kmeans._ascending(tensor)], torch.sort(tensor).values)


@given(st.integers(min_value=2, max_value=16), seeds)
def test_starts_run_together_give_the_best_of_running_each_alone(k, seed):
    gen = torch.Generator().manual_seed(seed)
    values = torch.cat([torch.randn(300, generator=gen), 4 + torch.rand(40, generator=gen)])
    rows = kmeans._Rows([kmeans._Sorted(values, None)])
    starts = torch.stack([values[torch.randperm(len(values), generator=gen)[:k]].double() for _ in range(3)])
    alone = [rows.lloyd(start[None, None], 300) for start in starts]
    together = rows.lloyd(starts[None], 300)
    best = min(alone, key=lambda run: float(run[1][0]))
    assert torch.equal(together[1], best[1]) and torch.equal(together[0], best[0])


@given(st.lists(st.tuples(st.integers(1, 3000), st.integers(1, 16), st.booleans(), seeds), min_size=1, max_size=6))
def test_many_inputs_clustered_together_give_what_each_gets_alone(inputs):
    values, ks, weights, starts = [], [], [], []
    for n, k, weighted, seed in inputs:
        gen = torch.Generator().manual_seed(seed)
        # a few distinct values (the exact case), heavy tails, and a cluster far out
        each = torch.randn(n, generator=gen) ** 3 if n % 3 else torch.randint(0, 5, (n,), generator=gen).float()
        values.append(torch.cat([each, 40 + torch.rand(n // 50, generator=gen)]))
        weights.append(torch.rand(len(values[-1]), generator=gen) if weighted else None)
        ks.append(k)
        starts.append(seed)
    together = kmeans.kmeans_1d_many(values, ks, weights, starts)
    for v, k, w, seed, (centroids, error) in zip(values, ks, weights, starts, together):
        alone = kmeans.kmeans_1d(v, k, weights=w, seed=seed)
        assert torch.equal(centroids, alone[0]) and error == alone[1]
        assert centroids.shape == (k,) and not centroids.is_inference()


def test_large_inputs_batch_with_small_ones_on_their_histogram(monkeypatch):
    monkeypatch.setattr(kmeans, "_HISTOGRAM_ABOVE", 2000)
    monkeypatch.setattr(kmeans, "_BATCH_VALUES", 6000)  # two of the small ones a batch, the large one alone
    gen = torch.Generator().manual_seed(0)
    values = [torch.randn(n, generator=gen) for n in (1500, 5000, 1200, 1800)]
    together = kmeans.kmeans_1d_many(values, 8)
    for v, (centroids, error) in zip(values, together):
        alone = kmeans.kmeans_1d(v, 8)
        assert torch.equal(centroids, alone[0]) and error == alone[1]
    with pytest.raises(ValueError, match="2 inputs but 1 k"):
        kmeans.kmeans_1d_many(values[:2], [8])
