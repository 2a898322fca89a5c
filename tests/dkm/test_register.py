import copy
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

import dkm_param as dp
from devices import HostReads, device_sizing
from nets import Tied


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


POLICY = dp.Policy(default=dp.LayerSpec(bits=2), small_layer_bits=None)


def test_register_returns_the_plan_and_parametrizes_selected_weights():
    model = mlp()
    plan = dp.register_dkm(model, POLICY)
    assert [r.name for r in plan.clustered()] == ["0", "2", "4"]
    for name in ("0", "2", "4"):
        module = model.get_submodule(name)
        assert parametrize.is_parametrized(module, "weight")
        assert isinstance(module.parametrizations.weight[0], dp.DKMParametrization)
    model.eval()
    assert torch.unique(model[2].weight).numel() <= 4


def test_registering_twice_is_an_error():
    model = mlp()
    dp.register_dkm(model, POLICY)
    with pytest.raises(dp.RegistrationError, match=r"already has DKM registered \(on '0'\).*remove_dkm"):
        dp.register_dkm(model, POLICY)


def test_remove_dkm_restores_the_unclustered_weights():
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    dp.register_dkm(model, POLICY)
    dp.remove_dkm(model)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    dp.register_dkm(model, POLICY)  # and it can be registered again


def test_non_finite_weight_is_rejected_with_the_layer_name():
    model = mlp()
    with torch.no_grad():
        model[2].weight[3, 3] = float("nan")
    with pytest.raises(dp.RegistrationError, match=r"layer '2' \(Linear\): weight holds NaN or Inf"):
        dp.register_dkm(model, POLICY)


def test_a_weight_wider_than_float32_spans_is_rejected_with_the_layer_name_and_the_model_untouched():
    model = mlp()
    with torch.no_grad():  # finite, but the difference of the two overflows
        model[2].weight[0, 0], model[2].weight[0, 1] = 2e38, -2e38
    before = {name: t.clone() for name, t in model.state_dict().items()}
    with pytest.raises(dp.RegistrationError, match=r"layer '2': the weight's values span -2e\+38 to 2e\+38"):
        dp.register_dkm(model, dp.Policy(default=dp.LayerSpec(bits=2), small_layer_bits=None))
    assert all(torch.equal(t, before[name]) for name, t in model.state_dict().items())


def test_training_step_updates_weights_and_codebooks():
    model = mlp()
    dp.register_dkm(model, POLICY)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 32), torch.randint(0, 10, (16,))
    original = model[2].parametrizations.weight.original.detach().clone()
    codebook = model[2].parametrizations.weight[0].codebook.clone()
    nn.functional.cross_entropy(model(x), y).backward()
    assert model[2].parametrizations.weight.original.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(original, model[2].parametrizations.weight.original)
    assert not torch.equal(codebook, model[2].parametrizations.weight[0].codebook)


def test_tied_weights_share_one_parametrization_and_one_result():
    model = Tied()
    plan = dp.register_dkm(model, dp.Policy.from_notation("fc:3/1"))
    assert plan.row("wte").tied_to == "head"
    param = model.head.parametrizations.weight[0]
    assert model.wte.parametrizations.weight[0] is param
    assert model.wte.weight is model.head.weight  # one clustering per step, seen by both
    assert sum(1 for p in model.parameters() if p.shape == (300, 32)) == 1
    loss = model(torch.randint(0, 300, (4, 7))).logsumexp(-1).mean()
    loss.backward()
    model.eval()
    assert torch.equal(model.wte.weight, model.head.weight)


def test_model_with_dkm_deep_copies_after_a_training_step():
    model = mlp()
    dp.register_dkm(model, POLICY)
    model(torch.randn(2, 32)).sum()
    clone = copy.deepcopy(model)
    assert torch.equal(clone[0].parametrizations.weight[0].codebook, model[0].parametrizations.weight[0].codebook)


def test_checkpoint_resume_gives_the_same_next_steps():
    def run(model, opt, steps, seed):
        gen = torch.Generator().manual_seed(seed)
        losses = []
        for _ in range(steps):
            x, y = torch.randn(16, 32, generator=gen), torch.randint(0, 10, (16,), generator=gen)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    model = mlp()
    dp.register_dkm(model, POLICY)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    run(model, opt, 3, seed=1)
    checkpoint = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    expected = run(model, opt, 3, seed=2)

    fresh = mlp(seed=99)
    dp.register_dkm(fresh, POLICY)
    fresh.load_state_dict(checkpoint["model"])
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.05, momentum=0.9)
    fresh_opt.load_state_dict(checkpoint["opt"])
    assert run(fresh, fresh_opt, 3, seed=2) == expected


