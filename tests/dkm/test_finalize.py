"""finalize: exports through one protocol, and never half-applies."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import dkm_param as dp
from dkm_param.dkm.exportable import ExportableParametrization
from dkm_param.format import CompressedLayer
from dkm_param.posttrain.palettize import cluster_weight


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


POLICY = dp.Policy(default=dp.LayerSpec(bits=2), small_layer_bits=None)


def test_both_parametrizations_meet_the_protocol():
    model = mlp()
    dp.register_dkm(model, POLICY)
    assert isinstance(model[0].parametrizations.weight[0], ExportableParametrization)
    other = mlp()
    dp.finetune_codebooks(other, dp.palettize(other, POLICY, inplace=False))
    assert isinstance(other[0].parametrizations.weight[0], ExportableParametrization)
    assert not isinstance(nn.Identity(), ExportableParametrization)


class SignOnly(nn.Module):
    """A parametrization of another kind: each weight becomes +-mean|w| (1 bit), exported as such."""

    def __init__(self, weight):
        super().__init__()
        self.spec = dp.LayerSpec(bits=1)
        self.name = "custom"
        self.skipped = ()
        self.register_buffer("level", weight.detach().abs().mean())

    def forward(self, weight):
        return torch.where(weight >= 0, self.level, -self.level)

    def export_layer(self, weight, stored):
        codebook = torch.stack([-self.level, self.level]).to(stored)[:, None]
        indices = (weight.detach().reshape(-1) >= 0).to(torch.uint8)
        return CompressedLayer(tuple(weight.shape), weight.dtype, self.spec, codebook, indices)


def test_finalize_exports_any_parametrization_that_meets_the_protocol():
    model = mlp()
    parametrize.register_parametrization(model[2], "weight", SignOnly(model[2].weight))
    want = model[2].weight.detach().clone()
    compressed = dp.finalize(model)
    assert list(compressed.layers) == ["2.weight"]
    assert torch.equal(model[2].weight, want) and not parametrize.is_parametrized(model[2])


def test_a_finalize_that_fails_on_one_layer_changes_no_layer():
    model = mlp()
    dp.register_dkm(model, POLICY)
    with torch.no_grad():
        model[2].parametrizations.weight[0].codebook[0] = float("inf")
    originals = {i: model[i].parametrizations.weight.original.detach().clone() for i in (0, 2, 4)}
    with pytest.raises(dp.DKMError, match="layer '2'"):
        dp.finalize(model)
    for i, original in originals.items():
        assert parametrize.is_parametrized(model[i], "weight")
        assert torch.equal(model[i].parametrizations.weight.original, original)


def test_a_codebook_that_overflows_its_stored_dtype_is_refused():
    model = mlp()
    dp.register_dkm(model, POLICY)
    with torch.no_grad():
        model[0].parametrizations.weight[0].codebook[0] = 1e10  # finite in float32, inf in float16
    with pytest.raises(dp.DKMError, match="layer '0'.*float16"):
        dp.finalize(model, codebook_dtype=torch.float16)
    assert parametrize.is_parametrized(model[0], "weight")


def test_finalize_keeps_the_users_parameter_objects():
    model = mlp()
    params = [model[i].weight for i in (0, 2, 4)]
    dp.register_dkm(model, POLICY)
    model.eval()
    compressed = dp.finalize(model)
    for i, param in zip((0, 2, 4), params):
        assert model[i].weight is param
        assert torch.equal(param, compressed.layers[f"{i}.weight"].weight())


def test_palettize_that_fails_on_one_layer_changes_no_weight():
    model = mlp()
    with torch.no_grad():
        model[4].weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(dp.DKMError, match="layer '4'"):
        dp.palettize(model, POLICY)
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before if k != "4.weight")
    assert torch.equal(after["0.weight"], before["0.weight"])


def test_cluster_weight_takes_a_storage_spec():
    weight = torch.randn(8, 12)
    layer = cluster_weight(weight, dp.StorageSpec(bits=2))
    assert layer.spec == dp.StorageSpec(bits=2) and layer.codebook.shape == (4, 1)


def test_a_layer_a_wider_codebook_dtype_would_make_larger_is_stored_as_its_snapped_weight(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 400)).to(torch.bfloat16)
    plan = dp.register_dkm(model, dp.Policy())  # layer 0 at 8 bits: 512 B of bfloat16 codebook and 600 B of indices
    assert plan.row("0").spec.bits == 8
    compressed = dp.finalize(model, codebook_dtype=torch.float32)  # 1,024 B of codebook: not less than its 1,200 B
    assert list(compressed.layers) == ["2.weight"] and "0.weight" in compressed.tensors
    kept = compressed.tensors["0.weight"]
    assert kept.dtype == torch.bfloat16 and torch.equal(kept, model[0].weight.detach())
    assert kept.unique().numel() <= 256  # snapped, like every clustered weight
    row = next(r for r in compressed.summary().rows if r.name == "0.weight")
    assert row.bits is None and row.bytes_after == row.bytes_before == 1200
    assert "kept as it is, snapped: with codebooks in float32, 8 bits would take 1,624 B, not less than its own " \
           "1,200 B in bfloat16" in row.note
    fresh = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 400)).to(torch.bfloat16)
    dp.load_compressed(compressed.save(tmp_path / "m.safetensors"), fresh)
    state = model.state_dict()
    assert all(torch.equal(value, state[name]) for name, value in fresh.state_dict().items())
