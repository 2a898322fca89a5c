import torch
from hypothesis import given
from hypothesis import strategies as st

from dkm_param import kmeans

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