def test_a_deep_copy_keeps_the_layers_the_plan_skipped():
    # the plan once lived in a module-level registry keyed by the model, which a copy missed
    model = mlp()
    policy = dp.Policy(default=dp.LayerSpec(bits=2), small_layer_bits=None, skip=("2",))
    dp.register_dkm(model, policy)
    clone = copy.deepcopy(model)
    clone.eval()
    skipped = [row.name for row in dp.finalize(clone).skipped]
    assert "2" in skipped
    model.eval()
    assert [row.name for row in dp.finalize(model).skipped] == skipped


def test_a_failed_registration_leaves_the_model_as_it_was():
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")  # the second clustered layer
    before["2.weight"] = model[2].weight.clone()
    with pytest.raises(dp.RegistrationError, match="layer '2'"):
        dp.register_dkm(model, POLICY)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) or k == "2.weight" for k in before)


def meta_mlp():
    with torch.device("meta"):
        return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def test_a_meta_model_is_refused_before_anything_is_attached():
    model = meta_mlp()
    with pytest.raises(
        dp.RegistrationError,
        match=r"layer '0' \(Linear\) and 2 more selected layers: the weight is on the meta device.*"
        r"materialize the model first, e.g. model.to_empty\(device='cpu'\) and then load its weights",
    ):
        dp.register_dkm(model, POLICY)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    model.to_empty(device="cpu")
    model.load_state_dict(mlp().state_dict())
    assert [r.name for r in dp.register_dkm(model, POLICY).clustered()] == ["0", "2", "4"]


def test_one_meta_layer_is_named_and_nothing_is_built():
    model = mlp()
    model[2] = meta_mlp()[2]
    with pytest.raises(dp.RegistrationError, match=r"^layer '2' \(Linear\): the weight is on the meta device"):
        dp.register_dkm(model, POLICY)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    skipping = dp.Policy(default=dp.LayerSpec(bits=2), small_layer_bits=None, skip=("2",))
    assert [r.name for r in dp.register_dkm(model, skipping).clustered()] == ["0", "4"]  # a skipped one is no matter


@pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="torch without float8")
def test_a_float8_weight_is_skipped_by_the_plan_not_failed_in_registration():
    model = mlp()
    model[2].weight = nn.Parameter(model[2].weight.detach().to(torch.float8_e4m3fn))
    plan = dp.register_dkm(model, POLICY)
    assert plan.row("2").spec is None and "float8_e4m3fn is not supported" in plan.row("2").reason
    assert [r.name for r in plan.clustered()] == ["0", "4"]
    assert not parametrize.is_parametrized(model[2])


@pytest.mark.parametrize(
    "scale, spec, words",
    [
        (1e-22, dp.LayerSpec(bits=2), r"layer '2': the derived temperature tau = tau_rel \(2\) x the mean squared "
         r"distance to the nearest centroid \(.*\) = .* underflows float32.*raise tau_rel or set tau= explicitly, "
         r"or set channel_scale=True"),
        (1.0, dp.LayerSpec(bits=2, tau_rel=1e-37), r"layer '2': .*tau_rel \(1e-37\).* underflows float32"),
        (1e21, dp.LayerSpec(bits=2), r"layer '2': the derived temperature .* overflows float32.* the weight reaches "
         r".*set channel_scale=True"),
        (1e-22, dp.LayerSpec(bits=2, group_size=32), r"layer '2' \(group 0 of 2\): .* underflows float32"),
        (1e2, dp.LayerSpec(bits=2, epsilon=3e38), r"layer '2': the convergence threshold epsilon \(3e\+38\) x the "
         r"weight's spread \(.*\) overflows torch.float32; lower epsilon"),
    ],
    ids=["tiny-weight", "tiny-tau_rel", "huge-weight", "tiny-group", "huge-epsilon"],
)
def test_a_derived_tau_float32_cannot_hold_is_refused_naming_the_layer(scale, spec, words):
    model = mlp()
    with torch.no_grad():
        model[2].weight.mul_(scale)
    with pytest.raises(dp.RegistrationError, match=words):
        dp.register_dkm(model, dp.Policy(default=dp.LayerSpec(bits=2), overrides={"2": spec}, small_layer_bits=None))
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


