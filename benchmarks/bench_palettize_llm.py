"""Post-training palettization of Llama-style language models at scale: time and extra memory.

    python benchmarks/bench_palettize_llm.py [--cases 1.2b-bf16 551m-fp32-calibrated] [--threads 2]

Cases (models from ``bench_llm.py``'s configurations, random init, nothing downloaded;
every ``nn.Linear`` but ``lm_head`` at 4 bits, ``fc:4/1``):

    1.2b-bf16:            the 1.2B model in bfloat16, per tensor, no calibration
    551m-fp32-calibrated: the 551M model in float32, per tensor, calibrated on
                          8 sequences of 128 random token ids (GPTQ on the lookup table)
    134m-bf16:            a quick case to try the script out (not run by default)

Each case runs in its own subprocess, so that its peak memory is clean: it builds
the model, restarts the peak RSS (``_rss.reset_peak``), palettizes in place, and
reports the time, the extra peak RSS over the built model, the CompressedModel's
own bytes in memory (codebooks, indices, sparse parts: what it must hold to be
saved) and the file's size. Targets (issue 17): the 1.2B model in <= 3 minutes
with <= 1 GiB extra memory; the 551M calibrated in <= 15 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from _rss import peak_rss, reset_peak

CASES = {
    "1.2b-bf16": dict(config="1.2b", dtype="bf16", calibrated=False, minutes=3.0, extra_gib=1.0),
    "551m-fp32-calibrated": dict(config="551m", dtype="fp32", calibrated=True, minutes=15.0, extra_gib=None),
    "134m-bf16": dict(config="134m", dtype="bf16", calibrated=False, minutes=None, extra_gib=None),
}
DEFAULT = ["1.2b-bf16", "551m-fp32-calibrated"]
GIB = 1 << 30


def worker(name: str) -> None:
    """Runs in the subprocess: one JSON line of figures."""
    from bench_llm import DTYPES, build

    import dkm_param as dp

    case = CASES[name]
    model, _ = build(case["config"], DTYPES[case["dtype"]], torch.device("cpu"))
    model.eval()
    policy = dp.Policy.from_notation("fc:4/1", small_layer_bits=None, skip=("lm_head",))
    calibration = None
    if case["calibrated"]:
        tokens = torch.randint(0, model.config.vocab_size, (8, 128), generator=torch.Generator().manual_seed(0))
        calibration = [{"input_ids": chunk} for chunk in tokens.split(2)]
    reset_peak()
    base = peak_rss()
    began = time.perf_counter()
    compressed = dp.palettize(model, policy, calibration=calibration)
    took = time.perf_counter() - began
    extra = peak_rss() - base
    held = sum(layer.nbytes for layer in compressed.layers.values())  # indices held packed, as in the file
    with tempfile.TemporaryDirectory() as folder:
        size = os.path.getsize(compressed.save(os.path.join(folder, "m.safetensors")))
    print(json.dumps(dict(
        params=sum(p.numel() for p in model.parameters()),
        clustered=sum(layer.numel for layer in compressed.layers.values()),
        layers=len(compressed.layers), seconds=took, extra=extra, held=held, file=size,
    )), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=DEFAULT, choices=sorted(CASES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        worker(args.worker)
        return
    print(f"torch {torch.__version__}, {args.threads} threads, one process per case\n")
    print("| case | weights clustered | time | target | extra peak memory | target | "
          "CompressedModel in memory | file |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.cases:
        case = CASES[name]
        run = subprocess.run(
            [sys.executable, __file__, "--worker", name, "--threads", str(args.threads)],
            capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)),
        )
        lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
        if run.returncode or not lines:
            print(f"| {name} | failed: {run.stderr.strip().splitlines()[-1:] or run.returncode} | | | | | | |")
            continue
        got = json.loads(lines[-1])
        minutes, gib = case["minutes"], case["extra_gib"]
        fast = got["seconds"] <= 60 * (minutes or 0)
        time_mark = "-" if minutes is None else f"<= {minutes:.0f} min ({'ok' if fast else 'over'})"
        memory_mark = "-" if gib is None else f"<= {gib:.0f} GiB ({'ok' if got['extra'] <= gib * GIB else 'over'})"
        print(f"| {name} ({got['params'] / 1e6:,.0f}M params) | {got['clustered'] / 1e6:,.0f}M in {got['layers']} "
              f"layers | {got['seconds']:.1f} s | {time_mark} | {got['extra'] / GIB:.2f} GiB | {memory_mark} "
              f"| {got['held'] / GIB:.2f} GiB | {got['file'] / GIB:.2f} GiB |", flush=True)


if __name__ == "__main__":
    main()
