import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import dkm_param as dp
from devices import HostReads, device_sizing
from dkm_param.ops import kmeans, soft, table
from strategies import scales, specs, weights


def make(weight, spec):
    return dp.DKMParametrization(weight, spec)


@given(data=st.data())
def test_shape_and_dtype_kept_in_both_modes(data):
    weight, dim = data.draw(weights())
    param = make(weight, data.draw(specs(dim=dim)))
    soft = param(weight)
    param.eval()
    hard = param(weight)
    assert soft.shape == hard.shape == weight.shape
    assert soft.dtype == hard.dtype == weight.dtype


@given(data=st.data())
def test_snapped_weight_has_at_most_k_distinct_vectors(data):
    weight, dim = data.draw(weights())
    spec = data.draw(specs(dim=dim))
    param = make(weight, spec)
    param(weight)  # one training step moves the codebook
    param.eval()
    vectors = param(weight).reshape(-1, dim)
    assert torch.unique(vectors, dim=0).shape[0] <= spec.clusters
    codebook_rows = {tuple(r) for r in param.codebook.tolist()}
    assert all(tuple(v) in codebook_rows for v in vectors.tolist())


@given(data=st.data())
def test_gradients_are_finite_and_nonzero(data):
    weight, dim = data.draw(weights())
    weight = weight.clone().requires_grad_(True)
    param = make(weight.detach(), data.draw(specs(dim=dim)))
    probe = torch.randn(weight.shape, generator=torch.Generator().manual_seed(1))
    (param(weight) * probe).sum().backward()
    assert torch.isfinite(weight.grad).all()
    assert weight.grad.abs().sum() > 0


@given(data=st.data())
def test_centroids_stay_inside_the_weight_range(data):
    weight, dim = data.draw(weights())
    param = make(weight, data.draw(specs(dim=dim)))
    for _ in range(3):
        param(weight)
    vectors = weight.reshape(-1, dim)
    low, high = vectors.min(0).values, vectors.max(0).values
    slack = 1e-5 * (high - low).abs().max()
    assert (param.codebook >= low - slack).all() and (param.codebook <= high + slack).all()


@given(data=st.data(), factor=scales)
def test_result_scales_with_the_weight(data, factor):
    weight, dim = data.draw(weights(scale=1.0))
    spec = data.draw(specs(dim=dim)).replace(init="linear")  # a seeding that commutes with scaling
    weight = weight.double()
    base = make(weight, spec)(weight)
    scaled = make(weight * factor, spec)(weight * factor)
    assert torch.allclose(scaled, base * factor, rtol=1e-6, atol=1e-9 * factor)


def test_soft_output_approaches_hard_output_as_tau_falls():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(4000, generator=gen, dtype=torch.float64) * 0.05
    converged, _ = kmeans.kmeans_1d(weight, 8)  # a Lloyd fixed point: a hard step moves nothing
    errors = []
    for tau in (1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-9):
        param = make(weight, dp.LayerSpec(bits=3, tau=tau))
        with torch.no_grad():
            param.codebook.copy_(converged[:, None])
        errors.append((param(weight) - param.snap(weight)).abs().mean().item())
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 1e-12 and errors[0] > 1e-3


def test_state_is_tensors_in_buffers_only():
    param = make(torch.randn(64, 32), dp.LayerSpec(bits=2))
    state = param.state_dict()
    assert set(state) == {"codebook", "tau", "epsilon"}
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert state["codebook"].shape == (4, 1) and state["tau"] > 0


def test_warm_start_moves_the_codebook_and_one_step_is_shared_by_all_readers():
    weight = torch.randn(2000, requires_grad=True)
    param = make(weight.detach(), dp.LayerSpec(bits=2, epsilon=0.0))
    start = param.codebook.clone()
    first = param(weight)
    assert not torch.equal(param.codebook, start)
    assert param(weight) is first  # same step, same weight: clustered once
    first.sum().backward()
    again = param(weight)  # after backward a new graph is built
    assert again is not first
    with torch.no_grad():
        weight.add_(0.1)
    assert param(weight) is not again


