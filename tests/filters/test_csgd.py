import json
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dkm_param.errors import SpecError
from dkm_param.filters.csgd import (
    CentripetalSGD,
    CSGDSpec,
    FilterPlan,
    centripetal_gradient,
    cluster_filters,
    cluster_rows,
    collapse_,
)
from dkm_param.filters.thinning import thin
from strategies import seeds

pytestmark = pytest.mark.usefixtures("one_thread")


def vgg():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),  # 0, 1
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),  # 3, 4
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),  # 7, 8
        nn.Flatten(), nn.Linear(16 * 2 * 2, 4),  # 12
    )


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(ratio=0), "ratio must be a number in"),
        (dict(ratio=1.5), "ratio must be a number in"),
        (dict(ratio=None), "selects no layer"),
        (dict(channels={"0": 0}), r"channels\['0'\] must be at least 1"),
        (dict(channels={"0": 1.5}), "read as a ratio"),
        (dict(channels={"0": True}), "must be an int count"),
        (dict(channels={"(": 2}), "not a valid regular expression"),
        (dict(strength=-1.0), "strength must be a finite number >= 0"),
        (dict(weight_decay=float("nan")), "weight_decay must be"),
        (dict(iterations=0), "iterations must be an int >= 1"),
        (dict(linear=1), "linear must be True or False"),
        (dict(ratio=True), r"ratio must be a number in \(0, 1\] or None, got True \(bool\)"),
        (dict(channels=[("0", 2)]), r"channels must map layer names to a count, a ratio or None, got list"),
        (dict(channels={0: 2}), r"channels keys must be layer names or patterns \(str\), got 0 \(int\)"),
        (dict(strength=True), r"strength must be a finite number >= 0 that float32 holds .*got True \(bool\)"),
        (dict(strength="3e-3"), r"strength must be a finite number >= 0 .*got '3e-3' \(str\)"),
        (dict(strength=10**400), r"strength must be a finite number >= 0 .*got an int of 1329 bits"),
        (dict(weight_decay=None), r"weight_decay must be a finite number >= 0 .*got None"),
        (dict(norm_factor=1e39), r"norm_factor must be a finite number >= 0 that float32 holds \(at most 3.403e\+38\)"),
        (dict(iterations=True), r"iterations must be an int >= 1, got True \(bool\)"),
        (dict(iterations=30.0), r"iterations must be an int >= 1, got 30.0 \(float\)"),
        (dict(seed=2**64), r"seed must be an int in 0..9223372036854775807 \(2\*\*63 - 1, torch's largest seed\)"),
        (dict(seed=-1), r"seed must be an int in 0..9223372036854775807"),
        (dict(seed=False), r"seed must be an int in 0..9223372036854775807 .*got False \(bool\)"),
        (dict(strict="False"), r"strict must be True or False, got 'False' \(str\); pass the bool itself"),
    ],
)
def test_spec_rejects_bad_values(kwargs, words):
    with pytest.raises(SpecError, match=words):
        CSGDSpec(**kwargs)


def test_largest_seed_clusters_and_a_bool_override_of_the_strength_is_refused():
    plan = cluster_filters(vgg(), CSGDSpec(ratio=0.5, seed=2**63 - 1))  # torch's generator takes it
    assert plan.clustered()
    with pytest.raises(SpecError, match=r"strength must be a finite number >= 0 .*got True \(bool\)"):
        CentripetalSGD(vgg(), plan, strength=True)
    with pytest.raises(SpecError, match=r"weight_decay must be a finite number >= 0 that float32 holds"):
        CentripetalSGD(vgg(), plan, weight_decay=1e39)


def test_spec_round_trips_through_a_dict():
    spec = CSGDSpec(ratio=None, channels={"0": 3, r"\d": 0.5}, strength=0.1)
    assert CSGDSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(SpecError, match="unknown CSGDSpec field"):
        CSGDSpec.from_dict({"bits": 2})


def test_plan_resolves_names_then_patterns_then_ratio_and_lists_every_skip():
    spec = CSGDSpec(ratio=0.5, channels={"3": 5, r"[37]": 0.75, "0": None})
    plan = cluster_filters(vgg(), spec)
    assert plan.row("0").clustered is False and plan.row("0").reason == "named None in channels"
    assert plan.row("3").target == 5 and plan.row("3").reason == "named in channels"
    assert plan.row("7").target == 12 and "matches" in plan.row("7").reason
    assert plan.row("12").reason == "linear layers are thinned only with linear=True"
    table = str(plan)
    assert "skip: named None in channels" in table and "cluster: named in channels" in table
    assert table.endswith("2 clustered, 2 skipped")
    assert len(plan.row("3").clusters) == 5 and sorted(sum(plan.row("3").clusters, ())) == list(range(16))


