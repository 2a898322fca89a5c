"""torch.export programs: packed indices stored as in the file, decoded in the graph, outputs of the snapped model."""

import copy
import dataclasses
import zipfile

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import dkm_param as dp
from dkm_param.deploy import export_program
from nets import small_cnn

POLICY = dp.Policy.from_notation("cv:4/1, fc:4/1", small_layer_bits=None)


class Net(nn.Module):
    """Convolutions (one with an input-layout vector codebook) and wide linear layers: mostly weights."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.wide = nn.Linear(8 * 6 * 6, 2048)
        self.head = nn.Linear(2048, 10)

    def forward(self, x):
        return self.head(torch.relu(self.wide(torch.relu(self.bn(self.conv(x))).flatten(1))))


def net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def test_the_saved_program_is_the_files_size_and_gives_the_snapped_models_outputs(tmp_path):
    model = net()
    policy = dp.Policy(default=None, small_layer_bits=None, kinds={"fc": dp.LayerSpec(bits=4)},
                       overrides={"conv": dp.LayerSpec(bits=3, dim=4, layout="input", channel_scale=True)})
    compressed = dp.palettize(model, policy, inplace=False)
    path = compressed.save(tmp_path / "net.safetensors")
    x = torch.randn(2, 4, 8, 8)
    program = export_program(model, compressed, (x,))
    torch.export.save(program, tmp_path / "net.pt2")
    # the tensors take the file's bytes; the graph (tens of kB, most of a model this small) comes on top
    with zipfile.ZipFile(tmp_path / "net.pt2") as archive:
        graph = sum(i.file_size for i in archive.infolist() if i.filename.endswith("model.json"))
    assert (tmp_path / "net.pt2").stat().st_size - graph <= 1.05 * path.stat().st_size
    snapped = compressed.load_into(net())
    with torch.no_grad():
        assert torch.equal(torch.export.load(tmp_path / "net.pt2").module()(x), snapped(x))
    # the program stores the file's packed bytes, not decoded weights
    stored = {**program.state_dict, **program.constants}
    packed = load_file(str(path))
    for name in compressed.layers:
        owner = name.rpartition(".")[0]
        assert torch.equal(stored[f"{owner}.parametrizations.weight.0.packed"], packed[f"{name}.indices"])
    assert not any(t.numel() > 100 and t.is_floating_point() and t.numel() == snapped.wide.weight.numel()
                   for t in stored.values())


def test_the_model_is_not_changed_and_keyword_inputs_work():
    model = net()
    before = copy.deepcopy(model.state_dict())
    compressed = dp.palettize(model, POLICY, inplace=False)
    program = export_program(model, compressed, {"x": torch.randn(1, 4, 8, 8)})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert program.example_inputs is None
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(program.module()(x=x), compressed.load_into(net())(x))


def test_outliers_are_decoded_in_the_graph():
    model = net()
    compressed = dp.palettize(model, POLICY, inplace=False)
    layer = compressed.layers["head.weight"]
    index, value = torch.tensor([3, 4000, 20479]), torch.tensor([7.0, -7.0, 0.5])
    compressed.layers["head.weight"] = dataclasses.replace(layer, outlier_index=index, outlier_value=value)
    x = torch.randn(2, 4, 8, 8)
    program = export_program(model, compressed, (x,))
    snapped = compressed.load_into(net())
    assert snapped.head.weight.reshape(-1)[index].tolist() == value.tolist()
    with torch.no_grad():
        assert torch.equal(program.module()(x), snapped(x))


def test_a_model_that_does_not_fit_is_refused():
    compressed = dp.palettize(net(), POLICY, inplace=False)
    with pytest.raises(dp.RegistrationError, match="missing from the file"):
        export_program(nn.Sequential(nn.Linear(4, 4)), compressed, (torch.randn(1, 4),))


class Weight(nn.Module):
    """A program whose output is the decoded weight itself."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner.wide.weight + x


def test_executorch_runs_the_decoding_bit_for_bit(tmp_path):
    exir = pytest.importorskip("executorch.exir", reason="ExecuTorch is optional: pip install executorch")
    runtime = pytest.importorskip("executorch.runtime")
    model = net()
    compressed = dp.palettize(model, POLICY, inplace=False)
    compressed = dataclasses.replace(compressed, layers={
        f"inner.{name}": layer for name, layer in compressed.layers.items()
    }, tensors={f"inner.{name}": t for name, t in compressed.tensors.items()})
    zero = torch.zeros(())
    program = exir.to_edge(export_program(Weight(model), compressed, (zero,))).to_executorch()
    (tmp_path / "weight.pte").write_bytes(program.buffer)
    method = runtime.Runtime.get().load_program(str(tmp_path / "weight.pte")).load_method("forward")
    assert torch.equal(method.execute([zero])[0], compressed.layers["inner.wide.weight"].weight())


