"""PNG plots of a CompressedModel: a layer's weights and centroids, bits and size per layer.

Needs matplotlib (``pip install 'matplotlib>=3.7'``, or ``pip install -e ".[plots]"``
in a source checkout), imported only when a plot is drawn. Figures are drawn with matplotlib's object API and written
straight to a file: no pyplot state, no window, no change to the caller's
matplotlib backend.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Mapping, Union

import torch
from torch import Tensor, nn

from ..errors import DKMError
from ..extras import install_hint
from ..format import CompressedModel
from ..tables import format_size, printable

Models = Union[CompressedModel, Mapping[str, CompressedModel]]
Weights = Union[Tensor, Mapping[str, Tensor], nn.Module, None]

_DPI = 120
_MAX_LINES = 32  # centroids drawn as full-height lines; more become a rug
_MISSING = f"plots need matplotlib; install it with {install_hint('plots')}"


def plot_layer(
    models: Models,
    path: str | os.PathLike,
    name: str | None = None,
    weights: Weights = None,
    bins: int = 80,
) -> Path:
    """Histogram of one layer's weights with each model's centroids as vertical lines.

    models: a CompressedModel, or {label: CompressedModel} to compare where
        several methods put their centroids (the first one's layer is drawn).
    name: the layer (``features.3`` or ``features.3.weight``); default the
        largest clustered layer.
    weights: the float weights to histogram (the layer's tensor, a
        state_dict or the float model); default the decoded weights.
    Codebooks of vectors (dim > 1) and per-group codebooks are drawn as all
    their values. Raises DKMError for a layer the model does not hold.
    """
    figure = _figure(figsize=(8, 4.5))
    _draw_layer(figure.add_subplot(), _labelled(models), name, weights, bins)
    return _save(figure, path)


def plot_sizes(model: CompressedModel, path: str | os.PathLike) -> Path:
    """Bits per weight and size before/after, one bar per layer."""
    rows = _size_rows(model)
    figure = _figure(figsize=(10, _bars_height(len(rows))))
    bits_axes, size_axes = figure.subplots(1, 2, sharey=True)
    _draw_bits(bits_axes, rows)
    _draw_sizes(size_axes, rows)
    size_axes.tick_params(labelleft=False)
    return _save(figure, path)


def plot_overview(
    models: Models,
    path: str | os.PathLike,
    name: str | None = None,
    weights: Weights = None,
) -> Path:
    """One figure: ``plot_layer`` beside ``plot_sizes`` (sizes of the first model)."""
    labelled = _labelled(models)
    rows = _size_rows(next(iter(labelled.values())))
    figure = _figure(figsize=(16, max(4.5, _bars_height(len(rows)))))
    grid = figure.add_gridspec(1, 3, width_ratios=(1.4, 1, 1))
    _draw_layer(figure.add_subplot(grid[0]), labelled, name, weights, bins=80)
    bits_axes = figure.add_subplot(grid[1])
    size_axes = figure.add_subplot(grid[2], sharey=bits_axes)
    _draw_bits(bits_axes, rows)
    _draw_sizes(size_axes, rows)
    size_axes.tick_params(labelleft=False)
    return _save(figure, path)


# -- drawing -----------------------------------------------------------------


def _draw_layer(axes, models: dict[str, CompressedModel], name, weights, bins) -> None:
    first = next(iter(models.values()))
    key = _layer_key(first, name)
    layer = first.layers[key]
    given = _float_weight(weights, key)
    scaled = layer.scale is not None  # the codebook lives in the space of each channel divided by its scale
    if given is not None:
        values = given.detach().float().cpu()
        if tuple(values.shape) != tuple(layer.shape):
            raise DKMError(
                f"layer '{key}': the weights given have shape {tuple(values.shape)}, the layer {layer.shape}"
            )
        if scaled:
            values = values.reshape(layer.shape[0], -1) / layer.scale.float()[:, None]
        axes.hist(values.flatten().numpy(), bins=bins, color="0.7", label="float weights")
    else:
        # the weights take only the codebook's values: count how many use each, from the indices
        # (nothing is decoded: a file can declare far more weights than it holds bytes)
        used, counts = _weights_per_value(layer)
        axes.vlines(used.numpy(), 0, counts.numpy(), color="0.5", linewidth=1, label="weights per value")
        axes.set_ylim(bottom=0)
    styles = ("-", "--", ":", "-.")
    colors = ("tab:red", "tab:blue", "tab:green", "tab:purple")
    for i, (label, model) in enumerate(models.items()):
        if key not in model.layers:
            continue
        centroids = torch.unique(model.layers[key].codebook.detach().float().cpu().flatten()).numpy()
        legend = f"{label} centroids ({len(centroids)})".strip()
        color = colors[i % len(colors)]
        if given is not None and len(centroids) <= _MAX_LINES:
            for j, value in enumerate(centroids):
                axes.axvline(
                    value,
                    color=color,
                    linestyle=styles[i % len(styles)],
                    linewidth=1.2,
                    label=legend if j == 0 else None,
                )
        else:  # a rug along the axis: full-height lines would hide the counts or, by the hundred, the histogram
            axes.plot(centroids, [0.03 + 0.05 * i] * len(centroids), "|", color=color, markersize=10,
                      transform=axes.get_xaxis_transform(), label=legend)
    spec = layer.spec
    extra = []
    if layer.codebook.dim() == 3:
        extra.append(f"{layer.codebook.shape[0]} codebooks")
    if scaled:
        extra.append("channel scale")
    shape = "x".join(map(str, layer.shape))
    title = _short(key) if not key[:1].isdigit() else f"layer {_short(key)}"  # nn.Sequential names are numbers
    axes.set_title(f"{title} ({shape}): {spec.bits} bits, dim {spec.dim}" + "".join(f", {e}" for e in extra))
    axes.set_xlabel("weight / channel scale" if scaled else "weight value")
    axes.set_ylabel("count")
    axes.legend(loc="best", fontsize="small")


def _draw_bits(axes, rows) -> None:
    names = [r[0] for r in rows]
    bits = [r[1] for r in rows]  # None: stored as they are, no bits per weight to show
    positions = range(len(rows))
    axes.barh(positions, [b or 0 for b in bits], color="tab:blue")
    for y, value in zip(positions, bits):
        axes.text(
            value or 0,
            y,
            f" {value:.2f}" if value is not None else " stored as they are",
            va="center",
            fontsize="small",
        )
    axes.set_yticks(list(positions), names, fontsize="small")
    axes.invert_yaxis()  # first layer on top
    axes.set_xlim(0, max((b for b in bits if b is not None), default=1) * 1.3)
    axes.set_ylabel("layer")
    axes.set_xlabel("bits per weight (codebook included)")
    axes.set_title("bits per weight")


def _draw_sizes(axes, rows) -> None:
    positions = list(range(len(rows)))
    height = 0.4
    before = [r[2] / 1024 for r in rows]
    after = [r[3] / 1024 for r in rows]
    axes.barh([p - height / 2 for p in positions], before, height, color="0.7", label="before")
    axes.barh([p + height / 2 for p in positions], after, height, color="tab:orange", label="after")
    axes.set_xscale("log")
    axes.set_xlabel("KiB (log scale)")
    total_before, total_after = sum(r[2] for r in rows), sum(r[3] for r in rows)
    ratio = total_before / total_after if total_after else float("inf")
    axes.set_title(f"size per layer: {format_size(total_before)} -> {format_size(total_after)} ({ratio:.2f}x)")
    axes.legend(loc="lower right", fontsize="small")


# -- helpers -----------------------------------------------------------------


def _size_rows(model: CompressedModel) -> list[tuple[str, float | None, int, int]]:
    """(label, bits per weight, bytes before, bytes after) per layer, other tensors last."""
    summary = model.summary()
    rows = [(_row_label(r), r.bits_per_weight, r.bytes_before, r.bytes_after) for r in summary.rows]
    if summary.other_bytes:
        rows.append((f"other tensors ({summary.other_tensors})", None, summary.other_bytes, summary.other_bytes))
    return rows


def _weights_per_value(layer) -> tuple[Tensor, Tensor]:
    """The distinct codebook values of a layer and how many weights take each.  # (m,), (m,)"""
    k, d = layer.codebook.shape[-2:]
    books = layer.codebook.detach().float().cpu().reshape(-1, k, d)  # (groups, k, d)
    indices = layer.indices.long().cpu()
    group = torch.arange(indices.numel()) // max(1, indices.numel() // books.shape[0])
    per_entry = torch.bincount(group * k + indices, minlength=books.shape[0] * k)  # vectors per (group, entry)
    used, inverse = torch.unique(books.reshape(-1), return_inverse=True)
    counts = torch.zeros(used.numel(), dtype=torch.int64).index_add_(0, inverse, per_entry.repeat_interleave(d))
    return used[counts > 0], counts[counts > 0]


def _row_label(row) -> str:
    if row.bits is not None:
        return _short(row.name)
    if row.name.startswith("("):  # the summary's row for a group of skipped weights, e.g. "(20 weights)"
        return f"{row.name[1:-1]} not clustered"
    return f"{_short(row.name)} (not clustered)"


def _labelled(models: Models) -> dict[str, CompressedModel]:
    if isinstance(models, CompressedModel):
        return {"": models}
    labelled = dict(models)
    if not labelled:
        raise DKMError("no model to plot; pass a CompressedModel or {label: CompressedModel}")
    return labelled


def _layer_key(model: CompressedModel, name: str | None) -> str:
    if not model.layers:
        raise DKMError("the model has no clustered layer to plot")
    if name is None:
        return max(model.layers, key=lambda key: model.layers[key].numel)
    for key in (name, f"{name}.weight"):
        if key in model.layers:
            return key
    raise DKMError(
        f"no clustered layer {name!r}; the model's clustered layers are {', '.join(map(_short, model.layers))}"
    )


def _float_weight(weights: Weights, key: str) -> Tensor | None:
    if weights is None or isinstance(weights, Tensor):
        return weights
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    if key not in state:
        raise DKMError(f"the weights given hold no {key!r}; pass the float model, its state_dict or the layer's tensor")
    return state[key]


def _short(key: str) -> str:
    """A layer's name for a label: without ``.weight``, escaped, and ``$`` kept from starting math text."""
    key = key[: -len(".weight")] if key.endswith(".weight") else key
    return printable(key).replace("$", r"\$")


def _bars_height(count: int) -> float:
    return max(3.0, 1.2 + 0.32 * count)


def require_matplotlib() -> None:
    """Raise ModuleNotFoundError, with the command that installs it, when matplotlib is not installed.

    Looks without importing it, so that a command can check before its work.
    """
    if importlib.util.find_spec("matplotlib") is None:
        raise ModuleNotFoundError(_MISSING)


def _figure(figsize):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ModuleNotFoundError(_MISSING) from None
    return Figure(figsize=figsize, layout="constrained")


def _save(figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    figure.savefig(path, dpi=_DPI, format="png")
    return path