def test_training_steps_reuse_the_value_order_with_the_same_results():
    # a 4-bit layer on the float32 engine (scaled per channel) sorts its values once, and its
    # later steps match a parametrization that starts afresh from the same state
    torch.manual_seed(0)
    weight = torch.randn(128, 256).mul_(0.05).requires_grad_(True)
    param = make(weight.detach(), dp.LayerSpec(bits=4, channel_scale=True))
    opt = torch.optim.SGD([weight], lr=0.01)
    for _ in range(3):
        (param(weight) * torch.randn(weight.shape)).sum().backward()
        opt.step()
        opt.zero_grad()
    kept = param._orders[0].order
    assert kept is not None and kept.dtype == torch.int32 and kept.numel() == weight.numel()
    fresh = make(weight.detach(), dp.LayerSpec(bits=4, channel_scale=True, settle_iter=0))
    fresh.load_state_dict(param.state_dict())
    assert fresh._orders[0].order is None
    got, want = param(weight), fresh(weight)
    assert param._orders[0].order is kept  # not sorted again
    # float32: the chunks sum in another order, so within test_dkm's float32 tolerances
    torch.testing.assert_close(got.detach(), want.detach(), rtol=0, atol=1e-4 * float(want.detach().abs().max()))
    upstream = torch.randn(weight.shape)
    grads = [torch.autograd.grad((out * upstream).sum(), weight)[0] for out in (got, want)]
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=2e-3 * float(grads[1].abs().max()))


def test_half_precision_weights_cluster_in_float32():
    weight = torch.randn(512, 8).to(torch.bfloat16)
    param = make(weight, dp.LayerSpec(bits=3))
    assert param.codebook.dtype == torch.float32
    assert param(weight).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group_size, layout", [(None, "flat"), (4, "input")])
def test_half_precision_weights_cluster_by_value_table_as_in_float32(dtype, group_size, layout):
    weight = (torch.randn(8, 6, 3, 3, generator=torch.Generator().manual_seed(3)) * 0.05).to(dtype)
    spec = dp.LayerSpec(bits=3, group_size=group_size, layout=layout)
    by_value, as_float = make(weight, spec), exact(make(weight.float(), spec))
    torch.testing.assert_close(by_value.codebook, as_float.codebook, rtol=0, atol=1e-4 * float(weight.abs().max()))
    assert by_value.by_value(weight)
    leaf, float_leaf = weight.clone().requires_grad_(), weight.float().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        got = by_value(leaf)
    # no float32 copy of the weight is kept for backward: the weight itself and tables only
    assert got.dtype == dtype and all(t.dtype != torch.float32 or t.numel() < weight.numel() for t in saved)
    want = as_float(float_leaf)
    rounding = torch.finfo(dtype).eps
    torch.testing.assert_close(got.float(), want, rtol=0, atol=(1e-4 + rounding) * float(want.detach().abs().max()))
    torch.testing.assert_close(by_value.codebook, as_float.codebook, rtol=0, atol=1e-4 * float(weight.abs().max()))
    upstream = torch.randn(weight.shape, generator=torch.Generator().manual_seed(4))
    (got.float() * upstream).sum().backward()
    (want * upstream).sum().backward()
    atol = (2e-3 + rounding) * float(float_leaf.grad.abs().max())
    torch.testing.assert_close(leaf.grad.float(), float_leaf.grad, rtol=0, atol=atol)


def exact(param):
    """The parametrization with its float32 groups on the float32 engine (as when no grid fits)."""
    param._float32_engine = True
    return param


