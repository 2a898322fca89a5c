import pytest
import torch
from torch import nn

import dkm_param as dp
from dkm_param.dkm.codebooks import CodebookParametrization
from dkm_param.posttrain.palettize import cluster_weight


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


POLICY = dp.Policy(default=dp.LayerSpec(bits=3, dim=2), small_layer_bits=None)


def test_codeword_gradient_is_the_mean_over_its_vectors():
    weight = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    layer = cluster_weight(weight, dp.LayerSpec(bits=2, dim=2))
    param = CodebookParametrization(layer)
    probe = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    (param(weight) * probe).sum().backward()
    per_vector = probe.reshape(-1, 2)
    for j in range(4):
        members = layer.indices.long() == j
        expect = per_vector[members].mean(0) if members.any() else torch.zeros(2)
        assert torch.allclose(param.codebook.grad[j], expect, atol=1e-6)


def test_finetuning_keeps_assignments_lowers_the_loss_and_finalizes(tmp_path):
    model = mlp()
    compressed = dp.palettize(model, POLICY)
    codebooks = dp.finetune_codebooks(model, compressed)
    assert len(codebooks) == 3 and all(p.requires_grad for p in codebooks)
    assert not model[2].parametrizations.weight.original.requires_grad
    opt = torch.optim.Adam(codebooks, lr=1e-2)
    x, y = torch.randn(64, 32), torch.arange(64) % 10
    losses = []
    for _ in range(20):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    final = dp.finalize(model)
    for key, layer in final.layers.items():
        assert torch.equal(layer.indices, compressed.layers[key].indices)  # assignments frozen
        assert not torch.equal(layer.codebook, compressed.layers[key].codebook)  # codebooks trained
        assert torch.equal(model.state_dict()[key], layer.weight())
    fresh = dp.load_compressed(final.save(tmp_path / "ft.safetensors"), mlp(seed=4))
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())


def test_pinned_zero_stays_zero_while_finetuning():
    model = mlp()
    with torch.no_grad():
        model[2].weight.mul_(torch.rand(64, 64, generator=torch.Generator().manual_seed(0)) > 0.5)
    zeros = model[2].weight == 0
    compressed = dp.palettize(
        model, dp.Policy(default=dp.LayerSpec(bits=3, preserve_zeros=True), small_layer_bits=None)
    )
    opt = torch.optim.SGD(dp.finetune_codebooks(model, compressed), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 32)).pow(2).mean().backward()
        opt.step()
    assert (model[2].weight[zeros] == 0).all()


def test_finetune_refuses_a_registered_or_different_model():
    model = mlp()
    compressed = dp.palettize(model, POLICY, inplace=False)
    dp.register_dkm(model, POLICY)
    with pytest.raises(dp.RegistrationError, match="already has a parametrization"):
        dp.finetune_codebooks(model, compressed)
    other = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    with pytest.raises(dp.RegistrationError, match=r"layer '2': weight \(32, 64\) vs compressed \(64, 64\)"):
        dp.finetune_codebooks(other, compressed)


def test_an_alias_the_model_does_not_tie_is_refused():
    from nets import Tied

    tied = Tied()
    compressed = dp.palettize(tied, dp.Policy(kinds={"fc": dp.LayerSpec(bits=3), "emb": dp.LayerSpec(bits=3)},
                                              small_layer_bits=None), inplace=False)
    untied = Tied()
    untied.head.weight = torch.nn.Parameter(untied.wte.weight.detach().clone())
    with pytest.raises(dp.RegistrationError, match="does not tie the two weights"):
        dp.finetune_codebooks(untied, compressed)
    assert not any(hasattr(m, "parametrizations") for m in untied.modules())