def test_the_command_line_writes_a_program(tmp_path, capsys):
    from dkm_param.cli import main

    model = small_cnn()
    file = dp.palettize(model, POLICY).save(tmp_path / "cnn.safetensors")
    base = ["export", "torch", str(file), "nets:small_cnn", "--out"]
    assert main([*base, str(tmp_path / "cnn.pt2"), "--input", "input=2x8x8x8"]) == 0
    assert f"wrote {tmp_path / 'cnn.pt2'}" in capsys.readouterr().out
    x = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        assert torch.equal(torch.export.load(tmp_path / "cnn.pt2").module()(input=x), model(x))
    assert main([*base, str(tmp_path / "cnn.pt"), "--input", "1x8x8x8"]) == 2
    assert "ending in .pt2" in capsys.readouterr().err
    assert main([*base, str(tmp_path / "cnn.pt2"), "--input", "1x8:float7"]) == 2
    assert "is not [NAME=]SHAPE[:DTYPE]" in capsys.readouterr().err
    assert main([*base, str(tmp_path / "cnn.pt2"), "--input", "x=1x8x8x8", "--input", "1x8"]) == 2
    assert "name all example inputs" in capsys.readouterr().err
    assert main(["export", "torch", str(file), "torch.nn:Sequential", "--out", str(tmp_path / "e.pt2"),
                 "--input", "1x8x8x8"]) == 2
    assert "not in the model: 0.bias, 0.weight" in capsys.readouterr().err


def test_stack_traces_are_left_out_unless_kept():
    model = net()
    compressed = dp.palettize(model, POLICY, inplace=False)
    x = torch.randn(1, 4, 8, 8)
    slim = export_program(model, compressed, (x,))
    assert not any(node.meta.get("stack_trace") for node in slim.graph.nodes)
    kept = export_program(model, compressed, (x,), keep_traces=True)
    # the model's own nodes keep theirs (the decoding's are dropped either way)
    assert any("forward" in (node.meta.get("stack_trace") or "") for node in kept.graph.nodes)
    with torch.no_grad():
        assert torch.equal(slim.module()(x), kept.module()(x))


def _stack(layers: int = 16, width: int = 256) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(layers)]).eval()


def test_save_program_deflates_the_graph_and_keeps_the_tensors_aligned(tmp_path):
    model = _stack()
    compressed = dp.palettize(model, POLICY, inplace=False)
    file = compressed.save(tmp_path / "stack.safetensors")
    x = torch.randn(2, 256)
    program = export_program(model, compressed, (x,))
    torch.export.save(program, tmp_path / "plain.pt2")
    path = dp.save_program(program, tmp_path / "stack.pt2")
    assert path == tmp_path / "stack.pt2"
    # many small layers: the graph uncompressed outweighs a tenth of the file, deflated it does not
    assert (tmp_path / "plain.pt2").stat().st_size > 1.1 * file.stat().st_size
    assert path.stat().st_size <= 1.1 * file.stat().st_size
    with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
        infos = archive.infolist()
        assert any(i.filename.endswith(".json") for i in infos)
        for info in infos:
            kind = zipfile.ZIP_DEFLATED if info.filename.endswith(".json") else zipfile.ZIP_STORED
            assert info.compress_type == kind, info.filename
            if kind == zipfile.ZIP_STORED:  # the data starts 64-byte aligned, as torch.export.save leaves it
                raw.seek(info.header_offset + 26)
                name, extra = (int.from_bytes(raw.read(2), "little") for _ in range(2))
                assert (info.header_offset + 30 + name + extra) % 64 == 0, info.filename
        with zipfile.ZipFile(tmp_path / "plain.pt2") as plain:
            # the same entries and bytes (under the archive's own folder, "archive" as torch names a buffer's)
            def entries(zipped):
                return {i.filename.partition("/")[2]: zipped.read(i) for i in zipped.infolist()}

            assert entries(archive) == entries(plain)
    with torch.no_grad():
        assert torch.equal(torch.export.load(path).module()(x), compressed.load_into(_stack())(x))


def test_a_failed_save_program_leaves_the_old_file(tmp_path, monkeypatch):
    model = net()
    program = export_program(model, dp.palettize(model, POLICY, inplace=False), (torch.randn(1, 4, 8, 8),))
    path = tmp_path / "net.pt2"
    path.write_bytes(b"the old program")

    def broken(source, handle):
        handle.write(b"half a program")
        raise OSError("disk full")

    monkeypatch.setattr("dkm_param.deploy.export._deflate_json", broken)
    with pytest.raises(OSError, match="disk full"):
        dp.save_program(program, path)
    assert path.read_bytes() == b"the old program"
    assert [p.name for p in tmp_path.iterdir()] == ["net.pt2"]
    with pytest.raises(IsADirectoryError, match="give a file name"):
        dp.save_program(program, tmp_path)