def test_a_tau_that_would_collapse_the_codebook_is_lowered_and_said():
    # 2-bit codebooks for vectors of 4: tau_rel=2.0 x the large error passes the collapse temperature
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32))
    vectors = model[0].weight.detach().reshape(-1, 4).double()
    collapse = 2 * torch.linalg.eigvalsh(torch.cov(vectors.T, correction=0))[-1]
    with pytest.warns(UserWarning, match=r"1 layer\(s\) \('0'\): tau_rel x the clustering error would pass"):
        dp.register_dkm(model, dp.Policy.from_notation("fc:2/4", small_layer_bits=None))
    param = model[0].parametrizations.weight[0]
    assert param.tau_lowered and float(param.tau) == pytest.approx(0.4 * float(collapse), rel=1e-4)
    centroids = param.codebook.double()
    gaps = torch.cdist(centroids, centroids) + torch.eye(4, dtype=torch.float64) * 1e9
    assert float(gaps.min()) > 0.1 * float(collapse) ** 0.5  # four centroids apart, not all on the mean
    # scalar clustering at 2 bits is far below the limit: tau is tau_rel x the error, untouched
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scalar = nn.Sequential(nn.Linear(64, 32))
        dp.register_dkm(scalar, dp.Policy.from_notation("fc:2/1", small_layer_bits=None))
    assert not scalar[0].parametrizations.weight[0].tau_lowered
    # a huge tau_rel no longer overflows: it is lowered the same way
    huge = nn.Sequential(nn.Linear(64, 32))
    with pytest.warns(UserWarning, match="tau is 0.4 x that temperature"):
        dp.register_dkm(huge, dp.Policy(default=dp.LayerSpec(bits=2, tau_rel=1e38), small_layer_bits=None))
    assert torch.isfinite(huge[0].parametrizations.weight[0].tau).all()


def test_a_tiny_weight_registers_with_an_explicit_tau_or_channel_scale():
    model = mlp()
    with torch.no_grad():
        model[2].weight.mul_(1e-22)
    for spec in (dp.LayerSpec(bits=2, tau=1e-3, settle_iter=0), dp.LayerSpec(bits=2, channel_scale=True)):
        dp.register_dkm(model, dp.Policy(default=spec, small_layer_bits=None))
        tau = model[2].parametrizations.weight[0].tau
        assert torch.isfinite(tau).all() and (tau >= torch.finfo(torch.float32).tiny).all()
        dp.remove_dkm(model)


def test_a_constant_weight_gets_a_positive_normal_tau():
    # its centroids coincide: the fallback once gave tau_rel * tiny, a subnormal for tau_rel < 1
    model = mlp()
    with torch.no_grad():
        model[2].weight.fill_(0.5)
    dp.register_dkm(model, dp.Policy(default=dp.LayerSpec(bits=2, tau_rel=0.1), small_layer_bits=None))
    tau = model[2].parametrizations.weight[0].tau
    assert (tau >= torch.finfo(torch.float32).tiny).all() and torch.isfinite(tau).all()


@settings(max_examples=30, deadline=None)
@given(exponent=st.integers(min_value=-30, max_value=25), tau_rel=st.sampled_from([1e-30, 0.5, 2.0, 1e30]))
def test_a_registered_tau_is_a_positive_normal_float32_or_the_layer_is_named(exponent, tau_rel):
    weight = torch.randn(16, 8, generator=torch.Generator().manual_seed(exponent + 100)) * 10.0**exponent
    model = nn.Sequential(nn.Linear(8, 16))
    with torch.no_grad():
        model[0].weight.copy_(weight)
    spec = dp.LayerSpec(bits=2, tau_rel=tau_rel, settle_iter=0)
    try:
        dp.register_dkm(model, dp.Policy(default=spec, small_layer_bits=None))
    except dp.RegistrationError as exc:
        assert str(exc).startswith("layer '0'") and "float32" in str(exc)
        return
    param = model[0].parametrizations.weight[0]
    assert torch.isfinite(param.tau).all() and (param.tau >= torch.finfo(torch.float32).tiny).all()
    assert torch.isfinite(param.epsilon).all()


@pytest.mark.parametrize("dtype, bits", [(torch.bfloat16, 4), (torch.float32, 4), (torch.float32, 6)])
def test_registration_on_a_gpu_reads_back_one_value_a_settling_cycle_and_a_few_more(dtype, bits, monkeypatch):
    """Each read back waits for the GPU (``devices``): seeding reads nothing per centroid, and
    settling one value per cycle of three iterations (whether to stop), not every iteration."""
    from dkm_param.ops import _engine

    steps = []
    em_step = _engine._em_step
    monkeypatch.setattr(_engine, "_em_step", lambda *args: steps.append(1) or em_step(*args))
    torch.manual_seed(0)
    layer = nn.Linear(512, 512, bias=False).to(dtype)
    with device_sizing(), HostReads() as host:
        dp.register_dkm(layer, dp.Policy.from_notation(f"fc:{bits}/1", small_layer_bits=None))
    cycles = -(-len(steps) // 3)
    assert len(steps) > 3  # it settled for several cycles
    # a dozen reads, and for a float32 weight its grid's step (a range wider than float32 holds is refused)
    assert sum(host.reads.values()) <= 13 + cycles, (host.reads, len(steps))
