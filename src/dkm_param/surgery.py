"""Surgery: which layers can lose output channels (torch.fx), and the thinner model.

``routes(model)`` follows each conv (and linear) layer's output through the
traced graph to the layers that consume it; ``thin(model, plan)`` keeps one
filter per cluster in the producer and sums each cluster's input channels in
its consumers, so the thinner model computes the same function.
"""

from __future__ import annotations

import copy
import math
import operator
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.nn.utils import parametrize

from .errors import SurgeryError


# Modules and functions that act on every element (or every channel) alone:
# channels that hold equal values stay equal through them.
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)
_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_ELEMENTWISE_FUNCTIONS = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu,
    F.gelu, F.silu, F.mish, F.sigmoid, torch.sigmoid, F.tanh, torch.tanh, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.softplus, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    torch.clamp, operator.mul, operator.add, operator.sub, operator.truediv, operator.neg,
    torch.mul, torch.add, torch.sub, torch.div, torch.neg,
}
_ELEMENTWISE_METHODS = {
    "relu", "relu_", "sigmoid", "tanh", "clamp", "clamp_", "contiguous", "float", "mul", "add",
    "sub", "div", "neg", "mul_", "add_", "sub_", "div_",
}
_POOL_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
}
_JOIN_NAMES = {
    operator.add: "a residual sum (add)", torch.add: "a residual sum (add)",
    operator.sub: "a difference (sub)", operator.mul: "a product with another tensor (mul)",
    torch.cat: "a concatenation (cat)", torch.concat: "a concatenation (cat)", torch.stack: "a stack (stack)",
}


@dataclass(frozen=True)
class Consumer:
    """A layer that reads a producer's channels: its input is folded at surgery."""

    name: str
    per_channel: int  # input features per channel: 1 for a conv, h*w for a linear after flatten


@dataclass(frozen=True)
class Route:
    """Where one layer's output channels go, and whether surgery can remove some."""

    name: str
    channels: int
    norms: tuple[str, ...] = ()  # batch norms on the way, thinned with the producer
    consumers: tuple[Consumer, ...] = ()
    reason: str | None = None  # why the channels cannot be removed; None when they can
    bias_norm: str | None = None  # a batch norm that alone reads the layer's output: the bias folds into its mean

    @property
    def thinnable(self) -> bool:
        return self.reason is None


