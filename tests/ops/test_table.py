"""DKM by value table (``table.table_cluster``) against the plain unrolled reference.

The reference runs on the half-precision weight cast to float32. Tolerances,
relative to the largest magnitude of the reference's tensor: the final
codebook (float32) within float32's ``OUTPUT_32``; the soft values and the
gradient, returned in the weight's dtype, within that dtype's rounding
(``eps``) on top of float32's tolerances. Iteration counts are equal.
"""

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from test_soft import GRADIENT_32, OUTPUT_32, assert_near, realistic_start, well_posed

from dkm_param.ops import soft, table
from strategies import bits, seeds, weights

HALF = st.sampled_from([torch.bfloat16, torch.float16])


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
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(dtype or values.dtype)
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
    assert_near(got[0].float(), ref[0], OUTPUT_32 + rounding)
    assert_near(got[3].float(), ref[3], GRADIENT_32 + rounding)


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


@pytest.mark.parametrize("dtype, b", [(torch.bfloat16, 4), (torch.bfloat16, 8), (torch.float16, 3)])
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
    distinct = int((table.value_counts(values.detach()) > 0).sum())
    assert sum(saved) <= 2 * distinct + k  # patterns present, their counts, the first codebook
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
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        table.table_cluster(torch.zeros(4), torch.zeros(2, 1), 1.0, 3, 0.0)
    with pytest.raises(ValueError, match="max_iter"):
        table.table_cluster(torch.zeros(4, dtype=torch.bfloat16), torch.zeros(2, 1), 1.0, 0, 0.0)
