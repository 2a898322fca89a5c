"""DKM by value table (``table.table_cluster``) against the plain unrolled reference.

The reference runs on the half-precision weight cast to float32. Tolerances,
relative to the largest magnitude of the reference's tensor: the final
codebook (float32) within float32's ``OUTPUT_32``; the soft values and the
gradient, returned in the weight's dtype, within that dtype's rounding
(``eps``) on top of float32's tolerances. Iteration counts are equal.
"""

import os

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from test_soft import GRADIENT_32, OUTPUT_32, assert_near, realistic_start, well_posed

from dkm_param.ops import native, soft, table
from strategies import bits, seeds, weights

HALF = st.sampled_from([torch.bfloat16, torch.float16])


@pytest.fixture(autouse=True, scope="module", params=["compiled", "torch"])
def passes(request):
    """Every test here runs on both kinds of pass over the weight: the compiled loops
    (``ops.native``) and the torch operations (a GPU's, and a machine's with no C compiler)."""
    before = os.environ.get("DKM_PARAM_NATIVE")
    os.environ["DKM_PARAM_NATIVE"] = "1" if request.param == "compiled" else "0"
    try:
        if request.param == "compiled" and not native.available():
            pytest.skip("no C compiler here: the torch operations run")
        yield request.param
    finally:
        if before is None:
            del os.environ["DKM_PARAM_NATIVE"]
        else:
            os.environ["DKM_PARAM_NATIVE"] = before


