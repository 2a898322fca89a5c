"""The demo: a small CNN on scikit-learn's 8x8 digits, compressed with DKM and with palettize.

Trains the float model, then compresses a copy of it twice with the same
policy: DKM fine-tuning (a few epochs of an ordinary training loop, then
``finalize``) and post-training palettization (no training). Each
compressed model is saved, loaded back into a fresh network and tested.
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
from ..format import CompressedModel, load_compressed
from ..policy import Policy
from ..posttrain.palettize import palettize
from ..progress import track
from ..tables import render_table


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
    bits: bits per weight of every conv and linear layer (small ones included).
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
        return _run(Path(out), epochs, dkm_epochs, bits, seed, train_limit, plot, log)
    finally:
        torch.set_num_threads(previous)


def _run(
    out: Path, epochs: int, dkm_epochs: int, bits: int, seed: int, train_limit: int | None, plot: bool | None, log
) -> DemoResult:
    say = log or (lambda line: None)
    show_bars = None if log is not None else False
    policy = Policy.from_notation(
        f"cv:{bits}/1, fc:{bits}/1", small_layer_bits=None
    )  # a bad `bits` fails here, before training
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

    # (a) DKM: register, the same training loop at a lower learning rate, finalize
    tuned = copy.deepcopy(model)
    start = time.perf_counter()
    register_dkm(tuned, policy)
    fit(tuned, train_x, train_y, dkm_epochs, lr=5e-4, desc=f"DKM fine-tuning, {_bits(bits)}", enabled=show_bars)
    tuned.eval()
    dkm_model = finalize(tuned)
    dkm_seconds = time.perf_counter() - start
    say(f"DKM: {_epochs(dkm_epochs)} of fine-tuning at {_bits(bits)} ({dkm_seconds:.1f} s)")

    # (b) post-training palettization of the same float model
    start = time.perf_counter()
    palettized = palettize(copy.deepcopy(model), policy)
    palettize_seconds = time.perf_counter() - start
    say(f"palettize: k-means at {_bits(bits)}, no training ({palettize_seconds:.1f} s)")

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
            f"DKM, {_bits(bits)} ({_epochs(dkm_epochs)})", dkm_accuracy, summary.bytes_after, summary.ratio, dkm_seconds
        ),
        DemoRow(
            f"palettize, {_bits(bits)} (no training)",
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
            say("no plot: matplotlib is not installed (pip install 'dkm-param[plots]')")
    if plot:
        from .plots import plot_overview

        files["plot"] = plot_overview(compressed, out / "overview.png", weights=model)
    return DemoResult(rows=rows, files=files, train_images=len(train_x), test_images=len(test_x), compressed=compressed)


def load_digits_split(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's 1,797 digits as (train_x, train_y, test_x, test_y), 25% held out, stratified.

    Images are (N, 1, 8, 8) floats in [0, 1].
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise ModuleNotFoundError(
            "the demo needs scikit-learn; install it with pip install 'dkm-param[demo]'"
        ) from None
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


def _bits(n: int) -> str:
    return f"{n} bit" if n == 1 else f"{n} bits"


def _epochs(n: int) -> str:
    return f"{n} epoch" if n == 1 else f"{n} epochs"


def _size(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n} B"
