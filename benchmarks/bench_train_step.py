"""One training step of a ResNet18 (CIFAR-sized input) with and without DKM on its layers.

torchvision's resnet18(num_classes=10) from a random init, input 32x32, batch 32,
SGD (lr 0.01, momentum 0.9), cross entropy on one fixed random batch. DKM is
registered on every conv and linear weight but the first and the last
(``cv:b/1, fc:b/1`` with ``skip_first_last``), at 4 and at 2 bits. Steps are
timed after ``--warmup`` steps, so that the warm-started codebooks run as in
training (after the first step most layers stop after one or two iterations).

Reported per configuration: the mean step time and its ratio to the plain
step, and the split of a step: forward (model, clustering: the time spent in
``DKMParametrization.forward``), backward (model: the plain model's backward;
clustering: the rest of this configuration's backward) and the optimizer;
plus the mean number of DKM iterations per layer and step. The plain step is
measured before and after the DKM configurations; the faster is the reference.

With ``--threads 1 --cpu-time`` every time is the process's CPU time, which
another busy process on the machine barely disturbs (wall time with two
threads can be many times longer when the cores are shared). With
``--device cuda`` every time is wall time after a ``torch.cuda.synchronize``;
``--size 224 --batch 64`` is the ImageNet-sized step.

Usage: python benchmarks/bench_train_step.py [--steps 10] [--warmup 10] [--bits 4 2]
       [--threads N] [--cpu-time] [--device cpu|cuda] [--size 32] [--batch 32]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
import torchvision
from torch import nn

import dkm_param as dp
from dkm_param.ops import soft as ops_soft
from dkm_param.ops import table as ops_table

clock = time.perf_counter


class Recorder:
    """Times ``DKMParametrization.forward`` and counts the clustering's iterations while active."""

    def __init__(self):
        self.forward_s = 0.0
        self.iterations: list[int] = []
        self.active = False
        forward, soft_cluster = dp.DKMParametrization.forward, ops_soft.soft_cluster

        def timed_forward(module, weight):
            if not self.active:
                return forward(module, weight)
            began = clock()
            out = forward(module, weight)
            self.forward_s += clock() - began
            return out

        def counting(engine):
            def counted(*args, **kwargs):
                out = engine(*args, **kwargs)
                if self.active:
                    self.iterations.append(out[2])
                return out

            return counted

        dp.DKMParametrization.forward = timed_forward
        ops_soft.soft_cluster = counting(soft_cluster)  # the parametrization calls both through their modules
        ops_table.table_cluster = counting(ops_table.table_cluster)


def measure(model: nn.Module, data, steps: int, warmup: int, recorder: Recorder) -> dict:
    """Mean times of a step's phases over ``steps`` steps after ``warmup`` ones."""
    images, labels = data
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    phases = {"forward": [], "backward": [], "optimizer": [], "step": []}
    clustering, iterations = [], []
    for index in range(warmup + steps):
        recorder.active = index >= warmup
        recorder.forward_s, recorder.iterations = 0.0, []
        t0 = clock()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(images), labels)
        t1 = clock()
        loss.backward()
        t2 = clock()
        optimizer.step()
        t3 = clock()
        if index >= warmup:
            phases["forward"].append(t1 - t0)
            phases["backward"].append(t2 - t1)
            phases["optimizer"].append(t3 - t2)
            phases["step"].append(t3 - t0)
            clustering.append(recorder.forward_s)
            iterations.append(statistics.mean(recorder.iterations) if recorder.iterations else 0.0)
    recorder.active = False
    out = {name: statistics.mean(values) for name, values in phases.items()}
    out["clustering_forward"] = statistics.mean(clustering)
    out["iterations"] = statistics.mean(iterations)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 2])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--cpu-time", action="store_true", help="time by process CPU time (use with --threads 1)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--size", type=int, default=32, help="input height and width (default: 32)")
    parser.add_argument("--batch", type=int, default=32, help="batch size (default: 32)")
    args = parser.parse_args()
    global clock
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time:
        if device.type != "cpu":
            parser.error("--cpu-time measures the CPU: use it with --device cpu")
        clock = time.process_time
    elif device.type == "cuda":
        def clock() -> float:  # a GPU runs asynchronously: time what it has finished
            torch.cuda.synchronize(device)
            return time.perf_counter()
    torch.manual_seed(0)
    base = torchvision.models.resnet18(num_classes=10).to(device)
    data = (
        torch.randn(args.batch, 3, args.size, args.size, device=device),
        torch.randint(0, 10, (args.batch,), device=device),
    )
    recorder = Recorder()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(
        f"torch {torch.__version__}, {where}, input {args.batch}x3x{args.size}x{args.size}, "
        f"{'CPU' if args.cpu_time else 'wall'} time, load average {os.getloadavg()}"
    )

    results = [("plain", None, measure(copy.deepcopy(base), data, args.steps, args.warmup, recorder))]
    for bits in args.bits:
        model = copy.deepcopy(base)
        plan = dp.register_dkm(model, dp.Policy.from_notation(f"cv:{bits}/1, fc:{bits}/1", skip_first_last=True))
        layers = len(list(plan.clustered()))
        weights = sum(model.get_submodule(row.name).weight.numel() for row in plan.clustered())
        label = f"DKM {bits}-bit ({layers} layers, {weights / 1e6:.1f}M weights)"
        results.append((label, bits, measure(model, data, args.steps, args.warmup, recorder)))
    # the plain step again, after: the faster of the two is the reference, so that a
    # disturbed plain measurement cannot flatter the ratios
    again = measure(copy.deepcopy(base), data, args.steps, args.warmup, recorder)
    print(f"load average after: {os.getloadavg()}")
    print(f"plain step before / after: {results[0][2]['step']:.3f} s / {again['step']:.3f} s\n")
    if again["step"] < results[0][2]["step"]:
        results[0] = ("plain", None, again)

    plain = results[0][2]
    header = (
        "| configuration | step | vs plain | fwd: model | fwd: clustering | bwd: model | bwd: clustering "
        "| optimizer | DKM iterations per layer |"
    )
    print(header)
    print("|" + "|".join(["---"] * (header.count("|") - 1)) + "|")
    for label, bits, r in results:
        model_fwd = r["forward"] - r["clustering_forward"]
        model_bwd = min(plain["backward"], r["backward"])
        cluster_bwd = r["backward"] - model_bwd
        print(
            f"| {label} | {r['step']:.3f} s | {r['step'] / plain['step']:.2f}x | {model_fwd:.3f} s "
            f"| {r['clustering_forward']:.3f} s | {model_bwd:.3f} s | {cluster_bwd:.3f} s "
            f"| {r['optimizer']:.3f} s | {r['iterations']:.2f} |"
        )


if __name__ == "__main__":
    main()
