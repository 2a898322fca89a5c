"""Post-training palettization of a small language model trained here, on Python's own source.

    python benchmarks/bench_posttrain_lm.py [--steps 600] [--out benchmarks/out/posttrain_lm] [--bits 4 3 2]

The model: a Llama-style decoder (``transformers.LlamaConfig``: hidden 256,
4 layers, 4 heads, mlp 688, byte-level vocabulary of 256, about 3.3M
weights), trained from a random init on the standard library's top-level
``.py`` files read as bytes (every tenth file in sorted order held out for
evaluation), 128-byte sequences, batch 32, AdamW with a cosine schedule. The
trained weights are cached in ``--out`` (not in the repository), so later
runs skip the training.

Then every ``nn.Linear`` but ``lm_head`` is palettized at each of ``--bits``:
per tensor (``fc:b/1``); one codebook per group of 16 output channels;
sensitivity-weighted groups of 16 (diagonal Fisher from the calibration
batches); calibrated per tensor and calibrated groups of 16
(``palettize(..., calibration=...)``: GPTQ on the lookup table), the latter
also with the Fisher sensitivity seeding its codebooks; and both with 0.5%
of each layer's weights kept exact (``outliers=0.005``). Calibration
and sensitivity read 16 training sequences. Reported: held-out perplexity
(bits per byte is its log2) and its ratio to the float model's, and the
time and peak memory (RSS) of each palettization, next to the targets:
calibrated 4-bit within 2% of float, 3-bit within 10%.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time

import torch
from _rss import peak_rss, reset_peak

import dkm_param as dp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from dkm_recipe import SEQ, build, corpus, dkm_recipe, perplexity, sequences, train  # noqa: E402  the shipped recipe

EVAL_SEQS, CALIBRATION_SEQS = 256, 16
TARGETS = {4: 1.02, 3: 1.10}
DKM_TARGETS = {3: 1.03, 2: 1.15}
ANNEAL = 0.01  # tau at the end of the DKM recipe, relative to its start
OUTLIERS = 0.005  # the fraction of each layer's weights kept exact, in the rows with outliers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out", "posttrain_lm"))
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dkm-steps", type=int, default=100, help="steps of the DKM recipe (0: skip it)")
    parser.add_argument("--methods", nargs="*", default=None,
                        help="run only the post-training methods whose name holds one of these words")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    train_data, held_data = corpus()
    held = sequences(held_data, EVAL_SEQS, seed=1)
    calibration = sequences(train_data, CALIBRATION_SEQS, seed=2)
    model = build()
    cache = os.path.join(args.out, f"model-{args.steps}.pt")
    if os.path.exists(cache):
        model.load_state_dict(torch.load(cache))
        print(f"trained weights from {cache}")
    else:
        print(f"training {sum(p.numel() for p in model.parameters()):,} weights for {args.steps} steps "
              f"on {train_data.numel():,} bytes of the standard library's source")
        train(model, train_data, args.steps)
        os.makedirs(args.out, exist_ok=True)
        torch.save(model.state_dict(), cache)
    model.eval()
    float_ppl = perplexity(model, held)
    batches = [{"input_ids": chunk, "labels": chunk} for chunk in calibration.split(4)]
    inputs = [{"input_ids": chunk} for chunk in calibration.split(4)]
    skip = ("lm_head",)
    methods = {
        "per tensor": lambda b: dict(policy=dp.Policy.from_notation(f"fc:{b}/1", small_layer_bits=None, skip=skip)),
        "groups of 16": lambda b: dict(policy=grouped(b, skip)),
        "sensitivity, groups of 16": lambda b: dict(policy=grouped(b, skip), sensitivity="fisher"),
        "calibrated, per tensor": lambda b: dict(
            policy=dp.Policy.from_notation(f"fc:{b}/1", small_layer_bits=None, skip=skip), calibration=inputs),
        "calibrated, groups of 16": lambda b: dict(policy=grouped(b, skip), calibration=inputs),
        "calibrated + sensitivity, groups of 16": lambda b: dict(
            policy=grouped(b, skip), calibration=inputs, sensitivity="fisher"),
        f"calibrated + {OUTLIERS:.1%} outliers, per tensor": lambda b: dict(
            policy=dp.Policy.from_notation(f"fc:{b}/1", small_layer_bits=None, skip=skip), calibration=inputs,
            outliers=OUTLIERS),
        f"calibrated + sensitivity + {OUTLIERS:.1%} outliers, groups of 16": lambda b: dict(
            policy=grouped(b, skip), calibration=inputs, sensitivity="fisher", outliers=OUTLIERS),
    }
    print(f"\nfloat model: held-out perplexity {float_ppl:.3f} ({math.log2(float_ppl):.3f} bits per byte), "
          f"{EVAL_SEQS} sequences of {SEQ} bytes from {held_data.numel():,} held-out bytes; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print("| bits | method | perplexity | vs float | target | time | peak memory |")
    print("|---|---|---|---|---|---|---|")
    recipe_rows = []
    for bits in args.bits:
        for name, options in methods.items():
            if args.methods is not None and not any(word in name for word in args.methods):
                continue
            options = options(bits)
            copied = copy.deepcopy(model)
            reset_peak()
            began = time.perf_counter()
            if options.get("sensitivity") == "fisher":
                options["sensitivity"] = dp.fisher(copied, batches)
            dp.palettize(copied, options.pop("policy"), **options)
            took, peak = time.perf_counter() - began, peak_rss()
            ppl = perplexity(copied, held)
            target = TARGETS.get(bits) if name.startswith("calibrated") else None
            mark = "-" if target is None else f"<= {target:.2f}x ({'ok' if ppl / float_ppl <= target else 'over'})"
            print(f"| {bits} | {name} | {ppl:.3f} | {ppl / float_ppl:.3f}x | {mark} | {took:.1f} s "
                  f"| {peak / 2**20:,.0f} MiB |", flush=True)
        if args.dkm_steps:
            reset_peak()
            began = time.perf_counter()
            student, _, gaps = dkm_recipe(model, grouped(bits, skip), calibration, train_data, args.dkm_steps,
                                          anneal=ANNEAL, report=lambda line: None)
            took, peak = time.perf_counter() - began, peak_rss()
            ppl = perplexity(student, held)
            target = DKM_TARGETS.get(bits)
            mark = "-" if target is None else f"<= {target:.2f}x ({'ok' if ppl / float_ppl <= target else 'over'})"
            print(f"| {bits} | DKM recipe, groups of 16 ({args.dkm_steps} steps) | {ppl:.3f} | {ppl / float_ppl:.3f}x "
                  f"| {mark} | {took:.1f} s | {peak / 2**20:,.0f} MiB |", flush=True)
            recipe_rows.append((bits, gaps))
    for bits, gaps in recipe_rows:
        shown = ", ".join(
            f"step {step}: {soft:.3f} / {hard:.3f} ({(hard - soft) / soft:+.2%})" for step, soft, hard in gaps
        )
        print(f"\nDKM recipe at {bits} bits, training loss with soft / snapped weights: {shown}")


def grouped(bits: int, skip) -> dp.Policy:
    return dp.Policy(kinds={"fc": dp.LayerSpec(bits=bits, group_size=16)}, small_layer_bits=None, skip=skip)


if __name__ == "__main__":
    main()
