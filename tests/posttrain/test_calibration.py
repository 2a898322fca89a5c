"""Calibrated palettization: input statistics, GPTQ assignment to the lookup table, the refit."""

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import dkm_param as dp
from dkm_param.posttrain import calibration, palettize
from strategies import seeds


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1, stride=2)
        self.fc = nn.Linear(32 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).flatten(1))


def relative_error(model, reference, inputs) -> float:
    with torch.no_grad():
        want = reference(inputs)
        return float((model(inputs) - want).pow(2).mean() / want.pow(2).mean())


def palettized(model, policy, **options):
    copied = copy.deepcopy(model)
    return copied, dp.palettize(copied, policy, **options)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_calibration_lowers_the_output_error_of_plain_palettization(bits):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    inputs = torch.randn(2048, 64) @ torch.randn(64, 64) * 0.3  # correlated features, as real activations are
    policy = dp.Policy(default=dp.LayerSpec(bits=bits), small_layer_bits=None)
    plain, _ = palettized(model, policy)
    calibrated, _ = palettized(model, policy, calibration=[inputs[:1024]])
    held_out = inputs[1024:]
    assert relative_error(calibrated, model, held_out) < 0.75 * relative_error(plain, model, held_out)


@pytest.mark.parametrize(
    "spec",
    [dp.LayerSpec(bits=3), dp.LayerSpec(bits=3, group_size=8), dp.LayerSpec(bits=3, channel_scale=True),
     dp.LayerSpec(bits=3, layout="input"), dp.LayerSpec(bits=4, dim=4, layout="input"), dp.LayerSpec(bits=4, dim=2),
     dp.LayerSpec(bits=3, preserve_zeros=True)],
    ids=["tensor", "groups", "scales", "input-layout", "vectors-input", "vectors", "zeros"],
)
def test_every_storage_spec_calibrates_saves_and_loads(spec, tmp_path):
    model = ConvNet()
    with torch.no_grad():  # pruned weights for preserve_zeros
        model.c2.weight[:, :, 0, 0] = 0
    inputs = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    policy = dp.Policy(default=spec, small_layer_bits=None, skip=("c1",) if spec.dim > 1 else ())
    plain, _ = palettized(model, policy)
    calibrated, compressed = palettized(model, policy, calibration=[inputs[:32]])
    assert relative_error(calibrated, model, inputs[32:]) < relative_error(plain, model, inputs[32:])
    compressed.save(tmp_path / "model.safetensors")
    fresh = ConvNet()
    dp.load_compressed(tmp_path / "model.safetensors", fresh)
    for name, tensor in calibrated.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name
    for key, layer in compressed.layers.items():
        assert int(layer.indices.max()) < spec.clusters
    if spec.preserve_zeros:
        assert (calibrated.c2.weight[:, :, 0, 0] == 0).all()


@pytest.mark.parametrize(
    "spec", [dp.LayerSpec(bits=3), dp.LayerSpec(bits=3, group_size=8), dp.LayerSpec(bits=3, channel_scale=True)],
    ids=["tensor", "groups", "scales"],
)
def test_gpt2_conv1d_layers_calibrate_from_dict_batches(spec, tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=60, n_positions=32)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    tokens = torch.randint(0, 60, (8, 16), generator=torch.Generator().manual_seed(3))
    policy = dp.Policy(default=None, kinds={"fc": spec}, small_layer_bits=None, skip=("lm_head",))
    plain, _ = palettized(model, policy)
    calibrated, compressed = palettized(model, policy, calibration=[{"input_ids": tokens[:4]}])
    assert "transformer.h.0.attn.c_attn.weight" in compressed.layers
    compressed.save(tmp_path / "gpt2.safetensors")
    fresh = copy.deepcopy(model)
    dp.load_compressed(tmp_path / "gpt2.safetensors", fresh)
    assert torch.equal(fresh.transformer.h[0].mlp.c_fc.weight, calibrated.transformer.h[0].mlp.c_fc.weight)

    def error(copied):
        with torch.no_grad():
            want = model(tokens[4:]).logits
            return float((copied(tokens[4:]).logits - want).pow(2).mean())

    assert error(calibrated) < error(plain)


