import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import dkm_param as dp
from dkm_param import cli
from dkm_param.format import FORMAT_VERSION

LINEAR = ["torch.nn:Linear", "--kwargs", '{"in_features": 128, "out_features": 100}']


pytestmark = pytest.mark.usefixtures("one_thread")


class Tied(nn.Module):
    """Two linear layers sharing one weight, a conv with groups and scales, a batch norm."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3)
        self.norm = nn.BatchNorm2d(8)
        self.encode = nn.Linear(32, 32)
        self.decode = nn.Linear(32, 32)
        self.decode.weight = self.encode.weight


@pytest.fixture(scope="module")
def dkm_file(tmp_path_factory):
    torch.manual_seed(0)
    model = Tied()
    policy = dp.Policy(
        default=dp.LayerSpec(bits=3),
        overrides={"conv": dp.LayerSpec(bits=2, dim=3, group_size=4, channel_scale=True)},
        small_layer_bits=None,
    )
    return dp.palettize(model, policy).save(tmp_path_factory.mktemp("files") / "tied.safetensors")


def run(capsys, *argv):
    status = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def assert_clean_error(status, err, *fragments):
    assert status == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("dkm-param")  # the problem, on the last line
    for fragment in fragments:
        assert fragment in err


def test_inspect_lists_format_layers_plain_tensors_and_totals(capsys, dkm_file):
    status, out, _ = run(capsys, "inspect", dkm_file)
    assert status == 0
    assert f"dkm-param format version {FORMAT_VERSION}" in out
    for name in ("conv.weight", "encode.weight"):
        assert name in out
    assert "2 groups of 4 channels; scale per channel" in out
    assert "shared with decode.weight" in out and "alias: decode.weight -> encode.weight" in out
    assert "norm.running_mean" in out and "stored plain (" in out
    summary = dp.read_compressed(dkm_file).summary()
    assert f"compression {summary.ratio:.2f}x (2 layers clustered)" in out


def test_inspect_json_holds_the_same_facts(capsys, dkm_file):
    status, out, _ = run(capsys, "inspect", dkm_file, "--json")
    facts = json.loads(out)
    assert status == 0 and facts["format"] == "dkm-param" and facts["format_version"] == "2"
    conv = next(layer for layer in facts["layers"] if layer["name"] == "conv.weight")
    assert conv["bits"] == 2 and conv["dim"] == 3 and conv["group_size"] == 4 and conv["channel_scale"]
    assert conv["codebook"] == [2, 4, 3] and conv["shape"] == [8, 4, 3, 3]
    assert facts["aliases"] == {"decode.weight": "encode.weight"}
    assert facts["bytes_after"] < facts["bytes_before"] and facts["file_bytes"] == dkm_file.stat().st_size


def test_inspect_plot_writes_a_png(capsys, dkm_file, tmp_path):
    pytest.importorskip("matplotlib")
    status, out, _ = run(capsys, "inspect", dkm_file, "--plot", tmp_path / "f.png")
    assert status == 0 and (tmp_path / "f.png").read_bytes().startswith(b"\x89PNG")


def test_decode_writes_the_decoded_state_dict(capsys, dkm_file, tmp_path):
    out_path = tmp_path / "plain.safetensors"
    status, out, _ = run(capsys, "decode", dkm_file, out_path)
    assert status == 0 and "wrote" in out
    decoded = load_file(out_path)
    expected = dp.read_compressed(dkm_file).state_dict()
    assert set(decoded) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(decoded[name], tensor), name
    model = Tied()
    model.load_state_dict(decoded)  # an ordinary state_dict
    assert torch.equal(model.decode.weight, expected["encode.weight"])


def test_decode_refuses_to_overwrite_its_input(capsys, dkm_file):
    status, _, err = run(capsys, "decode", dkm_file, dkm_file)
    assert_clean_error(status, err, "is FILE itself")


def test_compress_palettizes_saves_and_prints_the_summary(capsys, tmp_path):
    out_path = tmp_path / "lin.safetensors"
    status, out, _ = run(capsys, "compress", *LINEAR, "--policy", "fc:3/2", "--out", out_path)
    assert status == 0
    assert "weight" in out and "compression" in out and f"wrote {out_path}" in out
    layer = dp.read_compressed(out_path).layers["weight"]
    assert layer.spec.bits == 3 and layer.spec.dim == 2 and layer.shape == (100, 128)


def test_compress_loads_trained_weights_first(capsys, tmp_path):
    torch.manual_seed(3)
    trained = nn.Linear(128, 100)
    save_file(trained.state_dict(), tmp_path / "trained.safetensors")
    torch.save(trained.state_dict(), tmp_path / "trained.pt")
    expected = dp.palettize(trained, dp.Policy.from_notation("fc:4/1"), inplace=False).state_dict()
    for source in ("trained.safetensors", "trained.pt"):
        out_path = tmp_path / f"{source}.dkm.safetensors"
        status, _, _ = run(capsys, "compress", *LINEAR, "--weights", tmp_path / source, "--out", out_path, "--quiet")
        assert status == 0
        assert torch.equal(dp.read_compressed(out_path).state_dict()["weight"], expected["weight"])
    save_file({"weight": torch.zeros(3)}, tmp_path / "other.safetensors")
    status, _, err = run(
        capsys, "compress", *LINEAR, "--weights", tmp_path / "other.safetensors", "--out", tmp_path / "x"
    )
    assert_clean_error(status, err, "does not fit MODEL", "bias")


def test_compress_with_dkm_snap_and_a_plot(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    out_path, png = tmp_path / "snap.safetensors", tmp_path / "snap.png"
    status, out, _ = run(
        capsys, "compress", *LINEAR, "--method", "dkm-snap", "--out", out_path, "--plot", png, "--quiet"
    )
    assert status == 0 and f"wrote {png}" in out
    compressed = dp.read_compressed(out_path)
    assert compressed.layers["weight"].spec.bits == 4
    assert png.read_bytes().startswith(b"\x89PNG")


def test_plot_without_matplotlib_fails_before_any_work_naming_what_to_install(capsys, tmp_path, monkeypatch):
    import importlib

    command_line = importlib.import_module("dkm_param.cli.main")

    def no_work(*args):
        raise AssertionError("the model was built before the check")

    monkeypatch.setattr(command_line, "_build_model", no_work)
    monkeypatch.setattr(command_line, "read_compressed", no_work)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    out_path, png = tmp_path / "m.safetensors", tmp_path / "m.png"
    hint = "plots need matplotlib; install it with pip install 'matplotlib>=3.7'"
    status, _, err = run(capsys, "compress", *LINEAR, "--out", out_path, "--plot", png)
    assert_clean_error(status, err, hint, 'pip install -e ".[plots]"')
    assert "dkm-param[" not in err and not out_path.exists() and not png.exists()
    status, _, err = run(capsys, "inspect", tmp_path / "missing.safetensors", "--plot", png)
    assert_clean_error(status, err, hint)


def test_demo_help_names_packages_that_pip_can_install(capsys):
    status, out, _ = run(capsys, "demo", "--help")
    assert status == 0 and "dkm-param[" not in out
    assert "'scikit-learn>=1.3'" in out and ".[demo]" in out


def test_compress_and_plan_find_a_model_in_the_current_directory(capsys, tmp_path, monkeypatch):
    (tmp_path / "cli_test_models.py").write_text(
        "import torch\n"
        "def tiny(width=16):\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, width, 3), torch.nn.Flatten(), torch.nn.Linear(width, 10))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the command line adds the directory; undo it afterwards
    monkeypatch.delitem(sys.modules, "cli_test_models", raising=False)
    status, out, _ = run(capsys, "plan", "cli_test_models:tiny", "--kwargs", '{"width": 32}', "--policy", "cv:4/1")
    assert status == 0
    assert "Conv2d" in out and "cluster: small layer" in out and "kind fc has no spec" in out
    assert "1 clustered, 1 skipped" in out
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(dp.Policy.from_notation("cv:2/1, fc:2/1", small_layer_bits=None).to_dict()))
    status, _, _ = run(capsys, "compress", "cli_test_models:tiny", "--policy", policy, "--out", "tiny.safetensors")
    assert status == 0
    layers = dp.read_compressed(tmp_path / "tiny.safetensors").layers
    assert {name: layer.spec.bits for name, layer in layers.items()} == {"0.weight": 2, "2.weight": 2}


@pytest.mark.parametrize(
    "model, kwargs, fragment",
    [
        ("resnet18", "{}", "MODEL 'resnet18' is not module:callable; write e.g. torchvision.models:resnet18"),
        ("no_such_module_xyz:build", "{}", "cannot import 'no_such_module_xyz'"),
        ("torch.nn:Linearr", "{}", "'torch.nn' has no attribute 'Linearr'; did you mean Linear"),
        ("torch:float32", "{}", "'float32' is a dtype, not a callable"),
        ("torch.nn:Linear", '{"in_features": 3}', "failed: TypeError:"),
        ("torch:zeros", '{"size": [2]}', "returned a Tensor, not a torch.nn.Module"),
        ("torch.nn:Linear", "{in_features: 3}", "--kwargs '{in_features: 3}' is not valid JSON"),
        ("torch.nn:Linear", "[3, 4]", "--kwargs must be a JSON object"),
    ],
)
def test_bad_model_is_one_clean_line(capsys, tmp_path, model, kwargs, fragment):
    status, _, err = run(capsys, "compress", model, "--kwargs", kwargs, "--out", tmp_path / "x.safetensors")
    assert_clean_error(status, err, fragment)
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize(
    "policy, fragment",
    [
        ("cv:9/1", "bits must be in 1..8, got 9"),
        ("conv:4/1", "unknown kind 'conv'"),
        ("cv:4/1", "clusters no layer of torch.nn:Linear; see: dkm-param plan torch.nn:Linear"),
        ("missing.json", "missing.json: No such file or directory"),
    ],
)
def test_bad_policy_is_one_clean_line(capsys, tmp_path, policy, fragment):
    status, _, err = run(capsys, "compress", *LINEAR, "--policy", policy, "--out", tmp_path / "x.safetensors")
    assert_clean_error(status, err, fragment)
    assert len(err.strip().splitlines()) == 1


def test_missing_corrupt_and_foreign_files_are_one_clean_line(capsys, tmp_path):
    status, _, err = run(capsys, "inspect", tmp_path / "missing.safetensors")
    assert_clean_error(status, err, "missing.safetensors")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x0a\x00\x00\x00\x00\x00\x00\x00{not json}")
    status, _, err = run(capsys, "decode", tmp_path / "corrupt.safetensors", tmp_path / "out.safetensors")
    assert_clean_error(status, err, "not a readable safetensors file")
    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    status, _, err = run(capsys, "inspect", tmp_path / "plain.safetensors")
    assert_clean_error(status, err, "expected 'dkm-param'")
    assert len(err.strip().splitlines()) == 1


def test_usage_problems_exit_2_without_a_traceback(capsys):
    for argv in ([], ["inspect"], ["compress", "torch.nn:Linear"], ["demo", "--bits", "9"], ["frobnicate"]):
        status, _, err = run(capsys, *argv)
        assert_clean_error(status, err, "error:")
    status, out, _ = run(capsys, "--version")
    assert status == 0 and out.strip() == f"dkm-param {dp.__version__}"


def test_python_dash_m_runs_the_command_line(dkm_file):
    done = subprocess.run(
        [sys.executable, "-m", "dkm_param", "inspect", str(dkm_file)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "encode.weight" in done.stdout and f"dkm-param format version {FORMAT_VERSION}" in done.stdout


def test_command_line_modules_import_no_optional_extra():
    # torch itself imports tqdm when it is installed (torch.hub): count only what dkm_param adds
    code = (
        "import sys, torch; before = set(sys.modules);"
        "import dkm_param.cli, dkm_param.cli.demo, dkm_param.cli.plots, dkm_param.progress;"
        "added = {m.split('.')[0] for m in set(sys.modules) - before};"
        "print(sorted(added & {'tqdm', 'matplotlib', 'sklearn'}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert done.stdout.strip() == "[]"


def test_unwritable_outputs_fail_before_the_work(capsys, dkm_file, tmp_path):
    missing = tmp_path / "no" / "such" / "dir"
    status, _, err = run(capsys, "decode", dkm_file, missing / "x.safetensors")
    assert_clean_error(status, err, f"OUT {missing / 'x.safetensors'}: directory {missing} does not exist")
    status, _, err = run(capsys, "compress", *LINEAR, "--out", tmp_path)
    assert_clean_error(status, err, "is a directory; give a file name")
    status, _, err = run(capsys, "inspect", dkm_file, "--plot", missing / "p.png")
    assert_clean_error(status, err, "--plot")


def hostile_files(folder, good):
    """Files crafted against the reader and the terminal, by what they try."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(good), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(good))
    layers = json.loads(meta["layers"])
    name = sorted(layers)[0]

    def make(what, tensors=tensors, **changes):
        path = folder / f"{what}.safetensors"
        save_file(tensors, str(path), metadata={**meta, **changes})
        return path

    def field(key, value):
        return json.dumps({**layers, name: {**layers[name], key: value}})

    yield make("nested", layers="[" * 100_000 + "]" * 100_000)
    yield make("huge-int", layers=field("bits", 3).replace('"bits": 3', '"bits": 1' + "0" * 5000))
    yield make("float-bits", layers=field("bits", 2.9))
    yield make("string-shape", layers=field("shape", "84"))
    yield make("nan", layers=field("dim", float("nan")))
    yield make("alias-list", aliases=json.dumps({"x": ["y"]}))
    yield make("alias-over-layer", aliases=json.dumps({name: sorted(layers)[-1]}))
    yield make("escape", aliases=json.dumps({"\x1b[2J\x1b]0;title\x07\nforged": "x"}))