def test_strict_turns_skips_into_errors():
    spec = CSGDSpec(ratio=0.5, linear=True)
    assert "model's output" in cluster_filters(vgg(), spec).row("12").reason
    with pytest.raises(SpecError, match=r"layer '12' \(Linear, 4 channels\).*model's output"):
        cluster_filters(vgg(), spec.replace(strict=True))


def test_counts_above_the_layers_channels_are_refused():
    with pytest.raises(SpecError, match=r"layer '0' \(Conv2d\): asks for 9 channels but it has 8"):
        cluster_filters(vgg(), CSGDSpec(channels={"0": 9}))


def test_channels_naming_no_conv_or_linear_layer_are_an_error_naming_the_closest():
    model = vgg()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SpecError) as raised:
        cluster_filters(model, CSGDSpec(channels={"1": 4, "30": 2, r"conv\d": 0.5}))
    text = str(raised.value)
    assert "channels '1' (a BatchNorm2d, not a conv or linear layer; closest: '12')" in text
    assert "channels '30' (no conv or linear layer matches it; closest: '3', '0')" in text
    assert r"channels 'conv\\d' (no conv or linear layer matches it)" in text and "correct or remove it" in text
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert cluster_filters(model, CSGDSpec(ratio=None, channels={"3": 4, r"[07]": 0.5})).row("7").target == 8


def test_plan_round_trips_through_json():
    plan = cluster_filters(vgg(), CSGDSpec(ratio=0.5))
    again = FilterPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert list(again) == list(plan) and again.spec == plan.spec


@st.composite
def filters(draw):
    """Filters (n, d) with some exact duplicates, and a cluster count k <= n."""
    n = draw(st.integers(1, 40))
    d = draw(st.sampled_from([1, 3, 27, 64]))
    gen = torch.Generator().manual_seed(draw(seeds))
    distinct = draw(st.integers(1, n))
    base = torch.randn(distinct, d, generator=gen) * draw(st.sampled_from([1e-3, 1.0]))
    rows = base[torch.randint(distinct, (n,), generator=gen)]
    return rows, draw(st.integers(1, n))


@given(filters(), seeds)
def test_every_cluster_is_nonempty_and_numbered_by_first_member(data, seed):
    rows, k = data
    labels = cluster_rows(rows, k, seed)
    assert labels.shape == (rows.shape[0],)
    assert torch.equal(torch.bincount(labels, minlength=k) > 0, torch.ones(k, dtype=torch.bool))
    firsts = [int((labels == j).nonzero()[0]) for j in range(k)]
    assert firsts == sorted(firsts)


@given(filters(), seeds)
def test_clusters_are_deterministic_for_a_seed(data, seed):
    rows, k = data
    assert torch.equal(cluster_rows(rows, k, seed), cluster_rows(rows.clone(), k, seed))


def test_clusters_find_the_duplicated_filters():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 72, generator=gen)
    rows = centres[torch.arange(20) % 5] + 1e-3 * torch.randn(20, 72, generator=gen)
    labels = cluster_rows(rows, 5)
    assert torch.equal(labels, torch.arange(20) % 5)


@settings(max_examples=30)
@given(
    n=st.integers(1, 12),
    shape=st.sampled_from([(), (3,), (2, 3, 3)]),
    strength=st.floats(0, 1),
    decay=st.sampled_from([0.0, 1e-4, 0.1]),
    seed=seeds,
)
def test_transform_equals_the_dense_formula(n, shape, strength, decay, seed):
    gen = torch.Generator().manual_seed(seed)
    k = int(torch.randint(1, n + 1, (1,), generator=gen))
    labels = torch.cat([torch.arange(k), torch.randint(k, (n - k,), generator=gen)])[torch.randperm(n, generator=gen)]
    weight = torch.randn(n, *shape, dtype=torch.float64, generator=gen)
    grad = torch.randn(n, *shape, dtype=torch.float64, generator=gen)
    same = (labels[:, None] == labels[None, :]).double()
    size = same.sum(1, keepdim=True)
    m = same / size  # M_ij = 1/|cluster| within a cluster
    dec = torch.eye(n, dtype=torch.float64) * (decay + strength) - strength * same / size
    expected = m @ grad.reshape(n, -1) + dec @ weight.reshape(n, -1)
    got = centripetal_gradient(weight, grad, labels, k, strength, decay)
    torch.testing.assert_close(got, expected.reshape(grad.shape))


