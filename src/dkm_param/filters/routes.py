"""Routes: where each conv and linear layer's output channels go (torch.fx), and whether they can be removed.

``routes(model)`` follows each layer's output through the traced graph to
the layers that consume it; ``thinning.thin`` uses them.
"""

from __future__ import annotations

import operator
from collections import Counter, deque
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

from ..errors import SurgeryError

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
            others = [
                a for a in user.all_input_nodes if a is not node and not (a.op == "call_method" and a.target == "size")
            ]
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
                elif isinstance(module, _ELEMENTWISE_MODULES) or (
                    isinstance(module, nn.PReLU) and module.num_parameters == 1
                ):
                    queue.append((user, flat))
                elif isinstance(module, _POOL_MODULES) and not flat and not channels_last:
                    if getattr(module, "return_indices", False):
                        return refuse(f"it feeds {kind} with return_indices=True (not supported)")
                    queue.append((user, flat))
                elif isinstance(module, nn.Flatten) and not flat and not channels_last:
                    if module.start_dim != 1 or module.end_dim != -1:
                        return refuse(
                            f"it feeds {kind} with start_dim={module.start_dim}, end_dim={module.end_dim}; "
                            f"only flatten(1) is supported"
                        )
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


def _consumer(
    name: str, module: nn.Module, channels: int, flat: bool, channels_last: bool, calls: Counter
) -> Consumer | str:
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
        return (
            f"it feeds {kind} with groups={module.groups} (grouped or depthwise); "
            "folding its input channels is not supported"
        )
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