@st.composite
def problems(draw):
    """(values (n,) half, codebook (k, 1) float32, tau, max_iter, epsilon)."""
    dtype, k = draw(HALF), 1 << draw(bits)
    weight, _ = draw(weights(min_vectors=1, max_vectors=max(1, min(300, 20_000 // k)), dim=1))
    values = weight.reshape(-1).to(dtype)
    assume(torch.isfinite(values).all())
    as_float = values.float()[:, None]
    codebook, tau, epsilon = realistic_start(as_float, k, draw(seeds))
    if draw(st.booleans()):  # a warm start
        _, codebook, _ = soft.soft_cluster_reference(as_float, codebook, tau, 20, 0.0)
    tau *= draw(st.sampled_from([0.1, 1.0, 10.0]))
    size = float(as_float.abs().max().clamp_min(1e-30))
    least = 1e3 * torch.finfo(torch.float32).eps * size
    epsilon = draw(st.sampled_from([least, max(epsilon, least), 0.1 * size]))
    problem = values, codebook, tau, draw(st.integers(1, 6)), epsilon
    assume(well_posed(as_float, *problem[1:]))
    return problem


def run(fn, values, codebook, tau, max_iter, epsilon, dtype=None):
    """(out, final codebook, iterations, gradient of sum(out * g) for a fixed random g
    rounded to ``dtype``, by default the values')."""
    values = values.detach().clone().requires_grad_(True)
    out, final, iterations = fn(values, codebook.clone(), tau, max_iter, epsilon)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(out.device, dtype or values.dtype)
    (out.float() * upstream.float()).sum().backward()
    return out.detach(), final, iterations, values.grad


def by_reference(values, codebook, tau, max_iter, epsilon):
    out, final, iterations = soft.soft_cluster_reference(values.float()[:, None], codebook, tau, max_iter, epsilon)
    return out[:, 0], final, iterations


@given(problem=problems())
def test_table_matches_reference(problem):
    dtype = problem[0].dtype
    ref = run(by_reference, problem[0].float(), *problem[1:], dtype=dtype)
    assume(all(torch.isfinite(t).all() for t in (ref[0], ref[1], ref[3])))
    got = run(table.table_cluster, *problem)
    rounding = torch.finfo(dtype).eps
    assert got[0].dtype == got[3].dtype == dtype
    assert got[2] == ref[2]
    assert_near(got[1], ref[1], OUTPUT_32)
    assert_near_rounded(got[0], ref[0], OUTPUT_32 + rounding)
    assert_near_rounded(got[3], ref[3], GRADIENT_32 + rounding)


def assert_near_rounded(got, want, tolerance):
    """``assert_near`` for a result rounded to a half-precision dtype, whose subnormals
    are one step of ``smallest_normal * eps`` apart whatever their size."""
    finfo = torch.finfo(got.dtype)
    scale = want.abs().max().item() if want.numel() else 0.0
    step = finfo.smallest_normal * finfo.eps
    torch.testing.assert_close(got.float(), want, rtol=0.0, atol=tolerance * scale + step)


@given(problem=problems())
def test_no_grad_gives_the_same_result(problem):
    values, codebook, tau, max_iter, epsilon = problem
    with torch.no_grad():
        out, final, iterations = table.table_cluster(values, codebook, tau, max_iter, epsilon)
    got = run(table.table_cluster, *problem)
    assert iterations == got[2] and torch.equal(out, got[0]) and torch.equal(final, got[1])


@given(dtype=HALF, seed=seeds, n=st.integers(0, 3000))
def test_codes_index_the_table_of_every_value_and_counts_add_up(dtype, seed, n):
    gen = torch.Generator().manual_seed(seed)
    values = (torch.randn(n, generator=gen) * 10.0 ** torch.randint(-6, 3, (n,), generator=gen)).to(dtype)
    values = values[torch.isfinite(values)]
    codes = table.value_codes(values)
    assert codes.dtype == torch.int32 and bool(((codes >= 0) & (codes < table.TABLE_SIZE)).all())
    looked = table.value_table(dtype, values.device)[codes.long()].to(dtype)
    assert torch.equal(looked.view(torch.int16), values.view(torch.int16))  # bit for bit, -0.0 included
    counts = table.value_counts(values)
    assert float(counts.sum()) == values.numel()
    half = values.numel() // 2
    assert torch.equal(table.value_counts(values[:half]) + table.value_counts(values[half:]), counts)
    distinct = torch.unique(values.view(torch.int16)).numel()
    assert int((counts > 0).sum()) == distinct


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_passes_write_into_buffers_kept_from_call_to_call(dtype, monkeypatch):
    monkeypatch.setattr(table, "_PASS", 1000)  # several passes, the last a short one
    values = (torch.randn(4500, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype).requires_grad_()
    codebook, tau, _ = realistic_start(values.detach().float()[:, None], 8)
    grid = None if dtype != torch.float32 else table.value_grid(*torch.aminmax(values.detach()))
    runs = []
    for mode in (torch.no_grad, torch.inference_mode, torch.enable_grad):  # buffers made in one serve the others
        with mode():
            counts = table.value_counts(values.detach(), grid)
            out, _, _ = table.table_cluster(values, codebook, tau, 3, 0.0, counts=counts, grid=grid)
        runs.append((counts.clone(), out.detach().clone()))
    codes = table._codes(1000, values.device)
    out.float().pow(2).sum().backward()
    assert table._codes(1000, values.device).data_ptr() == codes.data_ptr()  # reused, not made again
    # the passes give what one pass over everything gives
    monkeypatch.setattr(table, "_PASS", 1 << 19)
    whole = values.detach().clone().requires_grad_()
    alone, _, _ = table.table_cluster(whole, codebook, tau, 3, 0.0, counts=table.value_counts(whole.detach(), grid),
                                      grid=grid)
    alone.float().pow(2).sum().backward()
    for counts, soft_values in runs:
        assert torch.equal(counts, runs[0][0]) and torch.equal(soft_values, alone.detach())
    assert torch.allclose(values.grad.float(), whole.grad.float(), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("dtype, b", [(torch.bfloat16, 4), (torch.bfloat16, 8), (torch.float16, 3), (torch.float32, 4)])
def test_autograd_keeps_the_weight_and_tables_only(dtype, b):
    n, k, max_iter = 50_000, 1 << b, 5
    values = (torch.randn(n, generator=torch.Generator().manual_seed(1)) * 0.02).to(dtype).requires_grad_()
    codebook, tau, _ = realistic_start(values.detach().float()[:, None], k)
    saved = []

    def pack(tensor):
        saved.append(0 if tensor is values else tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _, iterations = table.table_cluster(values, codebook, tau, max_iter, 0.0)
    assert iterations == max_iter
    grid = table.value_grid(*torch.aminmax(values.detach())) if dtype == torch.float32 else None
    distinct = int((table.value_counts(values.detach(), grid) > 0).sum())
    assert sum(saved) <= 2 * distinct + 2 * k  # entries present, their counts, the first and last codebooks
    out.float().sum().backward()
    assert values.grad.dtype == dtype and torch.isfinite(values.grad).all()


def test_a_value_held_by_many_weights_gets_each_its_share():
    # dL/dw_i = g_i a_v + (codebook path)/c_v: moving one weight of a repeated value
    # moves the codebooks by 1/c_v of moving them all; checked by finite differences in float64
    values = torch.tensor([-1.0, -1.0, -1.0, -0.5, 0.25, 0.5, 0.5, 1.0], dtype=torch.bfloat16)
    codebook = torch.tensor([[-0.8], [0.7]])
    tau, upstream = 0.3, torch.tensor([1.0, -2.0, 0.5, 1.0, -1.0, 3.0, 0.25, 1.0])
    leaf = values.clone().requires_grad_()
    out, _, _ = table.table_cluster(leaf, codebook, tau, 3, 0.0)
    (out.float() * upstream).sum().backward()

    def loss(as_double):
        out, _, _ = soft.soft_cluster_reference(as_double[:, None], codebook.double(), tau, 3, 0.0)
        return float((out[:, 0] * upstream.double()).sum())

    step = 1e-6
    for i in range(values.numel()):
        up, down = values.double().clone(), values.double().clone()
        up[i] += step
        down[i] -= step
        numeric = (loss(up) - loss(down)) / (2 * step)
        assert abs(float(leaf.grad[i]) - numeric) <= 1e-2 * abs(numeric) + 1e-3


def test_other_dtypes_and_max_iter_below_one_are_errors():
    with pytest.raises(ValueError, match="bfloat16, float16 or float32"):
        table.table_cluster(torch.zeros(4, dtype=torch.float64), torch.zeros(2, 1), 1.0, 3, 0.0)
    with pytest.raises(ValueError, match="max_iter"):
        table.table_cluster(torch.zeros(4, dtype=torch.bfloat16), torch.zeros(2, 1), 1.0, 0, 0.0)


# float32 weights: on a grid of points between their extremes, taken to first order


def on_finest_grid(values, codebook, tau, max_iter, epsilon):
    """``table_cluster`` on the first grid fine enough, as the parametrization runs it; None if none is."""
    size = table.GRID_SIZES[0]
    while size is not None:
        try:
            grid = table.value_grid(*torch.aminmax(values.detach()), size)
            return table.table_cluster(values, codebook, tau, max_iter, epsilon, grid=grid)
        except table.GridTooCoarse as coarse:
            assert coarse.size is None or coarse.size > size
            size = coarse.size
    return None


def heavy_tailed(n, seed, freedom=4):
    """Student's t with ``freedom`` degrees of freedom times 0.02, as trained weights spread."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen) / torch.randn(freedom, n, generator=gen).square().mean(0).sqrt() * 0.02


@given(seed=seeds, n=st.integers(1, 3000), scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e30]),
       size=st.sampled_from(table.GRID_SIZES))
def test_float32_codes_land_on_the_nearest_grid_point_and_counts_add_up(seed, n, scale, size):
    values = heavy_tailed(n, seed) * scale
    grid = table.value_grid(*torch.aminmax(values), size)
    codes = table.value_codes(values, grid)
    assert codes.dtype == torch.int32 and bool(((codes >= 0) & (codes < size)).all())
    points = table.value_table(torch.float32, values.device, grid)
    assert points.shape == (size,) and bool((points[1:] >= points[:-1]).all())
    # within half a step, up to float32's rounding of the values and the points
    slack = 0.5 * float(grid.step) * (1 + 1e-3) + 4 * torch.finfo(torch.float32).eps * float(values.abs().max())
    assert float((points[codes.long()] - values).abs().max()) <= slack
    counts = table.value_counts(values, grid)
    assert counts.shape == (size,) and float(counts.sum()) == n
    half = n // 2
    assert torch.equal(table.value_counts(values[:half], grid) + table.value_counts(values[half:], grid), counts)


@pytest.mark.parametrize("freedom", [4, 1000])  # heavy tails, and nearly Gaussian
@pytest.mark.parametrize("b", [2, 3, 4, 6])
def test_float32_on_a_grid_stays_near_the_exact_reference(freedom, b):
    values = heavy_tailed(100_000, b, freedom)
    codebook, tau, epsilon = realistic_start(values[:, None], 1 << b)
    _, codebook, _ = soft.soft_cluster_reference(values[:, None], codebook, tau, 10, 0.0)  # warm
    ref = run(by_reference, values, codebook, tau, 2, 0.0)
    got = run(on_finest_grid, values, codebook, tau, 2, 0.0)
    assert got[0].dtype == got[3].dtype == torch.float32 and got[2] == ref[2]
    span = float(codebook.max() - codebook.min())
    assert float((got[1] - ref[1]).detach().abs().max()) <= 1e-3 * span
    assert float((got[0] - ref[0]).abs().max()) <= 2e-3 * span
    assert float((got[3] - ref[3]).norm() / ref[3].norm()) <= 1e-2


@given(problem=problems())
def test_float32_on_a_grid_fine_enough_is_near_the_reference(problem):
    values = problem[0].float()
    _, codebook, tau, max_iter, _ = problem
    # no grid fine enough: the parametrization takes the float32 engine
    assume(on_finest_grid(values, codebook.clone(), tau, max_iter, 0.0) is not None)
    got = run(on_finest_grid, values, codebook, tau, max_iter, 0.0)
    ref = run(by_reference, values, codebook, tau, max_iter, 0.0)
    assume(all(torch.isfinite(t).all() for t in (ref[0], ref[1], ref[3])))
    scale = float(values.abs().max())
    assert float((got[1] - ref[1]).abs().max()) <= 1e-2 * scale
    assert float((got[0] - ref[0]).abs().max()) <= 1e-2 * scale
    assert torch.isfinite(got[3]).all()


def test_a_grid_too_coarse_for_the_temperature_is_refused_with_the_size_needed():
    values = heavy_tailed(20_000, 0)
    codebook, tau, _ = realistic_start(values[:, None], 16)
    grid = table.value_grid(*torch.aminmax(values))
    table.table_cluster(values, codebook, tau, 2, 0.0, grid=grid)  # fine at the usual temperature
    with pytest.raises(table.GridTooCoarse) as sharper:
        table.table_cluster(values.requires_grad_(), codebook, tau / 50, 2, 0.0, grid=grid)
    assert table.GRID_SIZES[0] < sharper.value.size <= table.GRID_SIZES[1]
    with pytest.raises(table.GridTooCoarse) as hopeless:
        table.table_cluster(values, codebook, tau * 1e-8, 2, 0.0, grid=grid)
    assert hopeless.value.size is None


@given(seed=seeds, b=st.integers(1, 8), freedom=st.sampled_from([2, 4, 1000]), sharper=st.sampled_from([1, 0.1, 0.01]))
def test_a_grid_of_grid_sizes_points_passes_the_starting_check_that_sized_skips(seed, b, freedom, sharper):
    """``sized=True`` (the parametrization's grids) skips the check of the starting centroids: a
    grid of ``grid_size``'s points always passes it, and the results are those of the check."""
    values = heavy_tailed(5_000, seed, freedom)
    codebook, tau, _ = realistic_start(values[:, None], 1 << b, seed)
    tau *= sharper
    low, high = torch.aminmax(values)
    size = table.grid_size(low, high, codebook, tau)
    assume(size is not None)
    grid = table.value_grid(low, high, size)
    present, points, _ = table.distinct_values(torch.float32, table.value_counts(values, grid), grid)
    assert float(table._fineness(grid, codebook[:, 0], tau, points)) <= table.GRID_TOLERANCE
    runs = []
    for sized in (False, True):
        try:
            runs.append(table.table_cluster(values, codebook, tau, 3, 0.0, grid=grid, sized=sized))
        except table.GridTooCoarse as coarse:  # the iterations moved the centroids: refused either way
            runs.append(coarse.size)
    if isinstance(runs[0], int) or runs[0] is None:
        assert runs[1] == runs[0]
    else:
        assert all(torch.equal(got, want) for got, want in zip(runs[0][:2], runs[1][:2])) and runs[0][2] == runs[1][2]
