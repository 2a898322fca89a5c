import dataclasses
import json
import os
import re
import stat
import subprocess
import sys
import tracemalloc

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import dkm_param as dp
from dkm_param.format import writer
from dkm_param.posttrain.palettize import cluster_weight
from strategies import storage_specs


def convnet(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(128, 10),
    )


def trained_and_finalized(bits=3, dim=1, codebook_dtype=None, steps=2):
    model = convnet()
    dp.register_dkm(model, dp.Policy(default=dp.LayerSpec(bits=bits, dim=dim), small_layer_bits=None))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    return model, dp.finalize(model, codebook_dtype=codebook_dtype), x


def test_finalize_leaves_an_ordinary_model_holding_codebook_values():
    model, compressed, _ = trained_and_finalized()
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    assert set(compressed.layers) == {"0.weight", "3.weight", "7.weight"}
    for name, layer in compressed.layers.items():
        weight = model.state_dict()[name]
        assert torch.equal(weight, layer.weight())
        assert layer.indices.dtype == torch.uint8 and int(layer.indices.max()) < 8
        assert layer.codebook.shape == (8, 1)
    assert "1.running_mean" in compressed.tensors and "1.weight" in compressed.tensors


def test_finalize_without_registration_is_an_error():
    with pytest.raises(dp.RegistrationError, match=r"no weight has DKM registered; call dp.register_dkm"):
        dp.finalize(convnet())


@given(bits=st.integers(1, 8), dim=st.sampled_from([1, 2, 4]), half=st.booleans())
def test_save_load_reproduces_snapped_weights_bit_for_bit(tmp_path_factory, bits, dim, half):
    model, compressed, x = trained_and_finalized(bits, dim, torch.float16 if half else None, steps=1)
    path = compressed.save(tmp_path_factory.mktemp("f") / "m.safetensors")
    fresh = convnet(seed=5).eval()
    dp.load_compressed(path, fresh)
    state, loaded = model.state_dict(), fresh.state_dict()
    assert state.keys() == loaded.keys()
    assert all(torch.equal(state[k], loaded[k]) for k in state)
    assert torch.equal(fresh(x), model(x))
    read = dp.read_compressed(path)
    for name, layer in compressed.layers.items():
        assert torch.equal(read.layers[name].indices, layer.indices)
        assert read.layers[name].codebook.dtype == (torch.float16 if half else torch.float32)


