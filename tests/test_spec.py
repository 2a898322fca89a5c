import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import dkm_param as dp
from dkm_param.spec import FLOAT32_MAX, FLOAT32_TINY, MAX_SEED


def test_defaults_are_the_papers_protocol():
    spec = dp.LayerSpec()
    assert (spec.bits, spec.dim, spec.max_iter, spec.init) == (4, 1, 5, "kmeans++")
    assert spec.clusters == 16 and spec.bits_per_weight == 4.0
    assert dp.LayerSpec(bits=6, dim=4).bits_per_weight == 1.5


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("bits", 0, "bits must be in 1..8, got 0"),
        ("bits", 9, "bits must be in 1..8, got 9"),
        ("bits", 2.0, "bits must be an int"),
        ("dim", 0, "dim must be in >= 1"),
        ("tau", -1.0, "tau must be a positive"),
        ("tau", float("nan"), "tau must be a positive"),
        ("tau_rel", 0.0, "tau_rel must be a positive"),
        ("max_iter", 0, "max_iter must be in >= 1"),
        ("settle_iter", -1, "settle_iter must be in >= 0"),
        ("epsilon", -1e-3, "epsilon must be 0 or a positive number that float32 holds"),
        ("init", "random", "init must be one of"),
        ("channel_scale", "False", "channel_scale must be True or False, got 'False'"),
    ],
)
def test_bad_field_raises_spec_error_naming_it(field, value, words):
    with pytest.raises(dp.SpecError, match=words):
        dp.LayerSpec(**{field: value})


def test_spec_error_is_a_value_error():
    with pytest.raises(ValueError):
        dp.LayerSpec(bits=99)


def test_dict_round_trip_and_unknown_keys():
    spec = dp.LayerSpec(bits=3, dim=2, tau=5e-5, seed=7)
    assert dp.LayerSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(dp.SpecError, match=r"unknown LayerSpec field\(s\) \['bitz'\]"):
        dp.LayerSpec.from_dict({"bitz": 3})


def test_misfit_names_the_cause_and_a_way_out():
    assert dp.LayerSpec(dim=4).misfit(64) is None
    msg = dp.LayerSpec(dim=5).misfit(36864)
    assert "dim=5 does not divide the weight" in msg and "36864" in msg and "8" in msg
    msg = dp.LayerSpec(dim=4, group_size=2).misfit((64, 3, 3, 3))
    assert "choose a dim that divides an output channel's 27 values" in msg
    assert "group_size=3 does not divide the 64 output channels" in dp.LayerSpec(group_size=3).misfit((64, 10))
    assert "vectors per group are fewer than the 16 clusters" in dp.LayerSpec(group_size=1).misfit((64, 10))
    msg = dp.LayerSpec(bits=8).misfit(100)
    assert "100 vectors are fewer than the 256 clusters" in msg and "bits <= 6" in msg


def test_layer_spec_is_a_storage_half_and_a_training_half():
    spec = dp.LayerSpec(bits=3, dim=2, tau=5e-5, seed=7, group_size=4, channel_scale=True, preserve_zeros=True)
    assert spec.storage == dp.StorageSpec(bits=3, dim=2, group_size=4, channel_scale=True, preserve_zeros=True)
    assert spec.training == dp.TrainingSpec(tau=5e-5, seed=7)
    assert dp.LayerSpec.from_parts(spec.storage, spec.training) == spec
    assert dp.LayerSpec.from_parts(spec.storage).training == dp.TrainingSpec()
    assert spec.replace(bits=4).storage.bits == 4


@pytest.mark.parametrize(
    "config",
    [
        dp.LayerSpec(bits=3),
        dp.StorageSpec(bits=2, preserve_zeros=True),
        dp.TrainingSpec(tau_rel=1.0),
        dp.Policy.from_notation("cv:4/1, fc:2/1"),
        dp.CSGDSpec(ratio=0.5),
    ],
    ids=lambda c: type(c).__name__,
)
def test_every_config_dict_carries_its_version_and_refuses_another(config):
    data = config.to_dict()
    assert data["version"] == 1
    assert type(config).from_dict(data) == config
    with pytest.raises(dp.SpecError, match="version 2; this dkm_param reads version 1"):
        type(config).from_dict({**data, "version": 2})


def test_a_dict_without_version_reads_as_the_current_one():
    data = dp.LayerSpec(bits=3).to_dict()
    del data["version"]
    assert dp.LayerSpec.from_dict(data) == dp.LayerSpec(bits=3)