def batches(steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield torch.randn(16, 3, 8, 8, generator=gen), torch.randint(4, (16,), generator=gen)


def test_filters_in_a_cluster_converge_and_the_thin_model_matches():
    torch.manual_seed(0)
    model = vgg()
    plan = cluster_filters(model, CSGDSpec(ratio=0.5, strength=0.5))
    transform = CentripetalSGD(model, plan)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    transform.register(optimizer)
    start = transform.spread()
    for x, y in batches(300):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    end = transform.spread()
    assert all(start[name] > 0.3 for name in start)
    assert all(end[name] < start[name] * 1e-4 for name in end), (start, end)
    model.eval()
    x = next(batches(1, seed=1))[0]
    thinner, report = thin(model, plan, x)  # default tol: the clusters have converged
    with torch.no_grad():
        expected = model(x)
        assert ((expected - thinner(x)).abs().max() / expected.abs().max()).item() < 1e-4
    assert report.params_after < report.params_before


def test_plain_sgd_with_momentum_steps_with_the_transformed_gradient():
    torch.manual_seed(1)
    model = vgg()
    plan = cluster_filters(model, CSGDSpec(ratio=0.5, strength=0.2, weight_decay=1e-3))
    transform = CentripetalSGD(model, plan)
    optimizer = torch.optim.SGD(transform.param_groups(weight_decay=5e-4), lr=0.1, momentum=0.9)
    handle = transform.register(optimizer)
    x, y = next(batches(1))
    nn.functional.cross_entropy(model(x), y).backward()
    labels = torch.tensor(plan.row("3").labels)
    weight, grad = model[3].weight.detach().clone(), model[3].weight.grad.clone()
    optimizer.step()  # first momentum step: w - lr * transformed gradient
    expected = weight - 0.1 * centripetal_gradient(weight, grad, labels, 8, 0.2, 1e-3)
    torch.testing.assert_close(model[3].weight.detach(), expected)
    handle.remove()
    transform.register(optimizer)
    x, y = x[:4], y[:4]  # a fixed small set: the loss must fall
    with torch.no_grad():
        first = nn.functional.cross_entropy(model(x), y).item()
    for _ in range(30):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    with torch.no_grad():
        assert nn.functional.cross_entropy(model(x), y).item() < 0.5 * first


def test_bias_and_batch_norm_get_a_tenth_of_the_strength():
    model = vgg()
    plan = cluster_filters(model, CSGDSpec(ratio=0.5, strength=0.3))
    transform = CentripetalSGD(model, plan)
    params = {id(p) for p in transform.parameters()}
    assert {id(model[0].bias), id(model[1].weight), id(model[1].bias)} <= params
    assert id(model[12].weight) not in params
    for p in transform.parameters():
        p.grad = None
    transform.apply()  # no gradient: the pull alone
    labels = torch.tensor(plan.row("0").labels)
    torch.testing.assert_close(model[1].bias.grad, centripetal_gradient(model[1].bias, torch.zeros(8), labels, 4, 0.03))
    torch.testing.assert_close(
        model[0].weight.grad, centripetal_gradient(model[0].weight, torch.zeros_like(model[0].weight), labels, 4, 0.3)
    )


def test_register_warns_when_weight_decay_would_count_twice():
    model = vgg()
    transform = CentripetalSGD(model, cluster_filters(model, CSGDSpec(ratio=0.5, weight_decay=1e-4)))
    with pytest.warns(UserWarning, match="decay counts twice"):
        transform.register(torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-4))
    with pytest.warns(UserWarning, match="holds 0 of the"):
        transform.register(torch.optim.SGD(model[12].parameters(), lr=0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        transform.register(torch.optim.SGD(transform.param_groups(weight_decay=1e-4), lr=0.1))


def test_collapse_makes_every_cluster_equal():
    model = vgg()
    plan = cluster_filters(model, CSGDSpec(ratio=0.5))
    transform = CentripetalSGD(model, plan)
    assert max(transform.spread().values()) > 0.1
    collapse_(model, plan)
    assert max(transform.spread().values()) < 1e-6
    for cluster in plan.row("3").clusters:
        assert all(torch.equal(model[4].running_var[cluster[0]], model[4].running_var[c]) for c in cluster)


def test_transform_refuses_a_thinned_model():
    model = vgg()
    plan = cluster_filters(model, CSGDSpec(ratio=0.5))
    collapse_(model, plan)
    thinner, _ = thin(model, plan)
    with pytest.raises(SpecError, match=r"layer '0' has 4 output channels but the plan clusters 8"):
        CentripetalSGD(thinner, plan)
