"""Thinning: keep one filter per cluster and sum each cluster's input channels in its consumers.

The thinner model computes the same function; ``count_macs`` and
``count_params`` measure what it saves.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from ..errors import SurgeryError
from ..tables import render_table
from .routes import Route, producers, routes


def count_params(model: nn.Module) -> int:
    """Number of parameter values (shared parameters count once)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, example_input: Tensor | tuple) -> int:
    """Multiply-accumulates of the conv and linear modules for one forward of ``example_input``.

    Runs in eval mode without gradients (batch norm statistics are not
    touched) and restores each module's mode. Counts the whole batch.
    """
    total = 0

    def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Linear):
            total += output.numel() * module.in_features
        elif module.transposed:
            total += inputs[0].numel() * (module.out_channels // module.groups) * math.prod(module.kernel_size)
        else:
            total += output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)

    handles = [m.register_forward_hook(hook) for _, m in producers(model)]
    try:
        _run(model, example_input)
    finally:
        for handle in handles:
            handle.remove()
    return total


def _run(model: nn.Module, example_input: Tensor | tuple) -> Any:
    """One forward in eval mode without gradients, restoring every module's mode."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            return model(*example_input) if isinstance(example_input, tuple) else model(example_input)
    finally:
        for module, training in modes.items():
            module.training = training


# -- thinning ---------------------------------------------------------------


@dataclass(frozen=True)
class ThinReport:
    """What ``thin`` changed; ``str()`` is a table.

    layers: (name, channels before, channels after, consumers folded).
    macs_*: multiply-accumulates for the example input (None without one).
    max_diff: max |thin(x) - model(x)| on the example input, eval mode.
    """

    layers: tuple[tuple[str, int, int, tuple[str, ...]], ...]
    params_before: int
    params_after: int
    macs_before: int | None = None
    macs_after: int | None = None
    max_diff: float | None = None

    @property
    def param_ratio(self) -> float:
        """Parameters after / before."""
        return self.params_after / self.params_before

    @property
    def mac_ratio(self) -> float | None:
        """Multiply-accumulates after / before, or None without an example input."""
        if self.macs_before is None or self.macs_after is None:
            return None
        return self.macs_after / self.macs_before

    def __str__(self) -> str:
        rows = [(n, str(a), str(b), ", ".join(c)) for n, a, b, c in self.layers]
        footer = [f"params: {self.params_before:,} -> {self.params_after:,} ({self.param_ratio:.3f}x)"]
        if self.mac_ratio is not None:
            footer.append(f"MACs: {self.macs_before:,} -> {self.macs_after:,} ({self.mac_ratio:.3f}x)")
        if self.max_diff is not None:
            footer.append(f"max |thin - original| on the example input: {self.max_diff:.3g}")
        return render_table(("layer", "channels", "thin", "consumers folded"), rows, footer=footer, notes=True)


def thin(
    model: nn.Module, plan: Iterable, example_input: Tensor | tuple | None = None, tol: float = 1e-4
) -> tuple[nn.Module, ThinReport]:
    """A thinner copy of ``model``: one filter per cluster, consumers' input channels summed.

    plan: rows with ``name`` and ``labels`` (a ``FilterPlan`` from
        ``dkm_param.cluster_filters``); rows without labels are skipped.
    example_input: when given, the report counts MACs and the output difference.
    tol: filters, biases, batch-norm parameters and statistics within one
        cluster may differ by at most ``tol`` times the largest magnitude of
        that tensor; each cluster becomes its mean. A bias read only by a
        batch norm first folds into its running mean (the same function:
        the norm subtracts it again), so there only bias minus mean counts.

    The user's model is not changed. Raises SurgeryError for a layer whose
    channels cannot be removed, a plan that does not fit the model, or
    clusters whose members differ beyond ``tol``.
    """
    if not (isinstance(tol, (int, float)) and tol >= 0):
        raise SurgeryError(f"tol must be a number >= 0, got {tol!r}")
    rows = [row for row in plan if getattr(row, "labels", None) is not None]
    found = routes(model)
    for row in rows:
        route = found.get(row.name)
        if route is None:
            raise SurgeryError(
                f"layer '{row.name}' in the plan is not a conv or linear module of {type(model).__name__}; "
                f"was the plan made for another model?"
            )
        if route.reason:
            raise SurgeryError(
                f"layer '{row.name}': cannot remove its output channels: {route.reason}; leave it out of the plan"
            )
        if len(row.labels) != route.channels:
            raise SurgeryError(
                f"layer '{row.name}' has {route.channels} output channels but the plan clusters {len(row.labels)}; "
                "was the model already thinned, or the plan made for another model?"
            )
    thinner = copy.deepcopy(model)
    layers = []
    with torch.no_grad():
        for row in rows:
            route = found[row.name]
            labels = torch.as_tensor(row.labels, dtype=torch.long)
            k = int(labels.max()) + 1
            _thin_producer(thinner, row.name, route, labels, k, tol)
            for consumer in route.consumers:
                _fold_consumer(thinner.get_submodule(consumer.name), labels, k, consumer.per_channel)
            layers.append((row.name, route.channels, k, tuple(c.name for c in route.consumers)))
    macs_before = macs_after = max_diff = None
    if example_input is not None:
        macs_before, macs_after = count_macs(model, example_input), count_macs(thinner, example_input)
        before, after = _run(model, example_input), _run(thinner, example_input)
        if isinstance(before, Tensor) and isinstance(after, Tensor):
            max_diff = (before - after).abs().max().item() if before.numel() else 0.0
    report = ThinReport(tuple(layers), count_params(model), count_params(thinner), macs_before, macs_after, max_diff)
    return thinner, report


def _thin_producer(model: nn.Module, name: str, route: Route, labels: Tensor, k: int, tol: float) -> None:
    module = model.get_submodule(name)
    if route.bias_norm and module.bias is not None:
        # The norm removes any per-channel constant: only bias - running_mean reaches its output.
        model.get_submodule(route.bias_norm).running_mean -= module.bias
        module.bias.zero_()
    _set_param(module, "weight", merge(module.weight, labels, k, tol, f"layer '{name}': filters"))
    if module.bias is not None:
        _set_param(module, "bias", merge(module.bias, labels, k, tol, f"layer '{name}': biases"))
    if isinstance(module, nn.Linear):
        module.out_features = k
    else:
        module.out_channels = k
    for norm_name in route.norms:
        norm = model.get_submodule(norm_name)
        where = f"layer '{name}': batch norm '{norm_name}'"
        for key in ("weight", "bias"):
            if getattr(norm, key) is not None:
                _set_param(norm, key, merge(getattr(norm, key), labels, k, tol, f"{where} {key}"))
        for key in ("running_mean", "running_var"):
            if getattr(norm, key) is not None:
                setattr(norm, key, merge(getattr(norm, key), labels, k, tol, f"{where} {key}"))
        norm.num_features = k


def _fold_consumer(module: nn.Module, labels: Tensor, k: int, per_channel: int) -> None:
    """Sum the input channels (or their h*w features after a flatten) of each cluster."""
    weight = module.weight
    labels = labels.to(weight.device)
    if isinstance(module, nn.Linear):
        out = weight.shape[0]
        blocks = weight.reshape(out, -1, per_channel)  # (out, channels, h*w)
        folded = torch.zeros(out, k, per_channel, dtype=weight.dtype, device=weight.device).index_add_(
            1, labels, blocks
        )
        _set_param(module, "weight", folded.reshape(out, k * per_channel))
        module.in_features = k * per_channel
    else:
        shape = (weight.shape[0], k, *weight.shape[2:])
        _set_param(
            module, "weight", torch.zeros(shape, dtype=weight.dtype, device=weight.device).index_add_(1, labels, weight)
        )
        module.in_channels = k


def merge(tensor: Tensor, labels: Tensor, k: int, tol: float | None = None, what: str = "tensor") -> Tensor:
    """The mean of each cluster along the first axis.  # (k, ...)

    tol: when given, raise SurgeryError if a member differs from its
    cluster's mean by more than ``tol`` times the tensor's largest magnitude.
    """
    labels = labels.to(tensor.device)
    flat = tensor.detach().reshape(tensor.shape[0], -1)
    counts = torch.bincount(labels, minlength=k).to(flat.dtype)[:, None]
    means = torch.zeros(k, flat.shape[1], dtype=flat.dtype, device=flat.device).index_add_(0, labels, flat) / counts
    if tol is not None and flat.numel():
        deviation = (flat - means[labels]).abs().max().item()
        scale = flat.abs().max().item()
        if deviation > tol * scale + torch.finfo(flat.dtype).tiny:
            raise SurgeryError(
                f"{what} within one cluster differ by up to {deviation:.3g} ({deviation / scale:.2g} of the largest "
                f"magnitude {scale:.3g}, tol={tol:g}); train with the centripetal transform longer or with a larger "
                "strength, call dkm_param.collapse_(model, plan) to set each cluster to its mean, or raise tol"
            )
    return means.reshape(k, *tensor.shape[1:])


def _set_param(module: nn.Module, key: str, value: Tensor) -> None:
    old = getattr(module, key)
    setattr(module, key, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))
