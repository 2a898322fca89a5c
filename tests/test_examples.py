"""The scripts in examples/ run as written."""

import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow
@pytest.mark.parametrize(
    "script, argv",
    [
        ("dkm_training_loop.py", ["--epochs", "1", "--out", "digits.safetensors"]),
        (
            "palettize_torchvision.py",
            ["--model", "mobilenet_v2", "--policy", "cv:2/1, fc:2/1", "--out", "m.safetensors"],
        ),
        (
            "dkm_recipe.py",
            ["--hidden", "64", "--layers", "1", "--train-steps", "30", "--steps", "6", "--out", "recipe.safetensors"],
        ),
    ],
)
def test_example_runs(script, argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [script, *argv])
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    assert (tmp_path / argv[-1]).stat().st_size > 0
    assert "compression" in capsys.readouterr().out
