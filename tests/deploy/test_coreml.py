"""Core ML: every clustered weight of the saved package is the file's lookup table and indices, bit for bit.

Conversion runs anywhere coremltools installs; the package is read back with
coremltools (its MIL program and the bytes of weight.bin), not run: running a
Core ML model needs macOS.
"""

import dataclasses
import struct
import sys
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import dkm_param as dp
from dkm_param.deploy import to_coreml
from dkm_param.errors import ExportError
from dkm_param.format import CompressedLayer, assemble
from dkm_param.ops import packing
from nets import small_cnn

ct = pytest.importorskip("coremltools", reason="Core ML export needs coremltools (the coreml extra)")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:coremltools", "ignore::FutureWarning",
                                        "ignore::DeprecationWarning")

CORE_ML_BITS = {1: 1, 2: 2, 3: 3, 4: 4, 5: 6, 6: 6, 7: 8, 8: 8}


def read_package(path):
    """The saved package's MIL program, its ops by name, and a reader of the raw bytes of an op's input."""
    from coremltools.converters.mil.frontend.milproto import load as milproto

    model = ct.models.MLModel(str(path), skip_model_load=True)
    spec = model.get_spec()
    program = milproto.load(spec, spec.specificationVersion, model.weights_dir)
    ops = {op.name: op for f in program.functions.values() for op in f.operations}
    function = spec.mlProgram.functions["main"]
    protos = {op.attributes["name"].immediateValue.tensor.strings.values[0]: op
              for op in function.block_specializations[function.opset].operations if "name" in op.attributes}
    blob = (path / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").read_bytes()

    def raw(op_name: str, input_name: str) -> bytes:
        offset = protos[op_name].inputs[input_name].arguments[0].value.blobFileValue.offset
        sentinel, _, size, start = struct.unpack_from("<IIQQ", blob, offset)
        assert sentinel == 0xDEADBEEF
        return blob[start:start + size]

    return ops, raw


def expected_indices(layer, indices, shape):
    """The file's indices in the layout of a program weight of ``shape`` (the layer's, or its transpose)."""
    dim, lshape = layer.spec.dim, tuple(layer.shape)
    index = indices.numpy()
    if layer.spec.layout == "input" and len(lshape) > 2:
        index = np.moveaxis(index.reshape(lshape[0], *lshape[2:], lshape[1] // dim), -1, 1)
    else:
        index = index.reshape(*lshape[:-1], lshape[-1] // dim)
    if tuple(shape) != lshape:  # the program reads the weight transposed
        assert tuple(shape) == lshape[::-1]
        index = index.T
    return index


def check_package(path, file, compressed, result):
    """Every layer the result calls palettized is the file's codebook and indices (read from the file as
    plain safetensors) in the saved package; returns how many ops hold the file's packed bytes as they are."""
    stored = load_file(str(file))
    ops, raw = read_package(path)
    exact_bytes = 0
    for name, op_names in result.palettized.items():
        layer = compressed.layers[name]  # its shape and storage spec, which the file's metadata holds
        bits = CORE_ML_BITS[layer.spec.bits]
        book = stored[f"{name}.codebook"]
        book = book if book.dim() == 3 else book[None]
        groups, k, dim = book.shape
        indices = packing.unpack(stored[f"{name}.indices"], layer.spec.bits, layer.numel // dim)
        for op_name in op_names:
            op = ops[op_name]
            assert op.op_type == "constexpr_lut_to_dense"
            assert ct.converters.mil.mil.types.builtin_to_string(op.indices.dtype) == f"uint{bits}"
            out_shape = op.outputs[0].shape
            assert np.array_equal(op.indices.val, expected_indices(layer, indices, out_shape)), name
            transposed = tuple(out_shape) != tuple(layer.shape)
            if not transposed and layer.spec.layout == "flat" and bits == layer.spec.bits:
                # the same indices in the same order: weight.bin holds the file's packed bytes
                assert raw(op_name, "indices") == stored[f"{name}.indices"].numpy().tobytes(), name
                exact_bytes += 1
            table = op.lut.op
            if table.op_type == "constexpr_blockwise_shift_scale":  # scales on the table: one table per row
                lut, scale = table.data.val, table.scale.val
                rows = layer.shape[0]
                assert np.array_equal(scale.reshape(-1), stored[f"{name}.scale"].numpy()), name
                per_row = lut.reshape(rows, 1 << bits, dim)  # every axis but the rows' has size 1
                group_of_row = np.arange(rows) // (rows // groups)
                assert np.array_equal(per_row[:, :k], book.numpy()[group_of_row]), name
            else:
                lut = op.lut.val
                assert np.array_equal(lut.reshape(groups, 1 << bits, dim)[:, :k], book.numpy()), name
                if layer.scale is not None:
                    (child,) = [c for c in op.outputs[0].child_ops if c.op_type == "constexpr_blockwise_shift_scale"]
                    assert np.array_equal(child.scale.val.reshape(-1), stored[f"{name}.scale"].numpy()), name
            assert np.all(lut.reshape(-1, 1 << bits, dim)[:, k:] == 0)  # the padding of a short codebook
    return exact_bytes


def random_file(model: nn.Module, specs: dict, default: dp.StorageSpec, path):
    """The model's convolutions and linear layers as random codebooks and indices (any file will do:
    nothing here depends on how the codebook was found), saved to ``path``."""
    gen = torch.Generator().manual_seed(0)
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            spec, shape = specs.get(name, default), tuple(module.weight.shape)
            groups = shape[0] // spec.group_size if spec.group_size else 1
            book = torch.randn(groups, spec.clusters - 1, spec.dim, generator=gen) * module.weight.detach().std()
            layers[f"{name}.weight"] = CompressedLayer(
                shape=shape, dtype=torch.float32, spec=spec, codebook=book if spec.group_size else book[0],
                indices=torch.randint(0, spec.clusters - 1, (module.weight.numel() // spec.dim,), generator=gen),
                scale=torch.rand(shape[0], generator=gen) + 0.5 if spec.channel_scale else None,
            )
    compressed = assemble(model.state_dict(), layers, {}, [])
    return compressed, compressed.save(path)


def dense_weights(path, compressed):
    """The float constants of the saved program shaped like a clustered weight: weights left dense."""
    ops, _ = read_package(path)
    shapes = {tuple(layer.shape) for layer in compressed.layers.values()}
    shapes |= {shape[::-1] for shape in shapes}
    return [name for name, op in ops.items()
            if op.op_type == "const" and isinstance(op.outputs[0].val, np.ndarray)
            and op.outputs[0].val.dtype.kind == "f" and op.outputs[0].val.shape in shapes]


@pytest.mark.slow
def test_resnet18_is_held_as_the_files_lookup_tables(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    specs = {  # every index width Core ML has (and 5 and 7, stored wider), vectors, groups, scales
        "conv1": dp.StorageSpec(bits=8), "layer1.0.conv1": dp.StorageSpec(bits=1),
        "layer1.0.conv2": dp.StorageSpec(bits=2), "layer1.1.conv1": dp.StorageSpec(bits=3),
        "layer1.1.conv2": dp.StorageSpec(bits=5), "layer2.0.conv1": dp.StorageSpec(bits=6),
        "layer2.0.conv2": dp.StorageSpec(bits=7),
        "layer3.0.conv1": dp.StorageSpec(bits=4, dim=4, layout="input"),
        "layer3.0.conv2": dp.StorageSpec(bits=4, dim=8, layout="input", group_size=64),
        "layer4.0.conv1": dp.StorageSpec(bits=2, group_size=128, channel_scale=True),
        "layer4.0.conv2": dp.StorageSpec(bits=3, dim=2, layout="input", channel_scale=True),
        "fc": dp.StorageSpec(bits=4, dim=2, group_size=5),
    }
    compressed, file = random_file(model, specs, dp.StorageSpec(bits=4), tmp_path / "resnet18.safetensors")
    result = to_coreml(model, compressed, (torch.randn(1, 3, 32, 32),), path=tmp_path / "resnet18.mlpackage")
    assert result.unrepresented == {} and set(result.palettized) == set(compressed.layers)
    assert check_package(result.path, file, compressed, result) == 16  # all but 5 and 7 bits and layout input
    size = sum(f.stat().st_size for f in result.path.rglob("*") if f.is_file())
    assert size <= 1.1 * file.stat().st_size
    assert dense_weights(result.path, compressed) == []


@pytest.mark.slow
def test_a_transformers_llama_is_held_as_the_files_lookup_tables(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=2, intermediate_size=128, vocab_size=300, use_cache=False)
    model = transformers.LlamaForCausalLM(config).eval()
    policy = dp.Policy.from_notation("fc:4/1, emb:4/1", small_layer_bits=None, overrides={
        r".*layers\.0\.mlp\..*": dp.LayerSpec(bits=3, dim=2, group_size=32, channel_scale=True),
        r".*layers\.1\.self_attn\.q_proj": dp.LayerSpec(bits=5),
        r".*layers\.1\.self_attn\.k_proj": dp.LayerSpec(bits=8, dim=4),
    })
    compressed = dp.palettize(model, policy, inplace=False)
    file = compressed.save(tmp_path / "llama.safetensors")
    tokens = torch.randint(0, 300, (1, 12))
    inputs = {"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}
    result = to_coreml(model, compressed, inputs, path=tmp_path / "llama.mlpackage")
    assert result.unrepresented == {} and set(result.palettized) == set(compressed.layers)
    check_package(result.path, file, compressed, result)
    assert dense_weights(result.path, compressed) == []


X = (torch.randn(1, 8, 8, 8),)


def test_a_layer_core_ml_cannot_hold_is_reported_and_strict_raises(tmp_path):
    model = small_cnn()
    # vectors of 2 across a 3x3 kernel's rows: Core ML reads vectors along one axis
    policy = dp.Policy(default=None, small_layer_bits=None, kinds={"cv": dp.LayerSpec(bits=4, dim=2),
                                                                   "fc": dp.LayerSpec(bits=4)})
    compressed = dp.palettize(model, policy, inplace=False)
    with pytest.warns(UserWarning, match=r"1 clustered layer\(s\) are not the file's lookup tables .*'0.weight': "
                      r"vectors of dim=2 run across the last axis \(3 values\).*layout='input'"):
        result = to_coreml(model, compressed, X)
    assert list(result.palettized) == ["4.weight"] and list(result.unrepresented) == ["0.weight"]
    assert "0.weight" in str(result)
    with pytest.raises(ExportError, match="'0.weight': vectors of dim=2.*pass strict=False to convert them"):
        to_coreml(model, compressed, X, path=tmp_path / "never.mlpackage", strict=True)
    assert not (tmp_path / "never.mlpackage").exists()


def test_outliers_are_reported_not_dropped():
    model = small_cnn()
    compressed = dp.palettize(model, dp.Policy.from_notation("cv:4/1, fc:4/1", small_layer_bits=None),
                              inplace=False)
    layer = compressed.layers["4.weight"]
    compressed.layers["4.weight"] = dataclasses.replace(
        layer, outlier_index=torch.tensor([1, 50]), outlier_value=torch.tensor([3.0, -3.0]))
    with pytest.warns(UserWarning, match="'4.weight': 2 outliers kept exact"):
        result = to_coreml(model, compressed, X)
    assert list(result.palettized) == ["0.weight"] and "outliers" in result.unrepresented["4.weight"]


def test_float16_precision_reports_rounded_tables_and_float16_codebooks_stay_exact():
    model = small_cnn()
    policy = dp.Policy.from_notation("cv:4/1, fc:4/1", small_layer_bits=None)
    with pytest.warns(UserWarning, match="changed in the conversion .*compute_precision=FLOAT16"):
        to_coreml(model, dp.palettize(model, policy, inplace=False), X, compute_precision=ct.precision.FLOAT16)
    half = dp.palettize(model, policy, inplace=False, codebook_dtype=torch.float16)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*lookup tables")  # none reported
        result = to_coreml(model, half, X, compute_precision=ct.precision.FLOAT16)
    assert set(result.palettized) == {"0.weight", "4.weight"}


def test_wrong_paths_and_targets_are_refused(tmp_path):
    model = small_cnn()
    compressed = dp.palettize(model, dp.Policy.from_notation("cv:4/1", small_layer_bits=None), inplace=False)
    with pytest.raises(ExportError, match="ending in .mlpackage"):
        to_coreml(model, compressed, X, path=tmp_path / "model.mlmodel")
    with pytest.raises(ExportError, match="predates iOS 18.*ct.target.iOS18"):
        to_coreml(model, compressed, X, minimum_deployment_target=ct.target.iOS17)
    with pytest.raises(dp.RegistrationError, match="file does not fit the model"):
        to_coreml(nn.Sequential(nn.Linear(3, 3)), compressed, (torch.randn(1, 3),))


def test_a_model_is_not_changed(tmp_path):
    model = small_cnn().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compressed = dp.palettize(model, dp.Policy.from_notation("cv:4/1, fc:4/1", small_layer_bits=None),
                              inplace=False)
    to_coreml(model, compressed, X)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_command_line_writes_a_core_ml_package(tmp_path, capsys):
    from dkm_param.cli import main

    policy = dp.Policy(default=None, small_layer_bits=None, kinds={"cv": dp.LayerSpec(bits=4, dim=2),
                                                                   "fc": dp.LayerSpec(bits=4)})
    file = dp.palettize(small_cnn(), policy).save(tmp_path / "cnn.safetensors")
    out = tmp_path / "cnn.mlpackage"
    args = ["export", "coreml", str(file), "nets:small_cnn", "--out", str(out), "--input", "1x8x8x8"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "1 layers as the file's lookup tables" in printed and "0.weight: vectors of dim=2" in printed
    assert main([*args, "--strict"]) == 2
    assert "'0.weight': vectors of dim=2" in capsys.readouterr().err
    assert main([*args[:5], str(tmp_path / "cnn.mlmodel"), *args[6:]]) == 2
    assert "ending in .mlpackage" in capsys.readouterr().err


def test_the_command_line_asks_for_coremltools_before_any_work(tmp_path, capsys, monkeypatch):
    from dkm_param.cli import main

    command_line = sys.modules["dkm_param.cli.main"]

    def no_work(*args):
        raise AssertionError("the file was read before the check")

    monkeypatch.setattr(command_line, "read_compressed", no_work)
    monkeypatch.setitem(sys.modules, "coremltools", None)  # as if it were not installed
    out = tmp_path / "m.mlpackage"
    assert main(["export", "coreml", str(tmp_path / "m.safetensors"), "x:y", "--out", str(out), "--input", "1x8"]) == 2
    err = capsys.readouterr().err
    assert "export coreml needs coremltools; install it with pip install 'coremltools>=8'" in err
    assert not out.exists()