def test_filter_plan_dict_carries_its_version():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
    plan = dp.cluster_filters(model, dp.CSGDSpec(ratio=0.5))
    data = plan.to_dict()
    assert data["version"] == 1 and dp.FilterPlan.from_dict(data) == plan
    with pytest.raises(dp.SpecError, match="version 2"):
        dp.FilterPlan.from_dict({**data, "version": 2})


def test_float32_limits_are_torchs():
    assert FLOAT32_TINY == torch.finfo(torch.float32).tiny
    assert FLOAT32_MAX == torch.finfo(torch.float32).max


@pytest.mark.parametrize("config", [dp.LayerSpec, dp.TrainingSpec])
@pytest.mark.parametrize(
    "field, value, words",
    [
        ("tau", 1e39, r"tau must be a positive number that float32 holds.*got 1e\+39 \(inf in the float32 buffer"),
        ("tau", 3.5e38, r"tau must be .*float32.*got 3.5e\+38 \(inf"),
        ("tau", 1e-50, r"tau must be .*float32.*got 1e-50 \(0 or a subnormal.*or tau=None to derive it"),
        ("tau", 1e-39, r"tau must be .*float32.*got 1e-39 \(0 or a subnormal"),
        ("tau", float("inf"), r"tau must be a positive number that float32 holds, 1.175e-38 to 3.403e\+38, got inf"),
        pytest.param("tau", 10**400, r"tau must be .*float32.*got an int of 1329 bits", id="tau-400-digits"),
        ("tau", "1e-3", r"tau must be a number, got '1e-3' \(str\)"),
        ("tau", True, r"tau must be a number, got True \(bool\)"),
        ("tau_rel", 1e39, r"tau_rel must be a positive number that float32 holds.*\(inf in the float32 buffer"),
        ("tau_rel", 1e-50, r"tau_rel must be .*float32.*\(0 or a subnormal"),
        pytest.param("tau_rel", 10**5000, r"tau_rel must be .*got an int of 16610 bits", id="tau_rel-5000-digits"),
        ("tau_rel", None, r"tau_rel must be a number, got None"),
        ("epsilon", 1e39, r"epsilon must be 0 or a positive number that float32 holds.*\(inf in the float32 buffer"),
        ("epsilon", 1e-50, r"epsilon must be 0 or .*\(0 or a subnormal.*or 0 to always run max_iter"),
        ("epsilon", float("nan"), r"epsilon must be 0 or a positive number .*got nan"),
        ("epsilon", None, r"epsilon must be a number, got None"),
    ],
)
def test_training_values_float32_cannot_hold_are_refused_where_the_spec_is_built(config, field, value, words):
    with pytest.raises(dp.SpecError, match=words):
        config(**{field: value})


@pytest.mark.parametrize("field", ["tau", "tau_rel", "epsilon"])
def test_the_float32_limits_themselves_are_accepted(field):
    for value in (FLOAT32_TINY, FLOAT32_MAX, 1):
        assert getattr(dp.LayerSpec(**{field: value}), field) == value
    assert dp.LayerSpec(epsilon=0).epsilon == 0


@given(value=st.floats(allow_nan=True, allow_infinity=True) | st.integers(min_value=-(2**200), max_value=2**200))
def test_an_accepted_tau_is_a_positive_normal_float32(value):
    try:
        spec = dp.LayerSpec(tau=value)
    except dp.SpecError as exc:
        assert "tau must be a positive number that float32 holds" in str(exc)
        return
    stored = torch.tensor(spec.tau, dtype=torch.float32)
    assert torch.isfinite(stored) and stored >= torch.finfo(torch.float32).tiny


def test_seed_is_bounded_to_what_torch_generators_take():
    assert dp.LayerSpec(seed=MAX_SEED).seed == 2**63 - 1
    torch.Generator().manual_seed(MAX_SEED)  # the largest accepted seed works
    for config, seed in ((dp.TrainingSpec, 2**64), (dp.LayerSpec, 2**63), (dp.LayerSpec, -1)):
        with pytest.raises(dp.SpecError, match=r"seed must be in 0..9223372036854775807 \(2\*\*63 - 1"):
            config(seed=seed)
    with pytest.raises(dp.SpecError, match=r"seed must be in 0..9223372036854775807.*got an int of 201 bits"):
        dp.LayerSpec(seed=2**200)
    for wrong in (True, 1.0, "0"):
        with pytest.raises(dp.SpecError, match="seed must be an int, got .*; pass a whole number"):
            dp.TrainingSpec(seed=wrong)
