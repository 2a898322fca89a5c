"""Models kept compressed: the same outputs as the decoded model, with only codebooks and packed indices resident."""

import copy
import dataclasses
import shutil

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import dkm_param as dp
from dkm_param.deploy import CompressedWeight, register_compressed
from dkm_param.format import load_compressed
from dkm_param.ops import packing
from nets import Tied, small_cnn

POLICY = dp.Policy.from_notation("cv:4/1, fc:3/2", small_layer_bits=None)


@pytest.fixture
def saved(tmp_path):
    model = small_cnn()
    compressed = dp.palettize(model, POLICY, inplace=False)
    path = compressed.save(tmp_path / "cnn.safetensors")
    return path, compressed


def test_a_model_kept_compressed_gives_the_decoded_models_outputs(saved):
    path, _ = saved
    decoded = load_compressed(path, small_cnn())
    kept = load_compressed(path, small_cnn(), keep_compressed=True)
    x = torch.randn(3, 8, 8, 8)
    with torch.no_grad():
        assert torch.equal(kept(x), decoded(x))
    for name, module in kept.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            assert torch.equal(module.weight, decoded.get_submodule(name).weight)


def test_the_full_weight_is_released_and_the_state_is_the_files(saved):
    path, compressed = saved
    kept = load_compressed(path, small_cnn(), keep_compressed=True)
    conv = kept[0]
    assert conv.parametrizations.weight.original.numel() == 0
    assert isinstance(conv.parametrizations.weight[0], CompressedWeight)
    state = kept.state_dict()
    assert torch.equal(state["0.parametrizations.weight.0.packed"],
                       packing.pack(compressed.layers["0.weight"].indices, 4))
    held = sum(t.numel() * t.element_size() for t in state.values())
    assert held <= 1.05 * path.stat().st_size  # codebooks, packed indices and plain tensors: the file's bytes
    assert "bits=4" in repr(conv.parametrizations.weight[0])


def test_tied_weights_share_one_parametrization(tmp_path):
    torch.manual_seed(0)
    model = Tied()
    compressed = dp.palettize(model, dp.Policy.from_notation("fc:4/1, emb:4/1", small_layer_bits=None),
                              inplace=False)
    path = compressed.save(tmp_path / "tied.safetensors")
    kept = load_compressed(path, Tied(), keep_compressed=True)
    decoded = load_compressed(path, Tied())
    assert kept.head.parametrizations.weight[0] is kept.wte.parametrizations.weight[0]
    tokens = torch.randint(0, 300, (2, 7))
    with torch.no_grad():
        assert torch.equal(kept(tokens), decoded(tokens))
        with parametrize.cached():
            assert torch.equal(kept(tokens), decoded(tokens))


def test_outliers_are_put_back(saved):
    _, compressed = saved
    layer = compressed.layers["4.weight"]
    index = torch.tensor([0, 7, 100, layer.numel - 1])
    compressed.layers["4.weight"] = dataclasses.replace(layer, outlier_index=index,
                                                        outlier_value=torch.tensor([5.0, -5.0, 0.25, 9.0]))
    kept = register_compressed(small_cnn(), compressed)
    assert kept[4].weight.reshape(-1)[index].tolist() == [5.0, -5.0, 0.25, 9.0]
    assert torch.equal(kept[4].weight, compressed.layers["4.weight"].weight())


