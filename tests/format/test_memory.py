"""Rejecting a hostile file costs little memory: every allocation is bounded by the file and the model, checked first.

Each case runs in a fresh process, whose peak resident memory is read
before and after the work.
"""

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import dkm_param as dp

MiB = 2**20

# the probe of benchmarks/bench_hostile.py: one read in a fresh process, printing its outcome and peak growth
PROBE = runpy.run_path(str(Path(__file__).resolve().parents[2] / "benchmarks" / "bench_hostile.py"))["PROBE"]


def probe(path, action="read"):
    done = subprocess.run([sys.executable, "-c", PROBE, str(path), action], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    outcome, grown = done.stdout.split()
    return outcome, int(grown)


def layer_meta(shape, bits, dim, vectors):
    return {"shape": shape, "dtype": "float32", "bits": bits, "dim": dim, "vectors": vectors, "packing": "lsb"}


def test_a_huge_metadata_string_is_refused_unread(tmp_path):
    path = tmp_path / "m.safetensors"
    meta = {"format": "dkm-param", "format_version": "1", "layers": "{}", "aliases": "[" * (64 * MiB) + "]"}
    save_file({"x": torch.zeros(4)}, str(path), metadata=meta)
    outcome, grown = probe(path)
    assert outcome == "FormatError" and grown < 16 * MiB


def test_metadata_larger_than_its_tensors_need_is_refused_before_parsing(tmp_path):
    path = tmp_path / "m.safetensors"
    tensors = {f"t{i}": torch.zeros(64 * 1024) for i in range(4)}  # 1 MiB of data: the header may be large
    meta = {"format": "dkm-param", "format_version": "1", "layers": json.dumps({"a": ["x"] * 400_000}), "aliases": "{}"}
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(dp.FormatError, match="metadata 'layers' is .* bytes, more than a file of its tensors"):
        dp.read_compressed(path)
    # small text, many objects: each costs far more memory parsed than written
    meta.update(layers="{}", aliases='{"a": [' + "[]," * 200_000 + "[]]}")
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(dp.FormatError, match="metadata 'aliases' opens 200003 JSON objects and arrays"):
        dp.read_compressed(path)


def test_a_small_file_declaring_a_huge_layer_is_refused_before_decoding(tmp_path):
    # 1 bit a vector, 16384 weights a vector: 4096 vectors (512 bytes) and a 2 x 16384 float16 codebook
    # (64 KiB) declare 67M weights, 256 MiB once decoded
    path = tmp_path / "m.safetensors"
    tensors = {
        "weight.codebook": torch.randn(2, 16384).half(),
        "weight.indices": torch.randint(0, 256, (512,), dtype=torch.uint8),
        "bias": torch.zeros(32),
    }
    layers = {"weight": layer_meta([4096, 16384], 1, 16384, 4096)}
    meta = {"format": "dkm-param", "format_version": "1", "layers": json.dumps(layers), "aliases": "{}"}
    save_file(tensors, str(path), metadata=meta)
    assert path.stat().st_size < 70 * 1024
    assert dp.read_compressed(path).layers["weight"].numel == 4096 * 16384  # a valid file, for another model
    outcome, grown = probe(path, "load")
    assert outcome == "RegistrationError" and grown < 32 * MiB


def test_unpacking_takes_a_byte_an_index(tmp_path):
    path = tmp_path / "m.safetensors"
    count = 8 * 8 * MiB  # 8 MiB of 1-bit indices
    tensors = {
        "weight.codebook": torch.tensor([[-1.0], [1.0]]),
        "weight.indices": torch.zeros(8 * MiB, dtype=torch.uint8),
    }
    layers = {"weight": layer_meta([count // 1024, 1024], 1, 1, count)}
    meta = {"format": "dkm-param", "format_version": "1", "layers": json.dumps(layers), "aliases": "{}"}
    save_file(tensors, str(path), metadata=meta)
    outcome, grown = probe(path)
    assert outcome == "read" and grown < 128 * MiB  # 64 MiB of indices, the 8 MiB packed, and a margin


def test_megabytes_of_aliases_are_refused_unparsed(tmp_path):
    path = tmp_path / "m.safetensors"
    tensors = {f"t{i}": torch.zeros(2**20) for i in range(2)}  # 8 MiB of data lets the header be large
    aliases = json.dumps({f"name{i}": "t0" for i in range(400_000)})  # 8 MiB of names, about 90 MiB parsed
    save_file(tensors, str(path), metadata={"format": "dkm-param", "format_version": "1", "layers": "{}",
                                            "aliases": aliases})
    outcome, grown = probe(path)
    # what remains is safetensors reading its header (the 8 MiB string, a few times over)
    assert outcome == "FormatError" and grown < 48 * MiB