def test_file_layout_is_documented_safetensors(tmp_path):
    _, compressed, _ = trained_and_finalized(bits=3)
    path = compressed.save(tmp_path / "m.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert meta["format"] == "dkm-param" and meta["format_version"] == "2"
        layers = json.loads(meta["layers"])
        assert layers["3.weight"] == {
            "shape": [32, 16, 3, 3], "dtype": "float32", "bits": 3, "dim": 1, "vectors": 4608, "packing": "lsb",
            "group_size": None, "channel_scale": False, "preserve_zeros": False, "layout": "flat", "outliers": 0,
        }
        assert f.get_tensor("3.weight.indices").shape == (4608 * 3 // 8,)
        assert f.get_tensor("3.weight.codebook").shape == (8, 1)
        assert "3.bias" in f.keys()


def test_summary_counts_codebooks_indices_and_plain_tensors():
    _, compressed, _ = trained_and_finalized(bits=2)
    summary = compressed.summary()
    row = next(r for r in summary.rows if r.name == "3.weight")
    assert row.bytes_before == 4608 * 4 and row.bytes_after == 4 * 4 + 4608 * 2 // 8
    assert summary.bytes_before == sum(t.numel() * t.element_size() for t in convnet().state_dict().values())
    assert summary.ratio == summary.bytes_before / summary.bytes_after
    text = str(summary)
    assert "3.weight" in text and "compression" in text and "BatchNorm2d weights are not clustered" in text


def test_saved_file_is_the_size_the_summary_reports(tmp_path):
    _, compressed, _ = trained_and_finalized(bits=4)
    path = compressed.save(tmp_path / "m.safetensors")
    header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    assert os.path.getsize(path) - header == compressed.summary().bytes_after


def test_load_into_a_different_model_names_what_differs(tmp_path):
    _, compressed, _ = trained_and_finalized()
    path = compressed.save(tmp_path / "m.safetensors")
    other = convnet()
    other[7] = nn.Linear(128, 11)
    with pytest.raises(
        dp.RegistrationError, match=r"shape or dtype differs: 7.weight: file \(10, 128\) vs model \(11, 128\)"
    ):
        dp.load_compressed(path, other)
    with pytest.raises(dp.RegistrationError, match=r"0.weight: file torch.float32 vs model torch.float64"):
        dp.load_compressed(path, convnet().to(torch.float64))
    extra = nn.Sequential(*convnet(), nn.Linear(10, 2))
    with pytest.raises(dp.RegistrationError, match=r"missing from the file: 8.bias, 8.weight"):
        dp.load_compressed(path, extra)


def test_failed_save_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    _, compressed, _ = trained_and_finalized()
    path = compressed.save(tmp_path / "m.safetensors")
    good = path.read_bytes()
    written = []

    def broken(tensor):
        written.append(tensor)
        if len(written) == 3:  # the disk fills halfway through the tensors
            raise OSError("disk full")
        return memoryview(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())

    monkeypatch.setattr(writer, "_as_bytes", broken)
    with pytest.raises(OSError, match="disk full"):
        compressed.save(path)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_a_new_file_gets_the_umask_mode_and_an_old_one_keeps_its_own(tmp_path):
    _, compressed, _ = trained_and_finalized()
    old = os.umask(0o027)
    try:
        path = compressed.save(tmp_path / "new.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    path.chmod(0o604)
    compressed.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o604


def test_saving_through_a_symbolic_link_writes_its_target(tmp_path):
    _, compressed, _ = trained_and_finalized()
    target = tmp_path / "real.safetensors"
    target.write_bytes(b"old")
    link = tmp_path / "link.safetensors"
    link.symlink_to(target)
    compressed.save(link)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert dp.read_compressed(target).layers.keys() == compressed.layers.keys()


def test_a_killed_save_leaves_temporaries_the_next_save_removes(tmp_path):
    _, compressed, _ = trained_and_finalized()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a process id that is gone
    stale = tmp_path / f".m.safetensors.dkm-{dead.pid}-0123abcd.tmp"
    stale.write_bytes(b"half a file")
    live = tmp_path / f".m.safetensors.dkm-{os.getppid()}-0123abcd.tmp"  # a save still under way elsewhere
    live.write_bytes(b"in progress")
    other = tmp_path / ".notes.txt.dkm-1-0123abcd.tmp"
    other.write_bytes(b"another file's")
    compressed.save(tmp_path / "m.safetensors")
    assert not stale.exists() and live.exists() and other.exists()


def test_names_used_twice_are_refused_before_anything_is_written(tmp_path):
    _, compressed, _ = trained_and_finalized()
    layer = next(iter(compressed.layers))
    clash = dp.CompressedModel(compressed.layers, {**compressed.tensors, f"{layer}.codebook": torch.zeros(1)})
    with pytest.raises(dp.FormatError, match="used twice"):
        clash.save(tmp_path / "a.safetensors")
    aliased = dp.CompressedModel(compressed.layers, compressed.tensors, aliases={layer: "1.bias"})
    with pytest.raises(dp.FormatError, match="also the name of a stored layer"):
        aliased.save(tmp_path / "b.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_saving_streams_instead_of_building_the_file_in_memory(tmp_path):
    model = nn.Linear(2048, 2048, bias=False)  # 16 MiB of float32 plain tensors
    compressed = dp.CompressedModel(layers={}, tensors={"big": model.weight.detach()})
    tracemalloc.start()
    try:
        compressed.save(tmp_path / "big.safetensors")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * 2**20  # no copy of the 16 MiB through Python's own allocations
    assert (tmp_path / "big.safetensors").stat().st_size > 16 * 2**20


def test_tied_weights_are_stored_once_and_restored_tied(tmp_path):
    from nets import Tied

    torch.manual_seed(0)
    model = Tied()
    dp.register_dkm(model, dp.Policy.from_notation("fc:3/1"))
    model.eval()
    compressed = dp.finalize(model)
    assert compressed.aliases == {"wte.weight": "head.weight"}
    path = compressed.save(tmp_path / "t.safetensors")
    fresh = Tied()
    dp.load_compressed(path, fresh)
    assert torch.equal(fresh.wte.weight, model.head.weight) and fresh.wte.weight is fresh.head.weight


def test_wrong_format_and_future_version_are_rejected(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(dp.FormatError, match="format is None, expected 'dkm-param'"):
        dp.read_compressed(tmp_path / "plain.safetensors")
    save_file(
        {"x": torch.zeros(2)}, str(tmp_path / "v9.safetensors"), metadata={"format": "dkm-param", "format_version": "9"}
    )
    with pytest.raises(dp.FormatError, match="format version '9' is not supported"):
        dp.read_compressed(tmp_path / "v9.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(dp.FormatError, match="5 bytes is too short for a safetensors file"):
        dp.read_compressed(tmp_path / "junk.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"not json")
    with pytest.raises(dp.FormatError, match="not a readable safetensors file"):
        dp.read_compressed(tmp_path / "junk.safetensors")


@settings(max_examples=25)
@given(spec=storage_specs(rows=8), seed=st.integers(0, 2**16))
def test_the_file_carries_the_whole_storage_spec(tmp_path_factory, spec, seed):
    # preserve_zeros once read back as False, and a single group's group_size as None
    weight = torch.randn(8, 4, 3, 2, generator=torch.Generator().manual_seed(seed))
    weight[weight.abs() < 0.5] = 0
    layer = cluster_weight(weight, spec)
    path = dp.CompressedModel(layers={"conv.weight": layer}, tensors={}).save(
        tmp_path_factory.mktemp("spec") / "m.safetensors"
    )
    read = dp.read_compressed(path).layers["conv.weight"]
    assert read.spec == spec
    assert torch.equal(read.weight(), layer.weight())
    assert torch.equal(read.codebook, layer.codebook) and torch.equal(read.indices, layer.indices)


def test_preserve_zeros_reads_back_and_its_zero_entry_is_checked(tmp_path):
    spec = dp.StorageSpec(bits=2, preserve_zeros=True)
    weight = torch.randn(8, 12)
    weight[:, :4] = 0
    layer = cluster_weight(weight, spec)
    path = dp.CompressedModel(layers={"w": layer}, tensors={}).save(tmp_path / "m.safetensors")
    assert dp.read_compressed(path).layers["w"].spec.preserve_zeros is True
    tensors, meta = load_file(str(path)), safe_open(str(path), "pt").metadata()
    tensors["w.codebook"][0] = 1.0  # a file whose pinned entry is not zero is not what it says
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(dp.FormatError, match="preserve_zeros is set but codebook entry 0 is not zero"):
        dp.read_compressed(tmp_path / "bad.safetensors")
    layer.codebook[0] = 1.0  # and the writer does not write one
    with pytest.raises(dp.FormatError, match="cannot save layer 'w': preserve_zeros is set but codebook entry 0"):
        dp.CompressedModel(layers={"w": layer}, tensors={}).save(tmp_path / "bad.safetensors")


def test_a_file_without_the_newer_storage_keys_still_reads(tmp_path):
    layer = cluster_weight(torch.randn(8, 12), dp.StorageSpec(bits=2, channel_scale=True))
    path = dp.CompressedModel(layers={"w": layer}, tensors={}).save(tmp_path / "m.safetensors")
    tensors, meta = load_file(str(path)), safe_open(str(path), "pt").metadata()
    layers = json.loads(meta["layers"])
    for key in ("group_size", "channel_scale", "preserve_zeros", "layout"):
        del layers["w"][key]
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={**meta, "layers": json.dumps(layers)})
    read = dp.read_compressed(tmp_path / "old.safetensors").layers["w"]
    assert read.spec == dp.StorageSpec(bits=2, channel_scale=True)


def test_loading_onto_the_meta_device_is_refused(tmp_path):
    _, compressed, _ = trained_and_finalized()
    path = compressed.save(tmp_path / "m.safetensors")
    with torch.device("meta"):
        model = convnet()
    with pytest.raises(dp.RegistrationError, match="on the meta device .* model.to_empty"):
        dp.load_compressed(path, model)


def test_weights_the_model_ties_must_be_one_tensor_in_the_file(tmp_path):
    from nets import Tied

    torch.manual_seed(0)
    untied = nn.Module()
    untied.wte, untied.mid, untied.head = nn.Embedding(300, 32), nn.Linear(32, 32), nn.Linear(32, 300, bias=False)
    policy = dp.Policy(kinds={"fc": dp.LayerSpec(bits=3), "emb": dp.LayerSpec(bits=3)}, small_layer_bits=None)
    path = dp.palettize(untied, policy).save(tmp_path / "untied.safetensors")
    with pytest.raises(dp.RegistrationError, match="the model ties wte.weight, head.weight to one tensor"):
        dp.load_compressed(path, Tied())


def test_the_writer_refuses_what_its_reader_would(tmp_path):
    good = dp.CompressedModel(layers={}, tensors={"x": torch.zeros(2)}).save(tmp_path / "m.safetensors").read_bytes()
    layer = cluster_weight(torch.randn(8, 12), dp.StorageSpec(bits=2))
    cases = {
        "shape": (dp.CompressedModel({"w": dataclasses.replace(layer, shape=(8, 13))}, {}), "do not make shape"),
        "index": (dp.CompressedModel({"w": dataclasses.replace(layer, codebook=layer.codebook[:2])}, {}),
                  "out of range of a 2-entry codebook"),
        "clash": (dp.CompressedModel({"w": layer}, {"w": torch.zeros(1)}), "both a clustered layer and a plain"),
        "surrogate": (dp.CompressedModel({}, {"x\ud800": torch.zeros(1)}), "not valid text"),
    }
    for what, (model, words) in cases.items():
        with pytest.raises(dp.FormatError, match=words):
            model.save(tmp_path / "m.safetensors")
        assert (tmp_path / "m.safetensors").read_bytes() == good, what


def test_plain_tensors_of_any_safetensors_dtype_are_saved(tmp_path):
    freqs = torch.polar(torch.ones(4, 8), torch.randn(4, 8))  # complex64, as rotary tables are
    model = dp.CompressedModel({}, {"freqs": freqs, "mask": torch.ones(3, dtype=torch.bool)})
    read = dp.read_compressed(model.save(tmp_path / "m.safetensors"))
    assert torch.equal(read.tensors["freqs"], freqs) and read.tensors["mask"].dtype == torch.bool


def test_equal_models_give_equal_bytes_whatever_the_order_of_their_dicts(tmp_path):
    tensors = {"x": torch.zeros(2)}
    one = dp.CompressedModel({}, tensors, aliases={"a": "x", "b": "x"}).save(tmp_path / "1.safetensors")
    two = dp.CompressedModel({}, tensors, aliases={"b": "x", "a": "x"}).save(tmp_path / "2.safetensors")
    assert one.read_bytes() == two.read_bytes()


def test_a_directory_or_a_pipe_is_not_replaced(tmp_path):
    model = dp.CompressedModel({}, {"x": torch.zeros(2)})
    (tmp_path / "adir").mkdir()
    with pytest.raises(IsADirectoryError, match="it is a directory"):
        model.save(tmp_path / "adir")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(FileExistsError, match="not a regular file"):
        model.save(tmp_path / "fifo")
    assert stat.S_ISFIFO(os.stat(tmp_path / "fifo").st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "fifo"]


def test_summary_of_a_language_model_fits_a_terminal_and_reads_in_model_order(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=12, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    model = transformers.GPT2LMHeadModel(config)
    compressed = dp.palettize(model, dp.Policy(default=dp.LayerSpec(bits=4), small_layer_bits=None), inplace=False)
    lines = str(compressed.summary()).splitlines()
    assert max(map(len, lines)) <= 100  # long notes under the table, wrapped
    group = next(line for line in lines if line.startswith("(25 tensors"))
    assert re.match(r"\(25 tensors, 800 values\)\s+-\s", group)  # nothing in the shape column
    assert any(line.startswith("[") and "skipped: LayerNorm weights are not clustered" in line for line in lines)
    read = dp.read_compressed(compressed.save(tmp_path / "m.safetensors"))
    names = [name for name in read.layers if name.startswith("transformer.h.") and name.endswith("c_fc.weight")]
    assert names == [f"transformer.h.{i}.mlp.c_fc.weight" for i in range(12)]  # 2 before 11, as the model has them