def producers(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """Every conv and linear module by name: the layers whose output channels could be clustered."""
    for name, module in model.named_modules():
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            yield name, module


def out_channels(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace``, with an error that says what to do when it fails."""
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, ...)
        raise SurgeryError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(exc).__name__}: {exc}); "
            "surgery needs a forward without data-dependent control flow: move such code into a "
            "submodule from torch.nn, or thin a traceable part of the model"
        ) from exc


def routes(model: nn.Module) -> dict[str, Route]:
    """For every conv and linear module, where its output channels go (by module name).

    Raises SurgeryError when the model cannot be traced with torch.fx.
    """
    graph = trace(model).graph
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    node_of = {node.target: node for node in graph.nodes if node.op == "call_module"}
    out = {}
    for name, module in producers(model):
        channels = out_channels(module)
        reason = _refusal(name, module, calls)
        if reason:
            out[name] = Route(name, channels, reason=reason)
            continue
        out[name] = _follow(model, node_of[name], module, channels, calls)
    return out


def _refusal(name: str, module: nn.Module, calls: Counter) -> str | None:
    """Why a producer cannot be thinned whatever it feeds, or None."""
    kind = type(module).__name__
    if getattr(module, "transposed", False):
        return f"{kind} is a transposed convolution (not supported)"
    if parametrize.is_parametrized(module):
        return "its weight is parametrized (DKM registered); finalize or remove it first"
    if getattr(module, "groups", 1) != 1:
        return f"{kind} has groups={module.groups}; removing output channels would change its groups"
    if calls[name] == 0:
        return "not called in forward (as traced by torch.fx)"
    if calls[name] > 1:
        return f"called {calls[name]} times in forward; its channels cannot differ per call"
    return None


def _follow(model: nn.Module, start: fx.Node, producer: nn.Module, channels: int, calls: Counter) -> Route:
    """Walk the graph from a producer through channel-wise ops to the layers that consume it."""
    name = start.target
    channels_last = isinstance(producer, nn.Linear)
    norms: list[str] = []
    consumers: list[Consumer] = []

    def refuse(reason: str) -> Route:
        return Route(name, channels, reason=reason)

    queue = deque([(start, False)])  # (node, flattened)
    seen = {start}
    while queue:
        node, flat = queue.popleft()
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            # Sizes read from tensors are ints, not data that mixes into the channels.
            others = [a for a in user.all_input_nodes if a is not node and not (a.op == "call_method" and a.target == "size")]
            if user.op == "output":
                return refuse("its output is the model's output")
            if user.op == "call_module":
                module = model.get_submodule(user.target)
                kind = f"{type(module).__name__} '{user.target}'"
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and not flat and not channels_last:
                    if calls[user.target] > 1:
                        return refuse(f"its batch norm {kind} is called {calls[user.target]} times")
                    if module.num_features != channels:
                        return refuse(f"its batch norm {kind} has {module.num_features} features, not {channels}")
                    norms.append(user.target)
                    queue.append((user, flat))
                elif isinstance(module, _ELEMENTWISE_MODULES) or (isinstance(module, nn.PReLU) and module.num_parameters == 1):
                    queue.append((user, flat))
                elif isinstance(module, _POOL_MODULES) and not flat and not channels_last:
                    if getattr(module, "return_indices", False):
                        return refuse(f"it feeds {kind} with return_indices=True (not supported)")
                    queue.append((user, flat))
                elif isinstance(module, nn.Flatten) and not flat and not channels_last:
                    if module.start_dim != 1 or module.end_dim != -1:
                        return refuse(f"it feeds {kind} with start_dim={module.start_dim}, end_dim={module.end_dim}; only flatten(1) is supported")
                    queue.append((user, True))
                elif isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
                    consumer = _consumer(user.target, module, channels, flat, channels_last, calls)
                    if isinstance(consumer, str):
                        return refuse(consumer)
                    consumers.append(consumer)
                else:
                    return refuse(f"it feeds {kind}, which surgery cannot rewrite")
                continue
            if user.op not in ("call_function", "call_method"):
                return refuse(f"it feeds a {user.op} node '{user.name}', which surgery cannot rewrite")
            target = user.target
            label = target if isinstance(target, str) else getattr(target, "__name__", str(target))
            if user.op == "call_method" and target == "size" and _size_of_batch(user):
                continue  # reading the batch size does not depend on the channels
            if others and target in _JOIN_NAMES:
                return refuse(f"it feeds {_JOIN_NAMES[target]} at node '{user.name}'")
            if target in (torch.cat, torch.concat, torch.stack):
                return refuse(f"it feeds {_JOIN_NAMES[target]} at node '{user.name}'")
            if others:
                return refuse(f"it feeds '{label}' at node '{user.name}' together with another tensor")
            if target in _ELEMENTWISE_FUNCTIONS or (user.op == "call_method" and target in _ELEMENTWISE_METHODS):
                queue.append((user, flat))
            elif target in _POOL_FUNCTIONS and not flat and not channels_last:
                if user.kwargs.get("return_indices"):
                    return refuse(f"it feeds '{label}' with return_indices=True (not supported)")
                queue.append((user, flat))
            elif _is_flatten(user) and not flat and not channels_last:
                queue.append((user, True))
            else:
                return refuse(f"it feeds '{label}' at node '{user.name}', which surgery cannot rewrite")
    if not consumers:
        return refuse("no conv or linear layer consumes its output")
    bias_norm = None
    if len(start.users) == 1 and norms and next(iter(start.users)).target == norms[0]:
        if model.get_submodule(norms[0]).running_mean is not None:
            bias_norm = norms[0]
    return Route(name, channels, tuple(norms), tuple(consumers), bias_norm=bias_norm)


def _consumer(name: str, module: nn.Module, channels: int, flat: bool, channels_last: bool, calls: Counter) -> Consumer | str:
    """The consumer, or why it cannot be folded."""
    kind = f"{type(module).__name__} '{name}'"
    if calls[name] > 1:
        return f"its consumer {kind} is called {calls[name]} times"
    if isinstance(module, nn.Linear):
        if not (flat or channels_last):
            return f"it feeds {kind} directly, which would mix its last axis rather than its channels; flatten first"
        if module.in_features % channels:
            return f"its consumer {kind} has {module.in_features} input features, not a multiple of {channels} channels"
        return Consumer(name, module.in_features // channels)
    if flat or channels_last:
        return f"it feeds {kind} after a flatten or from a linear layer (not supported)"
    if getattr(module, "transposed", False):
        return f"it feeds the transposed convolution {kind} (not supported)"
    if module.groups != 1:
        return f"it feeds {kind} with groups={module.groups} (grouped or depthwise); folding its input channels is not supported"
    if module.in_channels != channels:
        return f"its consumer {kind} has {module.in_channels} input channels, not {channels}"
    return Consumer(name, 1)


def _size_of_batch(node: fx.Node) -> bool:
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    return dim == 0


def _is_flatten(node: fx.Node) -> bool:
    """flatten(1) to the end, or view/reshape to (batch, -1)."""
    args, kwargs = node.args, node.kwargs
    if node.target in (torch.flatten, "flatten"):
        start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
        end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
        return start == 1 and end == -1
    if node.target in ("view", "reshape", torch.reshape):
        shape = args[1:] if len(args) > 2 else (args[1] if len(args) > 1 else kwargs.get("shape", ()))
        return isinstance(shape, (tuple, list)) and len(shape) == 2 and shape[1] == -1
    return False


# -- counting ---------------------------------------------------------------


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
        table = [("layer", "channels", "thin", "consumers folded")]
        table += [(n, str(a), str(b), ", ".join(c)) for n, a, b, c in self.layers]
        widths = [max(len(row[i]) for row in table) for i in range(3)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + "  " + row[3] for row in table]
        lines.insert(1, "-" * max(map(len, lines)))
        lines.append(f"params: {self.params_before:,} -> {self.params_after:,} ({self.param_ratio:.3f}x)")
        if self.mac_ratio is not None:
            lines.append(f"MACs: {self.macs_before:,} -> {self.macs_after:,} ({self.mac_ratio:.3f}x)")
        if self.max_diff is not None:
            lines.append(f"max |thin - original| on the example input: {self.max_diff:.3g}")
        return "\n".join(lines)


def thin(model: nn.Module, plan: Iterable, example_input: Tensor | tuple | None = None, tol: float = 1e-4) -> tuple[nn.Module, ThinReport]:
    """A thinner copy of ``model``: one filter per cluster, consumers' input channels summed.

    plan: rows with ``name`` and ``labels`` (a ``FilterPlan`` from
        ``dkm_param.csgd.cluster_filters``); rows without labels are skipped.
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
            raise SurgeryError(f"layer '{row.name}' in the plan is not a conv or linear module of {type(model).__name__}; was the plan made for another model?")
        if route.reason:
            raise SurgeryError(f"layer '{row.name}': cannot remove its output channels: {route.reason}; leave it out of the plan")
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
        folded = torch.zeros(out, k, per_channel, dtype=weight.dtype, device=weight.device).index_add_(1, labels, blocks)
        _set_param(module, "weight", folded.reshape(out, k * per_channel))
        module.in_features = k * per_channel
    else:
        shape = (weight.shape[0], k, *weight.shape[2:])
        _set_param(module, "weight", torch.zeros(shape, dtype=weight.dtype, device=weight.device).index_add_(1, labels, weight))
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
                "strength, call dkm_param.csgd.collapse_(model, plan) to set each cluster to its mean, or raise tol"
            )
    return means.reshape(k, *tensor.shape[1:])


def _set_param(module: nn.Module, key: str, value: Tensor) -> None:
    old = getattr(module, key)
    setattr(module, key, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))
