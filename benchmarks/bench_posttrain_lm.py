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
also with the Fisher sensitivity seeding its codebooks. Calibration
and sensitivity read 16 training sequences. Reported: held-out perplexity
(bits per byte is its log2) and its ratio to the float model's, and the
time and peak memory (RSS) of each palettization, next to the targets:
calibrated 4-bit within 2% of float, 3-bit within 10%.
"""

from __future__ import annotations

import argparse
import copy
import glob
import math
import os
import sysconfig
import time

import torch
from _rss import peak_rss, reset_peak

import dkm_param as dp

SEQ, BATCH, EVAL_SEQS, CALIBRATION_SEQS = 128, 32, 256, 16
CONFIG = dict(hidden_size=256, num_hidden_layers=4, intermediate_size=688, num_attention_heads=4,
              num_key_value_heads=4, vocab_size=256, max_position_embeddings=SEQ, use_cache=False)
TARGETS = {4: 1.02, 3: 1.10}
DKM_TARGETS = {3: 1.03, 2: 1.15}
ANNEAL = 0.01  # tau at the end of the DKM recipe, relative to its start


def corpus() -> tuple[torch.Tensor, torch.Tensor]:
    """The standard library's top-level source as bytes: (training, held out)."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    train, held = [], []
    for index, path in enumerate(files):
        with open(path, "rb") as f:
            (held if index % 10 == 0 else train).append(f.read())
    as_tensor = lambda parts: torch.frombuffer(bytearray(b"\n".join(parts)), dtype=torch.uint8).long()  # noqa: E731
    return as_tensor(train), as_tensor(held)


def sequences(data: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    starts = torch.randint(0, data.numel() - SEQ, (count,), generator=torch.Generator().manual_seed(seed))
    return torch.stack([data[s : s + SEQ] for s in starts.tolist()])


def build():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**CONFIG))


def train(model, data: torch.Tensor, steps: int) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    model.train()
    began = time.perf_counter()
    for step in range(steps):
        batch = sequences(data, BATCH, seed=1000 + step)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  step {step}: loss {loss.item():.3f} ({time.perf_counter() - began:.0f} s)", flush=True)


def perplexity(model, held: torch.Tensor) -> float:
    model.eval()
    total = 0.0
    with torch.no_grad():
        for batch in held.split(32):
            total += model(input_ids=batch, labels=batch).loss.item() * len(batch)
    return math.exp(total / len(held))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out", "posttrain_lm"))
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dkm-steps", type=int, default=100, help="steps of the DKM recipe (0: skip it)")
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
    }
    print(f"\nfloat model: held-out perplexity {float_ppl:.3f} ({math.log2(float_ppl):.3f} bits per byte), "
          f"{EVAL_SEQS} sequences of {SEQ} bytes from {held_data.numel():,} held-out bytes; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print("| bits | method | perplexity | vs float | target | time | peak memory |")
    print("|---|---|---|---|---|---|---|")
    recipe_rows = []
    for bits in args.bits:
        for name, options in methods.items():
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
            student, gaps = dkm_recipe(model, bits, inputs, batches, train_data, args.dkm_steps)
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


def dkm_recipe(model, bits: int, inputs, batches, data: torch.Tensor, steps: int):
    """DKM fine-tuning seeded by the calibrated, sensitivity-weighted palettization, distilled from the
    float model, its temperature annealed a hundredfold over the steps so that the soft weights it trains
    with end where ``finalize`` snaps them. Returns (the finalized student, [(step, soft loss, snapped loss)])."""
    policy = grouped(bits, ("lm_head",))
    student = copy.deepcopy(model)
    sensitivity = dp.fisher(student, batches)
    seed = dp.palettize(student, policy, calibration=inputs, sensitivity=sensitivity, inplace=False)
    dp.register_dkm(student, policy, init=seed)
    student.train()
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-4)
    factor = ANNEAL ** (1.0 / steps)
    gaps = []
    for step in range(steps):
        batch = sequences(data, 16, seed=5000 + step)
        with torch.no_grad():
            teacher = torch.log_softmax(model(input_ids=batch).logits.float(), -1)
        logits = student(input_ids=batch).logits.float()
        loss = torch.nn.functional.kl_div(torch.log_softmax(logits, -1), teacher, log_target=True,
                                          reduction="batchmean")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        dp.scale_temperature(student, factor)
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            with torch.no_grad():
                soft = student(input_ids=batch, labels=batch).loss.item()
                with dp.snapped(student):
                    hard = student(input_ids=batch, labels=batch).loss.item()
            gaps.append((step, soft, hard))
    dp.finalize(student)
    return student, gaps


def grouped(bits: int, skip) -> dp.Policy:
    return dp.Policy(kinds={"fc": dp.LayerSpec(bits=bits, group_size=16)}, small_layer_bits=None, skip=skip)


if __name__ == "__main__":
    main()
