"""The DKM recipe for a language model: close to float at 3 and 2 bits.

    python examples/dkm_recipe.py [--bits 3] [--steps 100] [--out recipe.safetensors]

1. Train (or load, ``--weights``) a small byte-level Llama-style decoder on the
   text that ships with Python: the standard library's own source.
2. Seed: palettize it with calibration data (GPTQ on the lookup table) and
   Fisher sensitivity, keeping the model's float weights (``inplace=False``).
3. Fine-tune with DKM from that seed by distillation from the float model
   (KL divergence to its next-byte distribution), Adam 1e-4, while the
   temperature is annealed a hundredfold (``dp.scale_temperature``), so
   that the soft weights the model trains with end where ``finalize``
   snaps them. Every few steps it prints the loss with soft weights and
   after snapping (``dp.snapped``): the gap between them is what the
   annealing closes.
4. Finalize, save, and print held-out perplexity: float, the seed, the recipe.

Needs ``transformers`` (``pip install transformers``). Nothing is downloaded.
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

import dkm_param as dp

SEQ = 128


def corpus() -> tuple[torch.Tensor, torch.Tensor]:
    """The standard library's top-level source as bytes: (training, held out: every tenth file)."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    train, held = [], []
    for index, path in enumerate(files):
        with open(path, "rb") as f:
            (held if index % 10 == 0 else train).append(f.read())
    as_tensor = lambda parts: torch.frombuffer(bytearray(b"\n".join(parts)), dtype=torch.uint8).long()  # noqa: E731
    return as_tensor(train), as_tensor(held)


def sequences(data: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """``count`` random windows of ``SEQ`` bytes."""
    starts = torch.randint(0, data.numel() - SEQ, (count,), generator=torch.Generator().manual_seed(seed))
    return torch.stack([data[s : s + SEQ] for s in starts.tolist()])


def build(hidden: int = 256, layers: int = 4, heads: int = 4, mlp: int = 688):
    """A byte-level Llama-style decoder, random init."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=mlp,
                         num_attention_heads=heads, num_key_value_heads=heads, vocab_size=256,
                         max_position_embeddings=SEQ, use_cache=False)
    return LlamaForCausalLM(config)


def train(model, data: torch.Tensor, steps: int, batch: int = 32) -> None:
    """Plain next-byte training: AdamW, one-cycle schedule."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    model.train()
    began = time.perf_counter()
    for step in range(steps):
        chunk = sequences(data, batch, seed=1000 + step)
        loss = model(input_ids=chunk, labels=chunk).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  step {step}: loss {loss.item():.3f} ({time.perf_counter() - began:.0f} s)", flush=True)
    model.eval()


def perplexity(model, held: torch.Tensor) -> float:
    """exp of the mean next-byte loss on ``held`` (windows of SEQ bytes)."""
    model.eval()
    total = 0.0
    with torch.no_grad():
        for chunk in held.split(32):
            total += model(input_ids=chunk, labels=chunk).loss.item() * len(chunk)
    return math.exp(total / len(held))


def dkm_recipe(teacher, policy: dp.Policy, calibration: torch.Tensor, data: torch.Tensor, steps: int,
               lr: float = 1e-4, anneal: float = 0.01, batch: int = 16, report=print):
    """The recipe: calibrated + sensitivity seed, DKM by distillation from ``teacher``, tau annealed by ``anneal``.

    calibration: sequences for the seed's statistics and sensitivity; data: the training bytes.
    Returns (the finalized student, its CompressedModel, [(step, soft loss, snapped loss)]).
    """
    inputs = [{"input_ids": chunk} for chunk in calibration.split(4)]
    labelled = [{"input_ids": chunk, "labels": chunk} for chunk in calibration.split(4)]
    student = copy.deepcopy(teacher)
    sensitivity = dp.fisher(student, labelled)
    seed = dp.palettize(student, policy, calibration=inputs, sensitivity=sensitivity, inplace=False)
    dp.register_dkm(student, policy, init=seed)
    student.train()
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=lr)
    factor = anneal ** (1.0 / steps)  # tau shrinks by this much a step: by ``anneal`` in all
    gaps = []
    for step in range(steps):
        chunk = sequences(data, batch, seed=5000 + step)
        with torch.no_grad():
            target = torch.log_softmax(teacher(input_ids=chunk).logits.float(), -1)
        logits = student(input_ids=chunk).logits.float()
        loss = torch.nn.functional.kl_div(torch.log_softmax(logits, -1), target, log_target=True,
                                          reduction="batchmean")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        dp.scale_temperature(student, factor)
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            with torch.no_grad():  # the language-model loss with the soft weights, and after snapping
                soft = student(input_ids=chunk, labels=chunk).loss.item()
                with dp.snapped(student):
                    hard = student(input_ids=chunk, labels=chunk).loss.item()
            gaps.append((step, soft, hard))
            report(f"  step {step}: distillation {loss.item():.4f}, loss soft {soft:.4f} / snapped {hard:.4f} "
                   f"({(hard - soft) / soft:+.2%})")
    compressed = dp.finalize(student)
    student.eval()
    return student, compressed, gaps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=16, help="one codebook per this many output channels")
    parser.add_argument("--steps", type=int, default=100, help="DKM steps")
    parser.add_argument("--train-steps", type=int, default=400, help="steps to train the float model")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--weights", help="trained float weights to start from (saved there after training)")
    parser.add_argument("--out", default="recipe.safetensors")
    args = parser.parse_args()

    train_data, held_data = corpus()
    held = sequences(held_data, 64, seed=1)
    model = build(args.hidden, args.layers, mlp=(args.hidden * 8 // 3 + 7) // 8 * 8)
    if args.weights and os.path.exists(args.weights):
        model.load_state_dict(torch.load(args.weights))
    else:
        print(f"training the float model for {args.train_steps} steps on the standard library's source")
        train(model, train_data, args.train_steps)
        if args.weights:
            torch.save(model.state_dict(), args.weights)
    model.eval()
    policy = dp.Policy(kinds={"fc": dp.LayerSpec(bits=args.bits, group_size=args.group_size)},
                       small_layer_bits=None, skip=("lm_head",))
    calibration = sequences(train_data, 16, seed=2)
    seeded = copy.deepcopy(model)
    dp.palettize(seeded, policy, calibration=[{"input_ids": c} for c in calibration.split(4)])
    print(f"DKM recipe at {args.bits} bits, {args.steps} steps")
    student, compressed, _ = dkm_recipe(model, policy, calibration, train_data, args.steps)
    compressed.save(args.out)
    print(compressed.summary())
    base = perplexity(model, held)
    for name, ppl in (("float", base), ("calibrated palettization", perplexity(seeded, held)),
                      ("DKM recipe", perplexity(student, held))):
        print(f"held-out perplexity, {name}: {ppl:.3f} ({ppl / base:.3f}x float)")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
