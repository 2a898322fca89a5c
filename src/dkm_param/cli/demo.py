"""The demo: a small CNN on scikit-learn's 8x8 digits, compressed with DKM and with palettize.

Trains the float model, then compresses a copy of it twice with the same
policy: DKM fine-tuning (a few epochs of an ordinary training loop, then
``finalize``) and post-training palettization (no training). Each
compressed model is saved, loaded back into a fresh network and tested.
By default every weight is stored in vectors of 4, each a 2-bit index
(``cv:2/4, fc:2/4``, half a bit a weight): there post-training k-means
loses most of the accuracy and DKM, training the network into its
codebooks, keeps nearly all of it.
Needs the ``demo`` extra (scikit-learn for the data, matplotlib for the plot).
"""

from __future__ import annotations

import copy
import importlib.util
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from ..dkm.finalize import finalize
from ..dkm.register import register_dkm
from ..extras import install_hint
from ..format import CompressedModel, load_compressed
from ..policy import Policy
from ..posttrain.palettize import palettize
from ..progress import track
from ..spec import LayerSpec
from ..tables import render_table

# Vectors need a lower temperature than LayerSpec's default (tau_rel=2.0): at 2/4 on this network the
# default passes the temperature at which every centroid settles onto the weights' mean, and
# register_dkm lowers it (with a warning) to 0.4 of that; the demo chooses its own, a little lower.
_TAU_REL = 0.3


@dataclass(frozen=True)
class DemoRow:
    """One model of the demo: its held-out accuracy, size and training time."""

    model: str
    accuracy: float  # percent, on the held-out test images
    bytes: int
    ratio: float
    seconds: float


@dataclass
class DemoResult:
    """What ``run_demo`` measured and wrote; ``str()`` is the table it prints."""

    rows: list[DemoRow]
    files: dict[str, Path]  # what -> path: "dkm", "palettized", "plot"
    train_images: int
    test_images: int
    compressed: dict[str, CompressedModel] = field(repr=False, default_factory=dict)

    def __str__(self) -> str:
        rows = [
            (r.model, f"{r.accuracy:.2f}%", _size(r.bytes), f"{r.ratio:.2f}x", f"{r.seconds:.1f} s") for r in self.rows
        ]
        return render_table(("model", "test accuracy", "size", "compression", "time"), rows, right={1, 2, 3, 4})


