"""Post-training palettization quality on real data: scikit-learn's 8x8 handwritten digits.

    python benchmarks/bench_palettize_digits.py [--epochs 40] [--seed 0]

Trains a small CNN on 75% of the 1,797 digits, then palettizes a copy at
4, 3 and 2 bits: one codebook per tensor, one per group of 4 output
channels, sensitivity-weighted (diagonal Fisher from 4 training batches),
and calibrated per tensor (the same 4 batches' inputs; GPTQ on the lookup
table). Prints held-out test accuracy of each next to the float model.
"""

import argparse
import copy
import time

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import dkm_param as dp


def data(seed):
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(digits.target)
    train_x, test_x, train_y, test_y = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    return train_x, train_y, test_x, test_y


def cnn():
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 2 * 2, 128), nn.ReLU(), nn.Linear(128, 10),
    )


def accuracy(model, x, y):
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item() * 100


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    train_x, train_y, test_x, test_y = data(args.seed)
    model = cnn()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(args.epochs):
        model.train()
        for batch in torch.randperm(len(train_x)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(train_x[batch]), train_y[batch]).backward()
            opt.step()
    base = accuracy(model, test_x, test_y)
    calibration = [(train_x[i : i + 64], train_y[i : i + 64]) for i in range(0, 256, 64)]
    sensitivity = dp.fisher(model, calibration)
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    print(
        f"digits: {len(train_x)} train / {len(test_x)} test images; float model {base:.2f}% test accuracy, "
        f"{size / 1024:.1f} KiB\n"
    )
    print(
        "| bits | per tensor | per group of 4 channels | sensitivity-weighted | calibrated | "
        "compression (per tensor) | time (per tensor) | time (calibrated) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for bits in (4, 3, 2):
        row = []
        for spec, sens, calibrated in [
            (dp.LayerSpec(bits=bits), None, None),
            (dp.LayerSpec(bits=bits, group_size=4), None, None),
            (dp.LayerSpec(bits=bits), sensitivity, None),
            (dp.LayerSpec(bits=bits), None, calibration),
        ]:
            clone = copy.deepcopy(model)
            start = time.perf_counter()
            policy = dp.Policy(default=spec, small_layer_bits=None)
            compressed = dp.palettize(clone, policy, sensitivity=sens, calibration=calibrated)
            elapsed = time.perf_counter() - start
            row.append((accuracy(clone, test_x, test_y), compressed.summary().ratio, elapsed))
        print(
            f"| {bits} | {row[0][0]:.2f}% | {row[1][0]:.2f}% | {row[2][0]:.2f}% | {row[3][0]:.2f}% | "
            f"{row[0][1]:.1f}x | {row[0][2] * 1000:.0f} ms | {row[3][2] * 1000:.0f} ms |"
        )
    print(f"\nfloat: {base:.2f}%")


if __name__ == "__main__":
    main()
