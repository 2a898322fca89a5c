"""C-SGD then surgery: accuracy, parameters, MACs and CPU time of the thinner network.

Two experiments, printed as markdown tables:
  digits: a VGG-style CNN on scikit-learn's 8x8 handwritten digits (upscaled
          to 16x16, 20% held out), trained in float, then C-SGD to 5/8 of the
          channels, then surgery;
  resnet18: torchvision ResNet18 (random init, random batch-norm statistics),
          the inner block convolutions clustered to 5/8 and forced equal,
          then surgery.

    python benchmarks/bench_csgd.py [--epochs 15] [--csgd-epochs 30] [--strength 3] [--threads 1]
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
import torchvision
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from dkm_param.filters.csgd import CentripetalSGD, CSGDSpec, cluster_filters, collapse_
from dkm_param.filters.thinning import count_macs, count_params, thin


def digits(side=16, seed=0):
    """Train and test tensors: images (n, 1, side, side) scaled to [0, 1], labels (n,)."""
    data = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        data.images, data.target, test_size=0.2, stratify=data.target, random_state=seed
    )

    def prep(x):
        images = torch.tensor(x, dtype=torch.float32)[:, None] / 16
        return F.interpolate(images, size=side, mode="bilinear", align_corners=False)

    return prep(x_train), torch.tensor(y_train), prep(x_test), torch.tensor(y_test)


def vgg(widths=(32, 32, 64, 64), side=16, classes=10):
    layers, c_in = [], 1
    for i, width in enumerate(widths):
        layers += [nn.Conv2d(c_in, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        if i % 2 == 1:
            layers.append(nn.MaxPool2d(2))
            side //= 2
        c_in = width
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c_in * side * side, classes))


def train(model, optimizer, x, y, epochs, batch=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch):
            optimizer.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()


@torch.no_grad()
def accuracy(model, x, y):
    model.eval()
    return 100.0 * (model(x).argmax(1) == y).float().mean().item()


@torch.no_grad()
def time_ratio(original, thinner, x, repeats=21):
    """Median seconds of one forward of each, measured interleaved in the same loop, and thin/original."""
    original.eval(), thinner.eval()
    for _ in range(3):
        original(x), thinner(x)
    times = {"original": [], "thin": []}
    for _ in range(repeats):
        for key, model in (("original", original), ("thin", thinner)):
            start = time.perf_counter()
            model(x)
            times[key].append(time.perf_counter() - start)
    a, b = statistics.median(times["original"]), statistics.median(times["thin"])
    return a, b, b / a


def run_digits(args):
    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = digits()
    model = vgg()
    start = time.perf_counter()
    train(model, torch.optim.Adam(model.parameters(), lr=1e-3), x_train, y_train, args.epochs)
    acc_float = accuracy(model, x_test, y_test)
    float_model = {k: v.clone() for k, v in model.state_dict().items()}

    spec = CSGDSpec(ratio=5 / 8, strength=args.strength, weight_decay=1e-4)
    plan = cluster_filters(model, spec)
    print(plan, end="\n\n")
    transform = CentripetalSGD(model, plan)
    spread_before = max(transform.spread().values())
    optimizer = torch.optim.SGD(transform.param_groups(weight_decay=1e-4), lr=args.lr, momentum=0.9)
    transform.register(optimizer)
    train(model, optimizer, x_train, y_train, args.csgd_epochs, seed=1)
    spread_after = max(transform.spread().values())
    acc_csgd = accuracy(model, x_test, y_test)
    train_seconds = time.perf_counter() - start

    one = x_test[:1]
    thinner, report = thin(model, plan, one)
    acc_thin = accuracy(thinner, x_test, y_test)
    t_orig, t_thin, ratio = time_ratio(model, thinner, x_test)
    logits_diff = (model(x_test) - thinner(x_test)).abs().max().item()
    original = vgg()
    original.load_state_dict(float_model)

    print(f"digits: {len(x_train)} train / {len(x_test)} test images, 16x16; float {args.epochs} epochs (Adam), "
          f"C-SGD {args.csgd_epochs} epochs (SGD lr {args.lr}, momentum 0.9, strength {args.strength}); "
          f"training {train_seconds:.0f} s on {torch.get_num_threads()} thread(s)")
    print(
        f"largest filter spread within a cluster (relative): {spread_before:.3g} before C-SGD, "
        f"{spread_after:.3g} after; "
        f"max |logit difference| thin vs C-SGD model on the test set: {logits_diff:.3g}\n"
    )
    print("| model | test accuracy % | channels | params | MACs / image | CPU time, 360 images |")
    print("| --- | --- | --- | --- | --- | --- |")
    channels = "/".join(str(m.out_channels) for m in model if isinstance(m, nn.Conv2d))
    thin_channels = "/".join(str(m.out_channels) for m in thinner if isinstance(m, nn.Conv2d))
    print(f"| float | {acc_float:.2f} | {channels} | {count_params(original):,} | {count_macs(original, one):,} | |")
    print(
        f"| after C-SGD | {acc_csgd:.2f} | {channels} | {report.params_before:,} | {report.macs_before:,} | "
        f"{1e3 * t_orig:.2f} ms |"
    )
    print(
        f"| after surgery | {acc_thin:.2f} | {thin_channels} | {report.params_after:,} | "
        f"{report.macs_after:,} | {1e3 * t_thin:.2f} ms |"
    )
    print(
        f"\nthin / original: params {report.param_ratio:.3f}, MACs {report.mac_ratio:.3f}, "
        f"CPU time {ratio:.3f} (median of 21 interleaved runs); accuracy change at surgery "
        f"{acc_thin - acc_csgd:+.2f} points\n"
    )
    return acc_csgd, acc_thin


def run_resnet18(args):
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
    model.eval()
    start = time.perf_counter()
    plan = cluster_filters(model, CSGDSpec(ratio=5 / 8))
    cluster_seconds = time.perf_counter() - start
    collapse_(model, plan)
    x = torch.randn(2, 3, 224, 224, generator=gen)
    thinner, report = thin(model, plan, x[:1])
    with torch.no_grad():
        y, y_thin = model(x), thinner(x)
    diff = (y - y_thin).abs().max().item()
    t_orig, t_thin, ratio = time_ratio(model, thinner, x, repeats=5)
    print(f"resnet18: {len(plan.clustered())} inner convolutions clustered to 5/8 in {cluster_seconds:.1f} s, "
          f"{len(plan.skipped())} layers skipped (residual sums, the classifier)\n")
    print("| model | params | MACs (1x3x224x224) | max abs output diff (2 images) | CPU time, 2 images |")
    print("| --- | --- | --- | --- | --- |")
    print(
        f"| ResNet18, clusters forced equal | {report.params_before:,} | {report.macs_before:,} | | "
        f"{1e3 * t_orig:.0f} ms |"
    )
    print(
        f"| after surgery | {report.params_after:,} | {report.macs_after:,} | {diff:.2g} (outputs up to "
        f"{y.abs().max().item():.2g}) | {1e3 * t_thin:.0f} ms |"
    )
    print(
        f"\nthin / original: params {report.param_ratio:.3f}, MACs {report.mac_ratio:.3f}, CPU time "
        f"{ratio:.3f} (median of 5 interleaved runs)"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15, help="float training epochs (Adam)")
    parser.add_argument("--csgd-epochs", type=int, default=30, help="C-SGD training epochs (SGD with momentum)")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument(
        "--strength",
        type=float,
        default=3.0,
        help="centripetal strength (the paper's 3e-3 is for ImageNet-length runs)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-resnet", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run_digits(args)
    if not args.skip_resnet:
        run_resnet18(args)


if __name__ == "__main__":
    main()
