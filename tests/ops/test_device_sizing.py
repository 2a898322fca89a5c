"""The work sizing a GPU gets (few large passes and chunks, no windows, ``index_add_`` for
histograms, fresh temporaries), run here on the CPU by making ``_engine.on_host`` say
no: the results must match the CPU's sizing within float32 rounding, since only the
order of the sums differs. ``test_cuda.py`` runs the same code on a GPU where there is one.
"""

import pytest
import torch
from hypothesis import given
from test_soft import GRADIENT_32, OUTPUT_32, assert_near, realistic_start
from test_soft import run as run_soft
from test_table import problems as half_problems
from test_table import run as run_table

from devices import device_sizing
from dkm_param.ops import _engine, soft, table


def test_the_cpu_is_sized_for_the_host_and_a_gpu_is_not():
    assert _engine.on_host(torch.device("cpu"))
    assert not _engine.on_host(torch.device("cuda"))
    assert _engine.chunk_budget(torch.device("cpu")) == _engine.CHUNK_ELEMENTS
    assert _engine.chunk_budget(torch.device("cuda", 0)) == _engine.DEVICE_CHUNK_ELEMENTS


def assert_same_run(got, want, rounding=0.0):
    assert got[2] == want[2]  # iterations
    assert_near(got[0].float(), want[0].float(), OUTPUT_32 + rounding)
    assert_near(got[1], want[1], OUTPUT_32)
    assert_near(got[3].float(), want[3].float(), GRADIENT_32 + rounding)


@given(problem=half_problems())
def test_half_precision_tables_match_the_host_sizing(problem):
    eps = torch.finfo(problem[0].dtype).eps
    with device_sizing():
        got = run_table(table.table_cluster, *problem)
    want = run_table(table.table_cluster, *problem)
    assert_same_run(got, want, rounding=2 * eps)


@pytest.mark.parametrize("passes", [None, 1000])  # one pass, and several
@pytest.mark.parametrize("dtype, b", [(torch.bfloat16, 4), (torch.float32, 3), (torch.float32, 4)])
def test_tables_match_the_host_sizing_in_one_pass_or_several(dtype, b, passes, monkeypatch):
    values = (torch.randn(5000, generator=torch.Generator().manual_seed(3)) * 0.02).to(dtype)
    codebook, tau, epsilon = realistic_start(values.float()[:, None], 1 << b)
    grid = None if dtype != torch.float32 else table.value_grid(*torch.aminmax(values))

    def cluster(v, c, t, m, e):
        return table.table_cluster(v, c, t, m, e, grid=grid)

    if passes:
        monkeypatch.setattr(table, "_DEVICE_PASS", passes)
    with device_sizing():
        counts = table.value_counts(values, grid)
        got = run_table(cluster, values, codebook, tau, 3, epsilon)
    assert torch.equal(counts, table.value_counts(values, grid))  # whole numbers: exact either way
    want = run_table(cluster, values, codebook, tau, 3, epsilon)
    assert_same_run(got, want, rounding=2 * torch.finfo(dtype).eps)


# (two dimensions: one chunk on a GPU, two on the host)
@pytest.mark.parametrize("n, d, bits", [(30_000, 1, 4), (20_000, 1, 8), (40_000, 2, 4)])
@pytest.mark.parametrize("budget", [None, 40_000])  # one chunk, and several
def test_the_engine_without_windows_matches_the_host_sizing(n, d, bits, budget):
    vectors = torch.randn(n, d, generator=torch.Generator().manual_seed(5)) * 0.05
    codebook, tau, epsilon = realistic_start(vectors, 1 << bits)
    with device_sizing():
        got = run_soft(soft.soft_cluster, vectors, codebook, tau, 4, epsilon, chunk_elements=budget)
    want = run_soft(soft.soft_cluster, vectors, codebook, tau, 4, epsilon, chunk_elements=budget)
    assert_same_run(got, want)


@pytest.mark.parametrize("seed", [0, 1])
def test_settling_matches_the_host_sizing(seed):
    # 256 centroids over settle's 16,384 points: windows on the host, one dense chunk on a GPU
    vectors = torch.randn(40_000, 1, generator=torch.Generator().manual_seed(seed)) * 0.05
    codebook, tau, epsilon = realistic_start(vectors, 256, seed)
    with device_sizing():
        got = soft.settle(vectors, codebook, tau, 12, epsilon / 4)
    want = soft.settle(vectors, codebook, tau, 12, epsilon / 4)
    assert got[1] == want[1]
    assert_near(got[0], want[0], OUTPUT_32)


def test_a_gpu_plans_no_windows_and_counts_without_bincount(monkeypatch):
    def refused(*args, **kwargs):
        raise AssertionError("a path sized for the host was taken")

    monkeypatch.setattr(_engine, "_window_plan", refused)  # host-side planning a GPU would wait on
    monkeypatch.setattr(torch, "bincount", refused)  # a host sync per call on a GPU
    vectors = torch.randn(30_000, 1, generator=torch.Generator().manual_seed(2)) * 0.05
    codebook, tau, epsilon = realistic_start(vectors, 16)
    values = vectors[:, 0].bfloat16()
    with device_sizing():
        run_soft(soft.soft_cluster, vectors, codebook, tau, 4, epsilon)
        run_table(table.table_cluster, values, codebook, tau, 4, epsilon)
    monkeypatch.setenv("DKM_PARAM_NATIVE", "0")  # the host's torch operations, not its compiled passes
    with pytest.raises(AssertionError, match="sized for the host"):
        table.value_counts(values)


def test_a_value_held_more_than_two_to_the_24_times_is_counted_exactly():
    values = torch.zeros((1 << 24) + (1 << 21), dtype=torch.bfloat16)  # float32 adding ones stops at 2**24
    values[:3] = 1.0
    with device_sizing():
        counts = table.value_counts(values)
    assert torch.equal(counts, table.value_counts(values))
    assert counts.max() == (1 << 24) + (1 << 21) - 3 and counts.sum() == values.numel()