@pytest.mark.parametrize("bits, group_size", [(4, None), (2, None), (3, 4)])
def test_float32_weights_on_a_grid_stay_near_the_float32_engine(bits, group_size):
    gen = torch.Generator().manual_seed(5)
    shape = (16, 24, 3, 3)  # heavy-tailed (Student's t, 4 degrees of freedom), as trained weights are
    weight = torch.randn(shape, generator=gen) / torch.randn((4, *shape), generator=gen).square().mean(0).sqrt() * 0.02
    spec = dp.LayerSpec(bits=bits, group_size=group_size)
    on_grid, on_engine = make(weight, spec), exact(make(weight, spec))
    assert on_grid.by_value(weight)
    torch.testing.assert_close(on_grid.codebook, on_engine.codebook)  # registration is the same
    saved = []
    leaf, engine_leaf = weight.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        got = on_grid(leaf)
    # nothing of the weight's size is kept for backward but the weight itself
    assert all(t is leaf or t.numel() < weight.numel() for t in saved)
    want = on_engine(engine_leaf)
    span = float(on_engine.codebook.max() - on_engine.codebook.min())
    torch.testing.assert_close(on_grid.codebook, on_engine.codebook, rtol=0, atol=1e-3 * span)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-3 * span)
    upstream = torch.randn(weight.shape, generator=gen)
    (got * upstream).sum().backward()
    (want * upstream).sum().backward()
    error = float((leaf.grad - engine_leaf.grad).norm() / engine_leaf.grad.norm())
    assert error <= 2e-2


def test_a_temperature_too_sharp_for_any_grid_takes_the_float32_engine():
    weight = torch.randn(64, 64, generator=torch.Generator().manual_seed(6))
    spec = dp.LayerSpec(bits=8, tau=1e-9, settle_iter=0)  # transitions far narrower than any grid's step
    param, engine = make(weight, spec), exact(make(weight, spec))
    leaf, engine_leaf = weight.clone().requires_grad_(), weight.clone().requires_grad_()
    got, want = param(leaf), engine(engine_leaf)
    assert table.grid_size(*torch.aminmax(weight), param.codebook, 1e-9) is None
    assert torch.equal(got, want) and torch.equal(param.codebook, engine.codebook)
    got.sum().backward()
    want.sum().backward()
    assert torch.equal(leaf.grad, engine_leaf.grad)


def test_scaled_zero_pinned_and_vector_half_weights_take_the_float32_engine():
    weight = torch.randn(16, 8).to(torch.bfloat16)
    for spec in (dp.LayerSpec(bits=2, channel_scale=True), dp.LayerSpec(bits=2, preserve_zeros=True),
                 dp.LayerSpec(bits=2, dim=2)):
        param = make(weight, spec)
        assert not param.by_value(weight)
        assert param(weight).dtype == torch.bfloat16


def test_non_finite_weights_are_detected_not_passed_on():
    weight = torch.randn(256)
    param = make(weight, dp.LayerSpec(bits=2))
    param.name = "blocks.3"
    broken = weight.clone()
    broken[7] = float("inf")
    with pytest.raises(dp.DKMError, match=r"layer 'blocks.3' \(2 bits, dim 1\): the weight holds NaN or Inf.*1 of 256"):
        param(broken)
    with torch.no_grad():
        param.codebook[0] = float("nan")
    with pytest.raises(dp.DKMError, match=r"clustering produced NaN or Inf centroids"):
        param(weight)
    param.eval()
    broken[7] = float("nan")
    with pytest.raises(dp.DKMError, match=r"layer 'blocks.3'.*the weight holds NaN or Inf"):
        param(broken)


def test_registration_settles_the_codebook_so_training_steps_stop_early():
    weight = torch.randn(256, 512, generator=torch.Generator().manual_seed(3)) * 0.05
    vectors = weight.reshape(-1, 1)

    def iterations(param):
        return soft.soft_cluster(vectors, param.codebook, float(param.tau), 5, float(param.epsilon))[2]

    seeded = make(weight, dp.LayerSpec(bits=4, settle_iter=0))
    settled = make(weight, dp.LayerSpec(bits=4))
    assert torch.equal(seeded.tau, settled.tau)  # the temperature comes from the seed
    assert iterations(seeded) == 5
    assert iterations(settled) == 1


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class _Checkpointed(nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.blocks, self.mode = nn.ModuleList([_Block(), _Block()]), mode

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        for block in self.blocks:
            x = block(x) if self.mode is None else checkpoint(block, x, use_reentrant=self.mode == "reentrant")
        return x


@pytest.mark.parametrize("mode", ["non-reentrant", "reentrant"])
def test_activation_checkpointing_trains_as_without_it(mode, monkeypatch):
    calls = []
    for engine, name in ((soft, "soft_cluster"), (table, "table_cluster")):
        cluster = getattr(engine, name)
        monkeypatch.setattr(engine, name, lambda *a, _cluster=cluster, **k: calls.append(1) or _cluster(*a, **k))
    runs = {}
    for variant in (None, mode):
        torch.manual_seed(0)
        model = _Checkpointed(variant)
        dp.register_dkm(model, dp.Policy(default=dp.LayerSpec(bits=2), small_layer_bits=None))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        x = torch.randn(8, 32, requires_grad=True)  # a re-entrant checkpoint needs an input that requires grad
        losses, counts = [], []
        for _ in range(3):
            calls.clear()
            loss = model(x).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            counts.append(len(calls))
        runs[variant] = losses, counts, [p.detach().clone() for p in model.parameters()]
    plain, checked = runs[None], runs[mode]
    assert checked[0] == pytest.approx(plain[0], rel=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain[2], checked[2]))
    # four layers: once a step without re-entrance; a re-entrant checkpoint runs the forward twice
    assert checked[1] == [4, 4, 4] if mode == "non-reentrant" else [8, 8, 8]