def run_demo(
    out: str | os.PathLike = "dkm-demo",
    *,
    epochs: int = 15,
    dkm_epochs: int = 4,
    bits: int = 2,
    dim: int = 4,
    seed: int = 0,
    train_limit: int | None = None,
    threads: int | None = 1,
    plot: bool | None = None,
    log: Callable[[str], None] | None = print,
) -> DemoResult:
    """Train, compress two ways, save and test; returns the measurements.

    out: directory for ``dkm.safetensors``, ``palettized.safetensors`` and
        ``overview.png`` (created if missing).
    epochs: float training epochs; dkm_epochs: DKM fine-tuning epochs.
    bits, dim: every conv and linear layer (small ones included) is stored in
        vectors of ``dim`` weights, each a ``bits``-bit index into its layer's
        codebook of ``2**bits`` vectors: ``bits / dim`` bits a weight (default
        2/4: half a bit).
    train_limit: train on only this many images (for quick checks).
    threads: torch threads while the demo runs (restored after); the network
        is so small that one thread is usually fastest. None keeps torch's.
    plot: write ``overview.png``; None (default) does when matplotlib is installed.
    log: called with each progress line; None prints nothing.
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(Path(out), epochs, dkm_epochs, bits, dim, seed, train_limit, plot, log)
    finally:
        torch.set_num_threads(previous)


def _run(
    out: Path,
    epochs: int,
    dkm_epochs: int,
    bits: int,
    dim: int,
    seed: int,
    train_limit: int | None,
    plot: bool | None,
    log,
) -> DemoResult:
    say = log or (lambda line: None)
    show_bars = None if log is not None else False
    notation = f"cv:{bits}/{dim}, fc:{bits}/{dim}"
    # a bad `bits` or `dim` fails here, before training (a `dim` that divides no weight fails at registration)
    policy = Policy.from_notation(notation, LayerSpec(tau_rel=_TAU_REL), small_layer_bits=None)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    train_x, train_y, test_x, test_y = load_digits_split(seed)
    if train_limit is not None:
        train_x, train_y = train_x[:train_limit], train_y[:train_limit]
    say(f"digits: {len(train_x)} training / {len(test_x)} held-out test images (8x8, scikit-learn)")

    model = small_cnn()
    start = time.perf_counter()
    fit(model, train_x, train_y, epochs, lr=2e-3, desc="float training", enabled=show_bars)
    float_seconds = time.perf_counter() - start
    float_accuracy = accuracy(model, test_x, test_y)
    say(f"float model: {_epochs(epochs)} with Adam, {float_accuracy:.2f}% test accuracy ({float_seconds:.1f} s)")
    say(f"policy {notation}: {_rate(bits, dim)}")

    # (a) DKM: register, the same training loop, finalize
    tuned = copy.deepcopy(model)
    start = time.perf_counter()
    register_dkm(tuned, policy)
    fit(tuned, train_x, train_y, dkm_epochs, lr=2e-3, desc=f"DKM fine-tuning, {bits}/{dim}", enabled=show_bars)
    tuned.eval()
    dkm_model = finalize(tuned)
    dkm_seconds = time.perf_counter() - start
    say(f"DKM: {_epochs(dkm_epochs)} of fine-tuning at {bits}/{dim} ({dkm_seconds:.1f} s)")

    # (b) post-training palettization of the same float model
    start = time.perf_counter()
    palettized = palettize(copy.deepcopy(model), policy)
    palettize_seconds = time.perf_counter() - start
    say(f"palettize: k-means at {bits}/{dim}, no training ({palettize_seconds:.1f} s)")

    files = {
        "dkm": dkm_model.save(out / "dkm.safetensors"),
        "palettized": palettized.save(out / "palettized.safetensors"),
    }
    # accuracy of what the files hold, loaded into fresh networks
    dkm_accuracy = accuracy(load_compressed(files["dkm"], small_cnn()), test_x, test_y)
    palettized_accuracy = accuracy(load_compressed(files["palettized"], small_cnn()), test_x, test_y)

    summary = dkm_model.summary()
    rows = [
        DemoRow("float32", float_accuracy, summary.bytes_before, 1.0, float_seconds),
        DemoRow(
            f"DKM, {bits}/{dim} ({_epochs(dkm_epochs)})", dkm_accuracy, summary.bytes_after, summary.ratio, dkm_seconds
        ),
        DemoRow(
            f"palettize, {bits}/{dim} (no training)",
            palettized_accuracy,
            palettized.summary().bytes_after,
            palettized.summary().ratio,
            palettize_seconds,
        ),
    ]
    compressed = {"DKM": dkm_model, "palettize": palettized}
    if plot is None:
        plot = importlib.util.find_spec("matplotlib") is not None
        if not plot:
            say(f"no plot: matplotlib is not installed ({install_hint('plots')})")
    if plot:
        from .plots import _save

        files["plot"] = _save(overview(rows, compressed, weights=model), out / "overview.png")
    return DemoResult(rows=rows, files=files, train_images=len(train_x), test_images=len(test_x), compressed=compressed)


def overview(rows: list[DemoRow], compressed: dict[str, CompressedModel], weights: nn.Module | None = None):
    """The demo's figure: the models' test accuracies, the largest layer's centroids, the sizes.

    Left, a labelled bar per row; middle, the largest layer's weights with
    both methods' centroids; right, each layer's size before and after.
    weights: the float model, whose weights are drawn under the centroids (default: the decoded ones).
    Returns a matplotlib Figure.
    """
    from .plots import _draw_layer, _draw_sizes, _figure, _size_rows

    sizes = _size_rows(next(iter(compressed.values())))
    figure = _figure(figsize=(18, 5))
    grid = figure.add_gridspec(1, 3, width_ratios=(1, 1.4, 1))
    _draw_accuracy(figure.add_subplot(grid[0]), rows)
    _draw_layer(figure.add_subplot(grid[1]), compressed, None, weights, bins=80)
    size_axes = figure.add_subplot(grid[2])
    _draw_sizes(size_axes, sizes)
    size_axes.set_yticks(range(len(sizes)), [_layer_label(row[0]) for row in sizes], fontsize="small")
    size_axes.invert_yaxis()  # first layer on top
    return figure


def _draw_accuracy(axes, rows: list[DemoRow]) -> None:
    colors = ("0.6", "tab:red", "tab:blue")  # the float model, then the centroids' colors of the layer plot
    names = [row.model.replace(" (", "\n(", 1) for row in rows]
    bars = axes.bar(range(len(rows)), [row.accuracy for row in rows], color=colors[: len(rows)])
    axes.bar_label(
        bars,
        [f"{row.accuracy:.2f}%\n{row.ratio:.1f}x smaller" if row.ratio > 1 else f"{row.accuracy:.2f}%" for row in rows],
        padding=3,
        fontsize="small",
    )
    axes.axhline(10, color="0.3", linestyle=":", linewidth=1)
    axes.set_xticks(range(len(rows)), names, fontsize="small")
    axes.set_ylim(0, 115)  # room for the labels above 100%
    axes.set_yticks(range(0, 101, 20))
    axes.set_ylabel("held-out test accuracy (%)")
    axes.set_title("test accuracy (dotted: chance, 10%)")


def load_digits_split(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's 1,797 digits as (train_x, train_y, test_x, test_y), 25% held out, stratified.

    Images are (N, 1, 8, 8) floats in [0, 1].
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise ModuleNotFoundError(f"the demo needs scikit-learn; install it with {install_hint('demo')}") from None
    digits = load_digits()  # shipped with scikit-learn: nothing is downloaded
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    labels = torch.tensor(digits.target)
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=0.25, random_state=seed, stratify=labels
    )
    return train_x, train_y, test_x, test_y


def small_cnn() -> nn.Sequential:
    """Three conv layers and two linear ones for 8x8 images, about 90,000 weights."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 2 * 2, 128), nn.ReLU(), nn.Linear(128, 10),
    )  # fmt: skip


def fit(
    model: nn.Module, x: Tensor, y: Tensor, epochs: int, lr: float, desc: str = "", enabled: bool | None = None
) -> None:
    """An ordinary training loop: Adam, cross entropy, shuffled batches of 64."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in track(range(epochs), total=epochs, desc=desc, enabled=enabled):
        for batch in torch.randperm(len(x)).split(64):
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Percent of ``x`` the model classifies as ``y``."""
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item() * 100


def _rate(bits: int, dim: int) -> str:
    """What ``bits/dim`` means, in words."""
    per_weight = f"{bits / dim:.3g} bit" + ("" if bits == dim else "s")
    if dim == 1:
        return f"each weight a {bits}-bit index into 2^{bits} centroids ({per_weight} a weight)"
    return f"each vector of {dim} weights a {bits}-bit index into 2^{bits} centroids ({per_weight} a weight)"


def _layer_label(name: str) -> str:
    return f"layer {name}" if name[:1].isdigit() else name  # nn.Sequential's layers are numbers


def _epochs(n: int) -> str:
    return f"{n} epoch" if n == 1 else f"{n} epochs"


def _size(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n} B"