@given(seed=seeds, d=st.sampled_from([1, 2]), groups=st.sampled_from([1, 2]))
def test_with_uncorrelated_inputs_assignment_is_nearest_centroid(seed, d, groups):
    # a diagonal H leaves no other column to push an error onto: GPTQ is plain rounding to the grid
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(6, 8, generator=gen, dtype=torch.float64)
    books = torch.randn(groups, 4, d, generator=gen, dtype=torch.float64)
    group_of_row = torch.arange(6) // (6 // groups)
    hessian = torch.diag(torch.rand(8, generator=gen, dtype=torch.float64) + 0.5)
    chosen, _ = calibration.assign(rows, hessian, books, group_of_row[:, None].expand(6, 8 // d), None, None, 0.0)
    vectors = rows.reshape(6, -1, d)
    distances = (vectors[:, :, None, :] - books[group_of_row][:, None]).pow(2).sum(-1)  # (6, C/d, k)
    assert torch.equal(chosen, distances.argmin(-1))


def test_statistics_in_several_passes_give_the_same_layers(monkeypatch):
    model = ConvNet()
    inputs = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    policy = dp.Policy(default=dp.LayerSpec(bits=3), small_layer_bits=None)
    _, together = palettized(model, policy, calibration=[inputs])
    monkeypatch.setattr(palettize, "_STATISTICS_BYTES", 1)  # one layer per pass
    seen = []
    real = calibration.input_statistics

    def counting(model, batches, names):
        seen.append(list(names))
        return real(model, batches, names)

    monkeypatch.setattr(palettize, "input_statistics", counting)
    _, apart = palettized(model, policy, calibration=[inputs])
    assert seen == [["c1"], ["c2"], ["fc"]]
    for key, layer in together.layers.items():
        assert torch.equal(layer.indices, apart.layers[key].indices)
        assert torch.equal(layer.codebook, apart.layers[key].codebook)


def test_layers_calibration_cannot_read_are_errors_before_any_change():
    model = nn.Sequential(nn.Embedding(20, 16), nn.Linear(16, 16))
    before = copy.deepcopy(model.state_dict())
    policy = dp.Policy.from_notation("emb:3/1, fc:3/1", small_layer_bits=None)
    with pytest.raises(dp.DKMError, match=r"layer '0' \(Embedding\): calibration reads Linear"):
        dp.palettize(model, policy, calibration=[torch.arange(6)])
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(dp.DKMError, match=r"layer '0' \(Conv2d with groups=2"):
        dp.palettize(grouped, dp.Policy(default=dp.LayerSpec(bits=2), small_layer_bits=None),
                     calibration=[torch.randn(1, 4, 5, 5)])
    linear = nn.Sequential(nn.Linear(6, 4))
    with pytest.raises(dp.DKMError, match=r"dim=4 along the 6 input features"):
        dp.palettize(linear, dp.Policy(default=dp.LayerSpec(bits=2, dim=4), small_layer_bits=None),
                     calibration=[torch.randn(3, 6)])
    with pytest.raises(dp.DKMError, match="at least one batch"):
        dp.palettize(linear, dp.Policy(default=dp.LayerSpec(bits=2), small_layer_bits=None), calibration=[])
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name])


def test_a_layer_the_batches_never_reach_is_an_error():
    class Branches(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(dp.DKMError, match=r"layer 'unused' received no input"):
        dp.palettize(Branches(), dp.Policy(default=dp.LayerSpec(bits=2), small_layer_bits=None),
                     calibration=[torch.randn(4, 8)])


def test_bad_calibration_inputs_and_damping_are_errors():
    model = nn.Sequential(nn.Linear(8, 8))
    policy = dp.Policy(default=dp.LayerSpec(bits=2), small_layer_bits=None)
    broken = torch.randn(4, 8)
    broken[1, 2] = float("nan")
    with pytest.raises(dp.DKMError, match=r"layer '0': its calibration inputs hold NaN or Inf"):
        dp.palettize(model, policy, calibration=[broken])
    for damp in (-0.1, float("nan"), "0.01"):
        with pytest.raises(dp.DKMError, match="damp must be a finite number"):
            dp.palettize(model, policy, calibration=[torch.randn(4, 8)], damp=damp)


def test_bfloat16_models_calibrate():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).to(torch.bfloat16)
    inputs = (torch.randn(256, 32) @ torch.randn(32, 32) * 0.3).to(torch.bfloat16)
    policy = dp.Policy(default=dp.LayerSpec(bits=3), small_layer_bits=None)
    plain, _ = palettized(model, policy)
    calibrated, compressed = palettized(model, policy, calibration=[inputs[:128]])
    assert calibrated[0].weight.dtype == torch.bfloat16
    assert torch.unique(calibrated[0].weight).numel() <= 8
    assert relative_error(calibrated.float(), model.float(), inputs[128:].float()) < relative_error(
        plain.float(), model.float(), inputs[128:].float()
    )
