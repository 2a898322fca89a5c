"""The README's code runs as written and its decoder matches the library."""

import re
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch

import dkm_param as dp

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def runnable_blocks():
    return [block for block in python_blocks() if "import dkm_param as dp" in block]


def test_readme_shows_the_numpy_decoder_verbatim():
    decoder = (ROOT / "examples" / "decode_numpy.py").read_text().strip()
    assert any(decoder in block for block in python_blocks())


@pytest.mark.parametrize("codebook_dtype", [None, torch.float16])
def test_numpy_decoder_matches_the_library(tmp_path, codebook_dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(8, 6, 3),
        torch.nn.Flatten(),
        torch.nn.Linear(6 * 4 * 4, 30),
        torch.nn.ReLU(),
        torch.nn.Linear(30, 5),
    )
    model.insert(0, torch.nn.Unflatten(1, (8, 6, 6)))
    grouped = dp.LayerSpec(bits=2, group_size=1, channel_scale=True)
    dp.register_dkm(
        model,
        dp.Policy(
            kinds={"fc": dp.LayerSpec(bits=3, dim=2)},
            overrides={"5": grouped, "1": dp.LayerSpec(bits=3, dim=4, layout="input")},
            small_layer_bits=None,
        ),
    )
    model.eval()
    path = dp.finalize(model, codebook_dtype=codebook_dtype).save(tmp_path / "m.safetensors")
    decode = runpy.run_path(str(ROOT / "examples" / "decode_numpy.py"))["decode"]
    decoded = decode(str(path))
    state = model.state_dict()
    assert decoded.keys() == state.keys()
    for name, tensor in state.items():
        assert np.array_equal(decoded[name], tensor.numpy()), name


@pytest.mark.slow
def test_quick_start_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(runnable_blocks()[0], "README quick start", "exec"), {})
    assert (tmp_path / "resnet18.dkm.safetensors").stat().st_size > 0


@pytest.mark.slow
def test_every_other_readme_example_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = runnable_blocks()[1:]
    assert blocks, "the README has more than one runnable example"
    for i, block in enumerate(blocks):
        exec(compile(block, f"README example {i + 1}", "exec"), {})