def test_hostile_files_get_one_line_on_stderr_and_status_2(capsys, dkm_file, tmp_path):
    for path in hostile_files(tmp_path, dkm_file):
        for command in (["inspect", path], ["inspect", path, "--json"], ["decode", path, tmp_path / "out.safetensors"]):
            status, out, err = run(capsys, *command)
            assert status == 2, (path.name, command, err)
            assert err.count("\n") == 1 and err.startswith("dkm-param: error: "), (path.name, err)
            assert "\x1b" not in err and "\x07" not in err and "Traceback" not in err
            assert not (tmp_path / "out.safetensors").exists()


def test_inspect_escapes_what_the_file_says_before_printing_it(capsys, tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(16, 16))
    compressed = dp.palettize(model, dp.Policy(default=dp.LayerSpec(bits=2), small_layer_bits=None))
    layer = compressed.layers.pop("0.weight")
    compressed.layers["0.\x1b[2Jweight\u202e"] = layer
    path = compressed.save(tmp_path / "m.safetensors")
    status, out, _ = run(capsys, "inspect", path)
    assert status == 0
    assert "\x1b" not in out and "\u202e" not in out
    assert "0.\\x1b[2Jweight\\u202e" in out
    status, out, _ = run(capsys, "inspect", path, "--json")
    assert status == 0 and "\x1b" not in out and json.loads(out)["layers"][0]["name"] == "0.\x1b[2Jweight\u202e"
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    save_file(load_file(str(path)), str(path), metadata={**meta, "note\x1b[2J": "\x1b]0;title\x07\nforged line"})
    status, out, _ = run(capsys, "inspect", path)
    assert status == 0 and "\x1b" not in out and "\x07" not in out and "\nforged line" not in out
    assert "metadata note\\x1b[2J: \\x1b]0;title\\x07\\nforged line" in out


def test_decode_refuses_a_layer_too_large_to_decode_before_allocating_it(capsys, tmp_path):
    from safetensors.torch import save_file

    # 320 KiB declaring 2**35 weights (128 GiB decoded): 1-bit vectors of 65,536 weights
    tensors = {"w.codebook": torch.randn(2, 65536).half(), "w.indices": torch.zeros(65536, dtype=torch.uint8)}
    layers = {"w": {"shape": [524288, 65536], "dtype": "float32", "bits": 1, "dim": 65536, "vectors": 524288}}
    meta = {"format": "dkm-param", "format_version": "1", "layers": json.dumps(layers), "aliases": "{}"}
    save_file(tensors, str(tmp_path / "bomb.safetensors"), metadata=meta)
    status, _, err = run(capsys, "decode", tmp_path / "bomb.safetensors", tmp_path / "out.safetensors")
    assert_clean_error(status, err, "layer 'w' (524288x65536 weights) needs 256.00 GiB to decode")
    assert not (tmp_path / "out.safetensors").exists()
    status, out, _ = run(capsys, "inspect", tmp_path / "bomb.safetensors")  # inspect decodes nothing
    assert status == 0 and "524288x65536" in out
