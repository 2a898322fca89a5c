"""The sparse part: outliers kept exact by palettize, stored, read, checked and decoded; version 1 files still read."""

import json
import re
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

import dkm_param as dp
from dkm_param.posttrain import calibration

DATA = Path(__file__).parent.parent / "data"


def heavy_tailed(rows: int, columns: int, seed: int = 0) -> nn.Linear:
    """A linear layer whose weights are Gaussian with a few large values, as in language models."""
    torch.manual_seed(seed)
    layer = nn.Linear(columns, rows, bias=False)
    with torch.no_grad():
        layer.weight.normal_()
        spots = torch.randperm(layer.weight.numel())[: max(1, layer.weight.numel() // 100)]
        layer.weight.view(-1)[spots] *= 20
    return layer


@settings(max_examples=25, deadline=None)
@given(
    bits=st.integers(1, 4),
    dim=st.sampled_from([1, 2]),
    fraction=st.sampled_from([0.001, 0.01, 0.1, 0.5]),
    grouped=st.booleans(),
    scaled=st.booleans(),
    half=st.booleans(),
)
def test_outliers_are_the_largest_weights_kept_exact(tmp_path_factory, bits, dim, fraction, grouped, scaled, half):
    model = nn.Sequential(heavy_tailed(8, 16))
    if half:
        model.half()
    original = model[0].weight.detach().clone()
    spec = dp.LayerSpec(bits=bits, dim=dim, group_size=4 if grouped else None, channel_scale=scaled)
    count = int(fraction * original.numel())
    dense = original.numel() * original.element_size()
    try:
        compressed = dp.palettize(model, dp.Policy(default=spec, small_layer_bits=None), outliers=fraction)
    except dp.DKMError as refused:  # the exact part would leave the layer no smaller: refused, nothing changed
        assert "not less than its own" in str(refused) and torch.equal(model[0].weight, original)
        codebooks = (2 if grouped else 1) * 2**bits * dim * original.element_size()
        scales = 8 * 4 if scaled else 0  # float32 scales, one per row
        indices = -(-original.numel() // dim * bits // 8)
        assert codebooks + scales + indices + count * (4 + original.element_size()) >= dense
        return
    layer = compressed.layers["0.weight"]
    assert layer.outliers == count and layer.nbytes < dense
    decoded = model[0].weight.detach()
    if count:
        index = layer.outlier_index
        assert torch.equal(index, index.unique())  # sorted, each once
        assert torch.equal(decoded.reshape(-1)[index], original.reshape(-1)[index])  # exact, in the weight's dtype
        score = original.float().abs()
        if scaled:
            score = score / score.amax(1, keepdim=True)
        kept = torch.zeros(original.numel(), dtype=torch.bool)
        kept[index] = True
        assert score.reshape(-1)[kept].min() >= score.reshape(-1)[~kept].max()  # the largest, no others
    rest = torch.ones(original.numel(), dtype=torch.bool)
    if count:
        rest[layer.outlier_index] = False
    groups = 2 if grouped else 1
    if not scaled:  # at most 2**bits vectors per group's table, besides the outliers
        vectors, inliers = decoded.float().reshape(groups, -1, dim), rest.reshape(groups, -1, dim).all(-1)
        for g in range(groups):
            assert len(vectors[g][inliers[g]].unique(dim=0)) <= 2**bits
    path = compressed.save(tmp_path_factory.mktemp("o") / "m.safetensors")
    read = dp.read_compressed(path).layers["0.weight"]
    assert read.outliers == count and torch.equal(read.weight(), decoded)


def test_outliers_lower_the_error_on_heavy_tailed_weights():
    errors = {}
    for fraction in (0.0, 0.01):
        model = nn.Sequential(heavy_tailed(64, 128))
        original = model[0].weight.detach().clone()
        dp.palettize(model, dp.Policy(default=dp.LayerSpec(bits=3), small_layer_bits=None), outliers=fraction)
        errors[fraction] = float((model[0].weight.detach() - original).pow(2).sum())
    assert errors[0.01] < 0.5 * errors[0.0]


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_calibrated_outliers_sit_at_their_own_positions(kind):
    """With inputs that make H the identity there is no error feedback: the kept values are the weights."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "linear":
        model = nn.Sequential(heavy_tailed(12, 16))
    else:
        model = nn.Sequential(transformers.pytorch_utils.Conv1D(12, 16))
        with torch.no_grad():
            model[0].weight.copy_(heavy_tailed(16, 12).weight)
    original = model[0].weight.detach().clone()
    batches = [torch.eye(16)]
    compressed = dp.palettize(
        model, dp.Policy(default=dp.LayerSpec(bits=2), small_layer_bits=None), calibration=batches, damp=0.0,
        outliers=0.05,
    )
    layer = compressed.layers["0.weight"]
    index = layer.outlier_index
    assert layer.outliers == int(0.05 * original.numel())
    assert torch.equal(layer.outlier_value, original.reshape(-1)[index])
    largest = original.abs().reshape(-1).topk(layer.outliers).indices.sort().values
    assert torch.equal(index, largest)


def test_calibrated_outliers_keep_the_values_error_feedback_gave_them():
    torch.manual_seed(1)
    model = nn.Sequential(heavy_tailed(16, 32))
    x = torch.randn(256, 32) @ torch.randn(32, 32)  # correlated inputs: feedback moves the later columns
    errors = {}
    for fraction in (0.0, 0.02):
        trial = nn.Sequential(heavy_tailed(16, 32))
        reference = trial(x)
        dp.palettize(trial, dp.Policy(default=dp.LayerSpec(bits=2), small_layer_bits=None), calibration=[x],
                     outliers=fraction)
        errors[fraction] = float((trial(x) - reference).detach().pow(2).mean())
    assert errors[0.02] < errors[0.0]
    del model


def test_assign_with_exact_values_adds_no_error_of_their_own():
    torch.manual_seed(0)
    rows, hessian = torch.randn(6, 8), torch.eye(8)
    books = torch.tensor([[[-1.0], [1.0]]])
    exact = torch.zeros(6, 8, dtype=torch.bool)
    exact[2, 3] = exact[5, 0] = True
    group_of = torch.zeros(6, 8, dtype=torch.long)
    chosen, kept = calibration.assign(rows, hessian, books, group_of, None, None, 0.0, exact)
    assert torch.equal(kept[exact], rows[exact]) and (kept[~exact] == 0).all()
    with_exact = calibration.output_error(rows, hessian, chosen, books, group_of, None, exact, kept)
    without = calibration.output_error(rows, hessian, chosen, books, group_of, None)
    gaps = (rows - books[0, chosen, 0]).pow(2)
    assert with_exact == pytest.approx(without - float(gaps[exact].sum()), rel=1e-5)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"outliers": 1.0}, "outliers must be a fraction of each layer's weights in [0, 1)"),
        ({"outliers": -0.1}, "outliers must be a fraction"),
        ({"outliers": True}, "outliers must be a fraction"),
        ({"outliers": "1%"}, "outliers must be a fraction"),
        ({"outliers": 0.01, "outlier_by": "size"}, "outlier_by must be 'magnitude' or 'sensitivity', got 'size'"),
        ({"outliers": 0.01, "outlier_by": "sensitivity"}, "needs the sensitivity of layer '0'"),
        ({"outliers": 0.5}, "layer '0' (128 weights): outliers=0.5 keeps 64 of them exact, 512 B with their positions"),
    ],
)
def test_bad_outlier_arguments_are_refused_before_any_change(kwargs, words):
    model = nn.Sequential(heavy_tailed(8, 16))
    before = model[0].weight.detach().clone()
    with pytest.raises(dp.DKMError, match=re.escape(words)):
        dp.palettize(model, dp.Policy(default=dp.LayerSpec(bits=2), small_layer_bits=None), **kwargs)
    assert torch.equal(model[0].weight, before)


def test_outliers_by_sensitivity_are_the_most_sensitive_weights():
    model = nn.Sequential(heavy_tailed(8, 16))
    sensitivity = {"0": torch.rand(8, 16)}
    compressed = dp.palettize(
        model, dp.Policy(default=dp.LayerSpec(bits=2), small_layer_bits=None), sensitivity=sensitivity,
        outliers=0.1, outlier_by="sensitivity",
    )
    index = compressed.layers["0.weight"].outlier_index
    assert torch.equal(index, sensitivity["0"].reshape(-1).topk(12).indices.sort().values)


# -- the file ------------------------------------------------------------------------------------------------------


@pytest.fixture
def outlier_file(tmp_path):
    model = nn.Sequential(heavy_tailed(8, 16))
    compressed = dp.palettize(model, dp.Policy(default=dp.LayerSpec(bits=2), small_layer_bits=None), outliers=0.05)
    return compressed.save(tmp_path / "m.safetensors"), model


def rewrite(path: Path, change_tensors=None, change_layer=None, version=None) -> Path:
    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    layers = json.loads(meta["layers"])
    if change_tensors:
        change_tensors(tensors)
    if change_layer:
        change_layer(layers["0.weight"])
    meta["layers"] = json.dumps(layers)
    if version:
        meta["format_version"] = version
    out = path.with_name("changed.safetensors")
    save_file(tensors, str(out), metadata=meta)
    return out


def _set(name, make):
    return lambda tensors: tensors.__setitem__(name, make(tensors[name]))


@pytest.mark.parametrize(
    "tensors, layer, words",
    [
        (_set("0.weight.outlier_index", lambda t: t.flip(0)), None, "strictly increasing"),
        (_set("0.weight.outlier_index", lambda t: torch.cat([t[:1], t[:-1]])), None, "strictly increasing"),
        (_set("0.weight.outlier_index", lambda t: t + 1000), None, "outlier positions must lie in 0..127"),
        (_set("0.weight.outlier_index", lambda t: t - 1000), None, "outlier positions must lie in 0..127"),
        (_set("0.weight.outlier_index", lambda t: t.float()), None, "outlier_index must be int32 or int64"),
        (_set("0.weight.outlier_value", lambda t: t.double()), None, "outlier_value must be in the weight's dtype"),
        (_set("0.weight.outlier_value", lambda t: t.index_fill(0, torch.tensor([0]), float("nan"))), None,
         "outlier values hold NaN or Inf"),
        (_set("0.weight.outlier_value", lambda t: t[:-1]), None, "tensor '0.weight.outlier_value' must have shape"),
        (lambda t: t.pop("0.weight.outlier_value"), None, "tensor '0.weight.outlier_value' is missing"),
        (None, lambda info: info.update(outliers=0), "outliers is 0 but tensor '0.weight.outlier_index' is there"),
        (None, lambda info: info.update(outliers=10**6), "outliers must be an integer in 0..128"),
        (None, lambda info: info.update(outliers=2.0), "outliers must be an integer"),
    ],
)
def test_hostile_sparse_parts_are_refused(outlier_file, tensors, layer, words):
    path, _ = outlier_file
    with pytest.raises(dp.FormatError, match=re.escape(words)):
        dp.read_compressed(rewrite(path, tensors, layer))


def test_a_version_1_file_cannot_hold_outliers(outlier_file):
    path, _ = outlier_file
    with pytest.raises(dp.FormatError, match=re.escape("unknown key(s) ['outliers']; format version 1 knows")):
        dp.read_compressed(rewrite(path, version="1"))


def test_files_of_format_version_1_still_read_bit_for_bit():
    """A file the version-1 writer made (dkm-param before the sparse part), with vectors, groups, scales, bf16."""
    compressed = dp.read_compressed(DATA / "format_v1.safetensors")
    expected = load_file(str(DATA / "format_v1_decoded.safetensors"))
    state = compressed.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name
    assert all(layer.outliers == 0 for layer in compressed.layers.values())


def test_written_files_say_version_2_and_count_outliers(outlier_file):
    path, model = outlier_file
    size = struct.unpack("<Q", path.read_bytes()[:8])[0]
    header = json.loads(path.read_bytes()[8 : 8 + size])
    meta = header["__metadata__"]
    assert meta["format_version"] == "2"
    assert json.loads(meta["layers"])["0.weight"]["outliers"] == 6
    assert header["0.weight.outlier_index"]["dtype"] == "I32" and header["0.weight.outlier_value"]["dtype"] == "F32"
    fresh = nn.Sequential(heavy_tailed(8, 16, seed=3))
    dp.load_compressed(path, fresh)
    assert torch.equal(fresh[0].weight, model[0].weight)


def test_summary_and_inspect_count_the_sparse_part(outlier_file, capsys):
    path, _ = outlier_file
    compressed = dp.read_compressed(path)
    layer = compressed.layers["0.weight"]
    assert layer.nbytes == 4 * 4 + 128 * 2 // 8 + 6 * (4 + 4)  # codebook, indices, positions and values
    row = compressed.summary().rows[0]
    assert row.outliers == 6 and row.bytes_after == layer.nbytes
    assert "6 kept exact" in str(compressed.summary())
    from dkm_param.cli import main

    assert main(["inspect", str(path)]) == 0
    assert "6 kept exact" in capsys.readouterr().out
    assert main(["inspect", "--json", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["layers"][0]["outliers"] == 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_numpy_decoder_reads_the_sparse_part_and_bfloat16(tmp_path, dtype):
    np = pytest.importorskip("numpy")
    pytest.importorskip("ml_dtypes")
    import runpy

    model = nn.Sequential(heavy_tailed(8, 16), nn.ReLU(), heavy_tailed(4, 8, seed=1)).to(dtype)
    spec = dp.LayerSpec(bits=2, group_size=4, channel_scale=True)
    path = dp.palettize(model, dp.Policy(default=spec, small_layer_bits=None), outliers=0.05).save(
        tmp_path / "m.safetensors"
    )
    decode = runpy.run_path(str(DATA.parent.parent / "examples" / "decode_numpy.py"))["decode"]
    decoded = decode(str(path))
    for name, tensor in model.state_dict().items():
        assert np.array_equal(decoded[name].astype(np.float32), tensor.float().numpy()), name
        assert str(decoded[name].dtype) == str(dtype).removeprefix("torch."), name


def test_numpy_decoder_without_a_file_says_how_to_call_it():
    import subprocess
    import sys

    run = subprocess.run([sys.executable, str(DATA.parent.parent / "examples" / "decode_numpy.py")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "usage: python decode_numpy.py MODEL.safetensors" in run.stderr
    assert "Traceback" not in run.stderr
