"""dp.snapped and dp.scale_temperature: the snapped view during training, and annealing tau."""

import pytest
import torch
from torch import nn

import dkm_param as dp


def registered(bits=2):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    dp.register_dkm(model, dp.Policy(default=dp.LayerSpec(bits=bits), small_layer_bits=None))
    return model.train()


def test_snapped_gives_the_eval_weights_in_training_mode_and_restores():
    model = registered()
    soft = model[0].weight.detach().clone()
    with dp.snapped(model):
        assert model.training
        hard = model[0].weight.detach().clone()
        assert torch.unique(hard).numel() <= 4
    assert torch.equal(model[0].weight.detach(), soft)
    model.eval()
    assert torch.equal(model[0].weight.detach(), hard)
    model.train()
    with pytest.raises(RuntimeError, match="inside"):
        with dp.snapped(model):
            raise RuntimeError("inside")
    assert not any(getattr(m, "snapping", False) for m in model.modules())


def test_annealing_brings_the_soft_weights_to_the_snapped_ones():
    model = registered(bits=3)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    gaps = []
    for _ in range(6):
        soft = model(x)  # a training forward, with gradient: it moves the warm-started codebooks
        soft.sum().backward()
        with torch.no_grad(), dp.snapped(model):
            hard = model(x)
        gaps.append(float((soft.detach() - hard).abs().max()))
        dp.scale_temperature(model, 0.3)
    assert gaps[0] > 0 and gaps[-1] < 0.05 * gaps[0]


def test_a_new_temperature_is_not_served_from_the_cached_step():
    model = registered(bits=3)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(x)
        dp.scale_temperature(model, 0.01)
        assert not torch.equal(model(x), before)


def test_scale_temperature_multiplies_every_tau_or_changes_none():
    model = registered()
    before = [model[i].parametrizations.weight[0].tau.clone() for i in (0, 2)]
    dp.scale_temperature(model, 0.5)
    for i, tau in zip((0, 2), before):
        torch.testing.assert_close(model[i].parametrizations.weight[0].tau, tau * 0.5)
    for bad in (0.0, -1.0, float("inf"), float("nan"), "0.5"):
        with pytest.raises(dp.DKMError, match="positive finite"):
            dp.scale_temperature(model, bad)
    with pytest.raises(dp.DKMError, match="leaves float32's normal range"):
        dp.scale_temperature(model, 1e-40)
    for i, tau in zip((0, 2), before):  # nothing changed by the refused calls
        torch.testing.assert_close(model[i].parametrizations.weight[0].tau, tau * 0.5)
    with pytest.raises(dp.RegistrationError, match="no weight has DKM registered"):
        dp.scale_temperature(nn.Linear(2, 2), 0.5)
    with pytest.raises(dp.RegistrationError, match="no weight has DKM registered"):
        with dp.snapped(nn.Linear(2, 2)):
            pass
