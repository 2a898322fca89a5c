"""What rejecting a hostile file costs: peak memory, as a multiple of the file's own size.

    python benchmarks/bench_hostile.py [--scale 1.0]

Each file is crafted against one way a reader can be made to allocate
before it validates (a huge metadata string, a small file declaring a huge
layer, deeply nested or enormous JSON, many tiny indices), and read in a
fresh process that reports its peak resident memory over what it held
before the read (``ru_maxrss``). ``--scale`` shrinks or grows the files.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch
from safetensors.torch import save_file

MiB = 2**20

PROBE = textwrap.dedent(
    """
    import sys, torch
    import dkm_param as dp

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

    def reset_peak():
        try:  # the peak (VmHWM) restarts from the current RSS (Linux)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        return status("VmRSS")

    def peak():
        return status("VmHWM")

    model = torch.nn.Linear(64, 32)
    before = reset_peak()
    try:
        if sys.argv[2] == "load":
            dp.load_compressed(sys.argv[1], model)
        else:
            dp.read_compressed(sys.argv[1])
        outcome = "read"
    except dp.DKMError as exc:
        outcome = type(exc).__name__
    print(outcome, peak() - before)
    """
)


def meta(layers: dict | str, aliases: dict | str = "{}") -> dict:
    as_text = lambda v: v if isinstance(v, str) else json.dumps(v)  # noqa: E731
    return {"format": "dkm-param", "format_version": "1", "layers": as_text(layers), "aliases": as_text(aliases)}


def layer(shape, bits, dim, vectors):
    return {"shape": shape, "dtype": "float32", "bits": bits, "dim": dim, "vectors": vectors, "packing": "lsb"}


def files(folder: Path, scale: float):
    """(what it tries, path, how it is read)."""
    big = int(64 * MiB * scale)
    path = folder / "metadata.safetensors"
    save_file({"x": torch.zeros(4)}, str(path), metadata=meta("{}", "[" * big + "]"))
    yield f"a {big // MiB} MiB metadata string", path, "read"

    path = folder / "padded.safetensors"
    tensors = {f"t{i}": torch.zeros(64 * 1024) for i in range(int(16 * scale) or 1)}
    save_file(tensors, str(path), metadata=meta("{}", json.dumps({"a": ["x"] * int(2_000_000 * scale)})))
    yield "aliases holding a list of 2 million names", path, "read"

    path = folder / "nested.safetensors"
    save_file({"x": torch.zeros(4)}, str(path), metadata=meta("[" * 400_000 + "]" * 400_000))
    yield "JSON nested 400,000 deep", path, "read"

    path = folder / "declares.safetensors"
    tensors = {
        "weight.codebook": torch.randn(2, 16384).half(),
        "weight.indices": torch.randint(0, 256, (512,), dtype=torch.uint8),
        "bias": torch.zeros(32),
    }
    save_file(tensors, str(path), metadata=meta({"weight": layer([4096, 16384], 1, 16384, 4096)}))
    yield "a small file declaring 67M weights, loaded into another model", path, "load"

    path = folder / "indices.safetensors"
    count = int(64 * MiB * scale)  # 1-bit indices: count / 8 bytes of file
    tensors = {
        "weight.codebook": torch.tensor([[-1.0], [1.0]]),
        "weight.indices": torch.zeros(count // 8, dtype=torch.uint8),
    }
    save_file(tensors, str(path), metadata=meta({"weight": layer([count // 1024, 1024], 1, 1, count)}))
    yield f"{count // 8 // MiB} MiB of 1-bit indices, loaded into another model", path, "load"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="size of the crafted files (default 1.0)")
    args = parser.parse_args()
    print("| hostile file | file size | outcome | peak memory over the reader's own | x file size |")
    print("| --- | --- | --- | --- | --- |")
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for what, path, how in files(Path(tmp), args.scale):
            done = subprocess.run([sys.executable, "-c", PROBE, str(path), how], capture_output=True, text=True)
            if done.returncode:
                print(f"| {what} | - | crashed: {done.stderr.strip().splitlines()[-1]} | - | - |")
                continue
            outcome, grown = done.stdout.split()
            size = path.stat().st_size
            worst = max(worst, int(grown) / MiB)
            grown = int(grown)
            print(f"| {what} | {size / MiB:.2f} MiB | {outcome} | {grown / MiB:.1f} MiB | {grown / size:.2f}x |")
    print(f"\nworst peak while rejecting or reading: {worst:.1f} MiB")


if __name__ == "__main__":
    main()