def test_a_model_that_does_not_fit_is_refused_unchanged(saved):
    path, _ = saved
    other = nn.Sequential(nn.Conv2d(8, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(), nn.Linear(576, 12))
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(dp.RegistrationError, match="shape or dtype differs: 4.weight"):
        load_compressed(path, other, keep_compressed=True)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    kept = load_compressed(path, small_cnn(), keep_compressed=True)
    with pytest.raises(dp.RegistrationError, match="has a parametrization"):
        load_compressed(path, kept, keep_compressed=True)


def test_a_copy_of_a_model_kept_compressed_works(saved):
    path, _ = saved
    kept = load_compressed(path, small_cnn(), keep_compressed=True)
    twin = copy.deepcopy(kept)
    x = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        assert torch.equal(twin(x), kept(x))


@pytest.mark.slow
def test_torch_compile_decodes_the_same_weights(saved):
    if not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        pytest.skip("torch.compile on the CPU needs a C++ compiler (inductor backend), and none is installed")
    path, _ = saved
    decoded = load_compressed(path, small_cnn())
    kept = load_compressed(path, small_cnn(), keep_compressed=True)
    x = torch.randn(3, 8, 8, 8)
    try:
        with torch.no_grad():
            out = torch.compile(kept)(x)
            weight = torch.compile(lambda: kept[4].weight)()
    except torch._dynamo.exc.BackendCompilerFailed as exc:
        pytest.skip(f"the inductor backend is unavailable here: {str(exc).splitlines()[0]}")
    assert torch.equal(weight, decoded[4].weight)
    with torch.no_grad():
        torch.testing.assert_close(out, decoded(x), rtol=1e-5, atol=1e-6)


def test_a_decoded_copy_is_load_intos_model_and_keeps_ties(tmp_path):
    from dkm_param.deploy.inmemory import decoded_copy

    torch.manual_seed(0)
    model = Tied()
    compressed = dp.palettize(model, dp.Policy.from_notation("fc:4/1, emb:4/1", small_layer_bits=None),
                              inplace=False)
    twin = decoded_copy(model, compressed)
    assert twin.head.weight is twin.wte.weight and not parametrize.is_parametrized(twin)
    reference = compressed.load_into(Tied())
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in twin.state_dict().items())
    assert not torch.equal(model.mid.weight, twin.mid.weight)  # the model keeps its own weights


class Wide(nn.Module):
    """Two linear layers of the same size, large enough to be decoded into the scratch."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(256, 256)
        self.b = nn.Linear(256, 256)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.fixture
def wide(tmp_path):
    path = dp.palettize(Wide(), dp.Policy.from_notation("fc:4/1"), inplace=False).save(tmp_path / "wide.safetensors")
    return load_compressed(path, Wide()), load_compressed(path, Wide(), keep_compressed=True)


def test_inference_decodes_into_one_reused_buffer(wide):
    decoded, kept = wide
    x = torch.randn(4, 256)
    with torch.no_grad():
        first = kept(x)
        pointers = {kept.a.weight.data_ptr() for _ in range(3)} | {kept.b.weight.data_ptr()}
        assert len(pointers) == 1  # each weight read in turn lands in the same memory
        assert torch.equal(kept(x), decoded(x)) and torch.equal(first, decoded(x))
    with torch.inference_mode():
        assert torch.equal(kept(x), decoded(x))
    with torch.no_grad():  # a buffer made in inference mode is still writable outside it
        assert torch.equal(kept(x), decoded(x))


def test_a_weight_the_caller_keeps_is_never_overwritten(wide):
    decoded, kept = wide
    with torch.no_grad():
        a = kept.a.weight
        alias = kept.a.weight.detach()  # another tensor over the same memory
        del a
        view = kept.a.weight.t()
        b = kept.b.weight  # decoded while the others are alive: into fresh memory
        assert b.data_ptr() != alias.data_ptr() and b.data_ptr() != view.data_ptr()
        kept(torch.randn(2, 256))
    assert torch.equal(alias, decoded.a.weight) and torch.equal(view, decoded.a.weight.t())
    assert torch.equal(b, decoded.b.weight)


def test_with_gradients_each_weight_gets_its_own_memory(wide):
    decoded, kept = wide
    x = torch.randn(4, 256, requires_grad=True)
    kept(x).sum().backward()
    y = x.detach().requires_grad_()
    decoded(y).sum().backward()
    assert torch.equal(x.grad, y.grad)


def test_a_copied_kept_model_has_its_own_scratch(wide):
    decoded, kept = wide
    x = torch.randn(2, 256)
    with torch.no_grad():
        kept(x)
        twin = copy.deepcopy(kept)
        scratch = twin.a.parametrizations.weight[0].scratch
        assert scratch is twin.b.parametrizations.weight[0].scratch  # shared by the copy's layers
        assert scratch is not kept.a.parametrizations.weight[0].scratch
        assert torch.equal(twin(x), decoded(x)) and torch.equal(kept(x), decoded(x))
