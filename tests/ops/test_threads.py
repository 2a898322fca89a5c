"""Small work on one intra-op thread, torch's own setting restored after."""

import pytest
import torch
from torch import nn

import dkm_param as dp
from dkm_param.dkm import register as register_module
from dkm_param.ops.threads import SETTLE_WORK, SMALL_WORK, threads_for


@pytest.fixture
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def test_small_work_runs_on_one_thread_and_the_setting_comes_back(two_threads):
    with threads_for(SMALL_WORK - 1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with threads_for(SMALL_WORK):
        assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError), threads_for(10):
        raise RuntimeError("inside")
    assert torch.get_num_threads() == 2


def test_registering_and_training_a_small_layer_use_one_thread(two_threads, monkeypatch):
    seen = []
    built = register_module.DKMParametrization

    def recording(*args, **kwargs):
        seen.append(("register", torch.get_num_threads()))
        return built(*args, **kwargs)

    monkeypatch.setattr(register_module, "DKMParametrization", recording)
    soft_weight = built._soft_weight

    def soft(self, weight):
        seen.append(("forward", torch.get_num_threads()))
        return soft_weight(self, weight)

    monkeypatch.setattr(built, "_soft_weight", soft)
    model = nn.Sequential(nn.Linear(64, 33))  # 2,112 weights
    dp.register_dkm(model, dp.Policy.from_notation("fc:2/1", small_layer_bits=None))
    model(torch.randn(4, 64)).sum().backward()
    assert seen == [("register", 1), ("forward", 1)]
    assert torch.get_num_threads() == 2


def test_registration_settles_on_one_thread_and_a_step_shares_only_a_large_layer(two_threads, monkeypatch):
    from dkm_param.ops import soft, table

    seen = []

    def recording(module, name):
        original = getattr(module, name)

        def record(*args, **kwargs):
            seen.append((name, torch.get_num_threads()))
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, record)

    recording(soft, "settle")
    recording(table, "_one_iteration_backward")
    assert 512 * 512 < SMALL_WORK <= 1024 * 512 < SETTLE_WORK
    for shape, threads in (((256, 300), 1), ((512, 512), 1), ((1024, 512), 2)):  # 76,800 to 524,288 weights
        model = nn.Sequential(nn.Linear(*shape)).to(torch.bfloat16)
        seen.clear()
        dp.register_dkm(model, dp.Policy.from_notation("fc:4/1"))
        model(torch.randn(4, shape[0], dtype=torch.bfloat16)).sum().backward()
        assert seen == [("settle", 1), ("_one_iteration_backward", threads)]
        assert torch.get_num_threads() == 2
