"""The compiled passes over a weight (``ops.native``) against the torch operations they replace,
and how the library is found, compiled, refused and replaced."""

import warnings

import pytest
import torch

from dkm_param.ops import native, table

needs_compiler = pytest.mark.skipif(native._compiler() is None, reason="no C compiler here")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """No library loaded yet, a cache directory of its own."""
    monkeypatch.setattr(native, "_LOADED", {})
    monkeypatch.setenv("DKM_PARAM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DKM_PARAM_NATIVE", raising=False)
    return tmp_path / "cache"


def both_ways(monkeypatch, work):
    """``work()`` with the compiled passes, then with the torch operations."""
    monkeypatch.setenv("DKM_PARAM_NATIVE", "1")
    assert native.available()
    compiled = work()
    monkeypatch.setenv("DKM_PARAM_NATIVE", "0")
    return compiled, work()


def step(values, codebook, tau, grid):
    """(counts, soft values, final codebook, iterations, gradient) of one training step."""
    live = values.detach().clone().requires_grad_()
    counts = table.value_counts(values, grid)
    out, final, iterations = table.table_cluster(live, codebook, tau, 4, 0.0, counts=counts, grid=grid)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    out.backward(upstream)
    return counts, out.detach(), final, iterations, live.grad


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n", [1000, 3 * (1 << 19) + 7])  # one thread; shared by two
def test_compiled_passes_give_the_torch_operations_results(dtype, n, monkeypatch):
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        values = (torch.randn(n, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)
        codebook = torch.linspace(-0.04, 0.04, 16)[:, None]
        grid = None
        if dtype == torch.float32:
            low, high = torch.aminmax(values)
            grid = table.value_grid(low, high, table.grid_size(low, high, codebook, 1e-4))
        compiled, plain = both_ways(monkeypatch, lambda: step(values, codebook, 1e-4, grid))
    finally:
        torch.set_num_threads(previous)
    for got, want in zip(compiled[:3], plain[:3]):  # counts, soft values, codebook: bit for bit
        assert torch.equal(got, want)
    assert compiled[3] == plain[3]
    # the gradient's sums by value are added in float64 here, in float32 pass by pass there: a gradient
    # near a tie between two values of its dtype may round the other way
    scale = float(plain[4].float().abs().max()) * max(1e-5, torch.finfo(dtype).eps)
    assert float((compiled[4].float() - plain[4].float()).abs().max()) <= scale
    assert float((compiled[4] == plain[4]).float().mean()) > 0.9


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_read_and_rounded_as_torch_does(dtype, monkeypatch):
    """Every 16-bit pattern as a weight and as a gradient, tables over float32's whole range
    (subnormal, overflowing, ties): the same bits either way."""
    patterns = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(dtype)
    weights = patterns[torch.isfinite(patterns)]
    grad = weights[torch.randperm(weights.numel(), generator=torch.Generator().manual_seed(0))]
    gen = torch.Generator().manual_seed(1)
    spread = torch.randn(table.TABLE_SIZE, generator=gen) * 2.0 ** torch.randint(-40, 40, (table.TABLE_SIZE,),
                                                                                   generator=gen)
    shift = torch.randn(table.TABLE_SIZE, generator=gen) * 2.0 ** torch.randint(-30, 20, (table.TABLE_SIZE,),
                                                                                  generator=gen)
    ties = torch.arange(table.TABLE_SIZE, dtype=torch.int32).to(torch.int16).view(dtype).float()
    ties = ties + ties.abs() * (2.0 ** -9 if dtype == torch.bfloat16 else 2.0 ** -12)  # halfway to the next

    def work():
        looked = table._lookup(weights, ties, dtype)
        return looked, table._gradient(weights, grad, None, (spread, shift))

    compiled, plain = both_ways(monkeypatch, work)
    for got, want in zip(compiled, plain):
        same = (got.view(torch.int16) == want.view(torch.int16)) | (torch.isnan(got) & torch.isnan(want))
        assert bool(same.all())


@needs_compiler
def test_the_library_is_compiled_once_into_the_cache_and_reused(fresh):
    assert native.available()
    (library,) = fresh.glob("table_passes_*.so")
    assert not list(fresh.glob("*.tmp"))  # the partial file was renamed into place
    built = library.stat().st_mtime_ns
    native._LOADED.clear()
    assert native.available() and library.stat().st_mtime_ns == built


@needs_compiler
def test_a_broken_cached_library_is_compiled_afresh(fresh):
    compiler = native._compiler()
    path = native._path(compiler, native._builds(compiler)[0])
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a library")  # e.g. a copy cut short
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.available()
    assert path.read_bytes()[:4] == b"\x7fELF"


def test_without_a_compiler_the_torch_operations_run_and_nothing_is_said(fresh, monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler-here")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not native.available()
    values = torch.randn(5000).bfloat16()
    assert torch.equal(table.value_counts(values), torch.bincount(table.value_codes(values),
                                                                  minlength=table.TABLE_SIZE).float())


def test_a_compiler_that_fails_is_named_in_one_warning(fresh, monkeypatch):
    monkeypatch.setenv("CC", "false")  # found, and fails
    with pytest.warns(RuntimeWarning, match="torch operations run instead"):
        assert not native.available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        assert not native.available()
    assert not list(fresh.glob("*"))  # no partial file left behind


def test_an_unwritable_cache_falls_back_with_a_warning(fresh, monkeypatch, tmp_path):
    blocker = tmp_path / "a file"
    blocker.write_text("")
    monkeypatch.setenv("DKM_PARAM_CACHE", str(blocker / "cache"))  # under a file: cannot be made
    if native._compiler() is None:
        pytest.skip("no C compiler here")
    with pytest.warns(RuntimeWarning, match="not available"):
        assert not native.available()


def test_switched_off_by_the_environment(fresh, monkeypatch):
    monkeypatch.setenv("DKM_PARAM_NATIVE", "0")
    assert not native.available()
    assert not native._LOADED  # nothing compiled or loaded


@needs_compiler
def test_the_loops_run_on_torchs_threads_and_repeat_exactly(monkeypatch):
    monkeypatch.setenv("DKM_PARAM_NATIVE", "1")
    values = (torch.randn(1 << 20, generator=torch.Generator().manual_seed(3)) * 0.02).bfloat16()
    codebook = torch.linspace(-0.04, 0.04, 8)[:, None]
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        twice = [step(values, codebook, 1e-4, None) for _ in range(2)]
        torch.set_num_threads(1)
        alone = step(values, codebook, 1e-4, None)
    finally:
        torch.set_num_threads(previous)
    for got, want in zip(twice[0], twice[1]):  # the same bits from run to run, the gradient's sums included
        assert got == want if isinstance(got, int) else torch.equal(got, want)
    for got, want in zip(twice[0][:3], alone[:3]):  # counts, soft values and codebook whatever the threads
        assert torch.equal(got, want)
    assert native._gomp_loaded() <= 1  # torch's OpenMP runtime, not a second one


@needs_compiler
def test_the_loops_refuse_what_they_cannot_read_safely(monkeypatch):
    monkeypatch.setenv("DKM_PARAM_NATIVE", "1")
    values = torch.randn(100).bfloat16()
    with pytest.raises(ValueError, match="65536 entries"):
        native.count(values, torch.zeros(1000, dtype=torch.int64))
    with pytest.raises(ValueError, match="contiguous CPU tensors"):
        native.count(values[::2], torch.zeros(1 << 16, dtype=torch.int64))
    with pytest.raises(ValueError, match="contiguous CPU tensors"):
        native.lookup(values, torch.empty(99, dtype=torch.bfloat16), torch.zeros(1 << 16, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="contiguous CPU tensors"):
        native.gather(values, torch.randn(100), torch.zeros(1 << 16, dtype=torch.float64))  # float32 gradient
    with pytest.raises(ValueError, match="takes 2 tables"):
        native.spread(values, values, torch.empty_like(values), (torch.zeros(1 << 16),))
    grid = torch.randn(100)
    with pytest.raises(ValueError, match="contiguous CPU tensors"):  # a slope shorter than the grid
        native.lookup(grid, torch.empty(100), torch.zeros(64), torch.zeros(32), 0.0, 1.0)
    with pytest.raises(ValueError, match="bfloat16, float16 or float32"):
        native.count(torch.arange(10), torch.zeros(16, dtype=torch.int64))


@needs_compiler
def test_a_nan_on_a_grid_is_refused_and_nothing_is_touched_out_of_place(monkeypatch):
    monkeypatch.setenv("DKM_PARAM_NATIVE", "1")
    grid = table.value_grid(torch.tensor(0.0), torch.tensor(1.0), 4096)
    values = torch.tensor([0.0, float("nan"), 1.0, 0.5] * 1000)
    with pytest.raises(ValueError, match="1000 of 4000 float32 values are NaN"):
        table.value_counts(values, grid)
    counts = torch.zeros(4096, dtype=torch.int64)
    with pytest.raises(ValueError, match="NaN"):
        native.count(values, counts, *grid.placing)
    assert int(counts.sum()) == 4000 and int(counts[0]) == 2000  # NaN at the first point, counted in place


@needs_compiler
def test_grids_the_loops_cannot_take_are_left_to_the_torch_operations(monkeypatch):
    monkeypatch.setenv("DKM_PARAM_NATIVE", "1")
    huge = torch.tensor([-3e38, 0.0, 3e38])  # finite, but the grid's step overflows
    assert not table._compiled(huge, table.value_grid(*torch.aminmax(huge), 4096))
    values = torch.rand(100)
    assert table._compiled(values, table.value_grid(*torch.aminmax(values), 4096))
    assert not table._compiled(values, table.value_grid(*torch.aminmax(values), native.MOST_GRID_POINTS + 1))
    assert not table._compiled(values, None)  # float32 takes a grid; a half-precision weight none
    assert not table._compiled(values.double(), table.value_grid(*torch.aminmax(values), 4096))
    with pytest.raises(ValueError, match="a grid of 1 to"):  # and the loops refuse them themselves
        native.count(values, torch.zeros(native.MOST_GRID_POINTS + 1, dtype=torch.int64), 0.0, 1.0)
    with pytest.raises(ValueError, match="at least 2 points"):
        table.value_grid(torch.tensor(0.0), torch.tensor(1.0), 1)


@needs_compiler
def test_a_cached_library_cut_short_is_compiled_afresh(fresh):
    compiler = native._compiler()
    whole = native._path(compiler, native._builds(compiler)[0])
    assert native.available()
    data = whole.read_bytes()
    native._LOADED.clear()
    elsewhere = fresh.parent / "elsewhere"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DKM_PARAM_CACHE", str(elsewhere))
        path = native._path(compiler, native._builds(compiler)[0])
        path.parent.mkdir(parents=True)
        path.write_bytes(data[: len(data) // 2])  # loading it would crash the process
        assert not native._whole(path)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert native.available()
        assert native._whole(path) and path.stat().st_size == len(data)


@needs_compiler
def test_a_cached_library_of_another_version_is_replaced(fresh, tmp_path):
    import subprocess

    compiler = native._compiler()
    path = native._path(compiler, native._builds(compiler)[0])
    path.parent.mkdir(parents=True)
    old = tmp_path / "old.c"
    old.write_text("long long dkm_table_passes_version(void) { return 1; }\n")
    subprocess.run([compiler, "-shared", "-fPIC", str(old), "-o", str(path)], check=True)
    assert native.available()
    assert native._library().dkm_table_passes_version() == native._VERSION
    native._LOADED.clear()
    assert native.available()  # the file in place is now this version's


def test_a_package_without_its_source_falls_back_with_a_warning(fresh, monkeypatch, tmp_path):
    if native._compiler() is None:
        pytest.skip("no C compiler here")
    monkeypatch.setattr(native, "_SOURCE", tmp_path / "missing.c")
    with pytest.warns(RuntimeWarning, match="not available"):
        assert not native.available()