def test_a_forward_without_gradient_leaves_the_warm_start_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32))
    dp.register_dkm(model, dp.Policy(default=dp.LayerSpec(bits=2), small_layer_bits=None))
    before = model[0].parametrizations.weight[0].codebook.clone()
    with torch.no_grad():
        model(torch.randn(4, 32))
    assert torch.equal(model[0].parametrizations.weight[0].codebook, before)


@pytest.mark.parametrize("dtype, dim", [(torch.bfloat16, 1), (torch.float32, 1), (torch.float32, 2)])
def test_tau_and_epsilon_are_read_at_every_step_however_they_are_changed(dtype, dim, monkeypatch):
    seen = []

    def spy(engine):
        def run(values, codebook, tau, max_iter, epsilon, *args, **kwargs):
            seen.append((tau, epsilon))
            return engine(values, codebook, tau, max_iter, epsilon, *args, **kwargs)
        return run

    monkeypatch.setattr(table, "table_cluster", spy(table.table_cluster))
    monkeypatch.setattr(soft, "soft_cluster", spy(soft.soft_cluster))
    torch.manual_seed(0)
    layer = nn.Linear(64, 32).to(dtype)
    dp.register_dkm(layer, dp.Policy(dp.LayerSpec(bits=3, dim=dim), small_layer_bits=None))
    param = layer.parametrizations.weight[0]
    changes = [
        lambda: dp.scale_temperature(layer, 0.5),  # in place
        lambda: param.tau.data.mul_(0.5),  # in place, unseen by the version counter
        lambda: setattr(param, "tau", param.tau * 0.5),  # a new tensor
        lambda: param.epsilon.data.fill_(1e-7),
    ]
    for change in [lambda: None, *changes]:
        change()
        param._cached = None  # a new step
        layer.weight.sum().backward()
        assert seen[-1] == (float(param.tau), pytest.approx(float(param.epsilon), rel=1e-6))


@pytest.mark.parametrize("dtype, bits, shape, most", [
    (torch.bfloat16, 4, (256, 1024), 4),  # by value table
    (torch.float32, 4, (256, 1024), 5),  # on a grid
    (torch.float32, 8, (64, 128), 6),  # the float32 engine
])
def test_a_training_step_on_a_gpu_reads_back_to_the_host_a_few_times_a_layer(dtype, bits, shape, most):
    """Each read back makes the host wait for the GPU to finish its work: a layer's step that
    has converged (one iteration) reads a handful of values, whatever its size (``devices``)."""
    torch.manual_seed(0)
    layer = nn.Linear(shape[1], shape[0], bias=False).to(dtype)
    dp.register_dkm(layer, dp.Policy.from_notation(f"fc:{bits}/1", small_layer_bits=None))
    weight = layer.parametrizations.weight.original

    def step():
        soft_weight = layer.weight
        soft_weight.backward(torch.ones_like(soft_weight))
        weight.grad = None

    with device_sizing():
        for _ in range(3):
            step()
        with HostReads() as host:
            step()
    assert 1 <= sum(host.reads.values()) <= most, host.reads
