"""DKM inside an ordinary training loop, on scikit-learn's handwritten digits.

    python examples/dkm_training_loop.py [--bits 2] [--epochs 3] [--out digits.dkm.safetensors]
"""

import argparse

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import dkm_param as dp


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", default="digits.dkm.safetensors")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16
    y = torch.tensor(digits.target)
    train_x, test_x, train_y, test_y = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 2 * 2, 10),
    )

    def train(epochs, lr):
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        for _ in range(epochs):
            model.train()
            for batch in torch.randperm(len(train_x)).split(64):
                loss = nn.functional.cross_entropy(model(train_x[batch]), train_y[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()

    def accuracy():
        model.eval()
        with torch.no_grad():
            return (model(test_x).argmax(1) == test_y).float().mean().item() * 100

    train(args.epochs * 3, 3e-3)  # the float model
    print(f"float: {accuracy():.2f}%")
    plan = dp.register_dkm(model, dp.Policy.from_notation(f"cv:{args.bits}/1, fc:{args.bits}/1", small_layer_bits=None))
    print(plan)
    train(args.epochs, 1e-3)  # the same loop, now training weights and codebooks together
    # accuracy() sets eval mode, where module.weight is the snapped weight (each weight its nearest centroid),
    # what finalize keeps; in training mode it is the soft weight the loop trained
    print(f"DKM, snapped weights: {accuracy():.2f}%")
    compressed = dp.finalize(model)
    compressed.save(args.out)
    print(compressed.summary())
    print(f"finalized, {args.bits} bits: {accuracy():.2f}% -> {args.out}")


if __name__ == "__main__":
    main()
