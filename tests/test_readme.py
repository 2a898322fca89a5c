"""The README's code runs as written and its decoder matches the library.

Every fenced block of the README is Python, a shell session (``bash``) or
printed output (no language). The Python blocks and the shell commands run
in the README's order in one directory, each Python block on its own (a
reader may copy any one of them), so a file one block writes is there for
the next. Two kinds of shell command are changed, and both lists are tested:
``NOT_RUN`` (installing into the environment the tests already run in) and
``FASTER`` (arguments appended where the command as written takes minutes).
"""

import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import dkm_param as dp
from dkm_param import cli

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
LANGUAGES = {"python", "bash", ""}  # "": printed output, not run

# Commands not run, by their first words: installing is what the test environment already did.
NOT_RUN = (("pip", "install"),)
# Arguments appended to a command that starts with these words, so that it runs in seconds.
FASTER = {
    ("pytest",): ("--collect-only", "-q"),  # the suite this test is part of: collected, not run again
    ("dkm-param", "demo"): ("--epochs", "1", "--dkm-epochs", "1"),
    ("python", "-m", "dkm_param", "demo"): ("--epochs", "1", "--dkm-epochs", "1"),
    ("python", "examples/dkm_recipe.py"): ("--hidden", "64", "--layers", "1", "--train-steps", "30", "--steps", "6"),
}
IN_THE_CHECKOUT = {"pytest"}  # commands the README runs in the source checkout, not in the working directory


def code_blocks():
    """Every fenced block as (language, text, line of its opening fence), in order."""
    return [
        (match.group(1), match.group(2), README.count("\n", 0, match.start()) + 1)
        for match in re.finditer(r"^```(\w*)\n(.*?)^```", README, flags=re.S | re.M)
    ]


def python_blocks():
    return [text for language, text, _ in code_blocks() if language == "python"]


def shell_commands(text):
    """The commands of a shell block as argument lists: continuation lines joined, comments dropped, and an
    alternative offered in a comment (``# or: python -m dkm_param demo``) taken as a command of its own."""
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words:
            commands.append(words)
        alternative = re.search(r"#\s*or:\s*(.+)$", line)
        if alternative:
            commands.append(shlex.split(alternative.group(1), comments=True))
    return commands


def is_not_run(words):
    return any(tuple(words[: len(prefix)]) == prefix for prefix in NOT_RUN)


def faster(words):
    for prefix, extra in FASTER.items():
        if tuple(words[: len(prefix)]) == prefix:
            return [*words, *extra]
    return list(words)


def run_command(words, where):
    """Run one README command; returns (exit status, what it printed)."""
    words = faster(words)
    if words[0] == "dkm-param":  # the console script is dkm_param.cli:main: call it here, torch already loaded
        return cli.main(words[1:]), ""
    if words[0] == "python" and len(words) > 1 and (ROOT / words[1]).is_file():
        words[1] = str(ROOT / words[1])  # a script of the checkout, run where the README's files are
    programs = {"python": [sys.executable], "pytest": [sys.executable, "-m", "pytest"]}
    assert words[0] in programs, f"the README runs {words[0]!r}: teach tests/test_readme.py to run it"
    done = subprocess.run(
        [*programs[words[0]], *words[1:]],
        cwd=ROOT if words[0] in IN_THE_CHECKOUT else where,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done.returncode, done.stdout + done.stderr


def test_readme_shows_the_numpy_decoder_verbatim():
    decoder = (ROOT / "examples" / "decode_numpy.py").read_text().strip()
    assert any(decoder in block for block in python_blocks())


def test_numpy_decoder_says_what_is_wrong_without_a_traceback(tmp_path):
    plain = tmp_path / "plain.safetensors"
    dp.CompressedModel({}, {"x": torch.zeros(2)}).save(tmp_path / "ours.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(plain))
    (tmp_path / "text.safetensors").write_text("not a safetensors file")
    cases = {
        (): "usage: python decode_numpy.py MODEL.safetensors",
        (str(tmp_path / "missing.safetensors"),): "cannot decode: No such file",
        (str(plain),): "is not a dkm-param file",
        (str(tmp_path / "text.safetensors"),): "cannot decode",
    }
    script = str(ROOT / "examples" / "decode_numpy.py")
    for argv, words in cases.items():
        done = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, timeout=120)
        assert done.returncode == 1 and words in done.stderr and "Traceback" not in done.stderr, (argv, done.stderr)
    ours = str(tmp_path / "ours.safetensors")
    done = subprocess.run([sys.executable, script, ours], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == "x float32 (2,)\n", done.stderr


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


def test_every_block_is_python_shell_or_output():
    blocks = code_blocks()
    assert {language for language, _, _ in blocks} <= LANGUAGES, "a block the README test would not run"
    assert sum(language == "python" for language, _, _ in blocks) >= 5
    assert README.count("```") == 2 * len(blocks), "a fence the block pattern does not see"


def test_shell_blocks_read_as_commands():
    text = 'tool a "b c"   # a comment\n\ntool d \\\n    --e f  # or: other g\n'
    assert shell_commands(text) == [["tool", "a", "b c"], ["tool", "d", "--e", "f"], ["other", "g"]]


def test_only_install_commands_are_left_out():
    assert all(prefix[:2] == ("pip", "install") for prefix in NOT_RUN)
    commands = [words for language, text, _ in code_blocks() if language == "bash" for words in shell_commands(text)]
    left_out = [words for words in commands if is_not_run(words)]
    assert left_out and all(words[:2] == ["pip", "install"] for words in left_out)
    assert any(words[:2] == ["dkm-param", "compress"] for words in commands)
    demo = ["dkm-param", "demo", "--seed", "1"]
    assert faster(demo) == [*demo, *FASTER[("dkm-param", "demo")]]
    assert faster(["dkm-param", "inspect", "f"]) == ["dkm-param", "inspect", "f"]


@pytest.mark.slow
def test_every_readme_block_runs_as_written_in_order(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ran = 0
    for language, text, line in code_blocks():
        if language == "python":
            # each block on its own, as a reader would copy it; as a script would, not as __main__
            exec(compile(text, f"README.md, the python block at line {line}", "exec"), {"__name__": "readme"})
            ran += 1
        elif language == "bash":
            for words in shell_commands(text):
                if is_not_run(words):
                    continue
                status, printed = run_command(words, tmp_path)
                assert status == 0, f"README.md line {line}: {shlex.join(words)} exited {status}\n{printed}"
                ran += 1
    assert ran >= 13
    written = {path.relative_to(tmp_path).as_posix() for path in tmp_path.rglob("*") if path.is_file()}
    expected = {
        "dkm-demo/overview.png",  # the demo
        "resnet18.dkm.safetensors",  # the quick start
        "plain.safetensors",  # dkm-param decode of the quick start's file
        "resnet18.palettized.safetensors",  # dkm-param compress, and palettize in Python
        "resnet18.png",  # compress --plot
        "resnet18.ipq.safetensors",  # codebook fine-tuning
        "recipe.safetensors",  # examples/dkm_recipe.py
    }
    assert expected <= written
