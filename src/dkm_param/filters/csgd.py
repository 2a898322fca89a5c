"""C-SGD (centripetal SGD, Ding et al. 2019): cluster filters, then pull each cluster together.

``cluster_filters(model, spec)`` groups each selected layer's output filters
with k-means into the target number of channels and returns a plan;
``CentripetalSGD(model, plan)`` rewrites the gradients between
``backward()`` and ``optimizer.step()`` so that the filters of one cluster
converge to each other; ``dkm_param.thin`` then removes the copies.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..errors import SpecError
from ..ops.kmeans import init_codebook, nearest
from ..policy import check_names_match
from ..spec import CONFIG_VERSION, FLOAT32_MAX, MAX_SEED, config_from_dict, show_value
from ..tables import render_table
from .routes import out_channels, producers, routes
from .thinning import merge


@dataclass(frozen=True)
class CSGDSpec:
    """Which layers C-SGD thins, to how many channels, and how hard it pulls.

    ratio: fraction of the output channels each conv layer keeps (5/8 keeps
        20 of 32); None selects only the layers named in ``channels``.
    channels: per module name (exact) or regular expression (full match), a
        channel count (int), a ratio (float in (0, 1]) or None to skip. An
        exact name is an explicit request: a layer surgery cannot thin is an
        error. Entries apply to linear layers too.
    linear: let ``ratio`` select linear layers' output rows as well.
    strength: the centripetal strength ``s`` (the paper: 3e-3 for long
        ImageNet schedules; short runs need more).
    weight_decay: weight decay applied by the transform to the clustered
        parameters; leave the optimizer's weight_decay at 0 for them.
    norm_factor: the layer's bias and its batch norm's scale and shift get
        ``norm_factor * strength`` (the paper: 0.1).
    iterations: Lloyd iterations of the filter k-means.
    seed: seed of the k-means++ initialisation, so clusters are repeatable
        (at most ``2**63 - 1``, the largest seed torch's generator takes).
    strict: raise instead of skipping a layer that ``ratio`` or a pattern
        selected but surgery cannot thin.
    """

    ratio: float | None = 5 / 8
    channels: Mapping[str, int | float | None] = field(default_factory=dict)
    linear: bool = False
    strength: float = 3e-3
    weight_decay: float = 0.0
    norm_factor: float = 0.1
    iterations: int = 30
    seed: int = 0
    strict: bool = False

    def __post_init__(self):
        if self.ratio is not None and not (_is_real(self.ratio) and 0 < self.ratio <= 1):
            raise SpecError(
                f"ratio must be a number in (0, 1] or None, got {show_value(self.ratio)} "
                f"({type(self.ratio).__name__}); e.g. 5/8 keeps 20 of 32 channels, None thins only the layers "
                "named in channels"
            )
        if not isinstance(self.channels, Mapping):
            raise SpecError(
                f"channels must map layer names to a count, a ratio or None, got {type(self.channels).__name__}; "
                "write e.g. channels={'features.0': 24, r'features\\.\\d+': 0.5}"
            )
        for key, value in self.channels.items():
            if not isinstance(key, str):
                raise SpecError(
                    f"channels keys must be layer names or patterns (str), got {key!r} ({type(key).__name__}); "
                    "write the name as a string"
                )
            try:
                re.compile(key)
            except re.error as exc:
                raise SpecError(f"channels key {key!r} is not a valid regular expression: {exc}") from None
            if value is None:
                continue
            if isinstance(value, bool) or not _is_real(value):
                raise SpecError(
                    f"channels[{key!r}] must be an int count, a float ratio in (0, 1] or None, got {value!r} "
                    f"({type(value).__name__})"
                )
            if isinstance(value, int) and value < 1:
                raise SpecError(
                    f"channels[{key!r}] must be at least 1 channel, got {show_value(value)}; "
                    "give None to skip the layer"
                )
            if isinstance(value, float) and not 0 < value <= 1:
                raise SpecError(
                    f"channels[{key!r}] = {value} is a float, read as a ratio, and must be in (0, 1]; give an "
                    f"int for a channel count"
                )
        if self.ratio is None and not any(v is not None for v in self.channels.values()):
            raise SpecError("the spec selects no layer: give ratio= (e.g. 5/8) or channels={'layer name': count}")
        for name in ("strength", "weight_decay", "norm_factor"):
            value = getattr(self, name)
            # comparisons, not math.isfinite, which a huge int overflows; the gradients are often float32
            if not (_is_real(value) and 0 <= value <= FLOAT32_MAX):
                raise SpecError(
                    f"{name} must be a finite number >= 0 that float32 holds (at most {FLOAT32_MAX:.4g}), got "
                    f"{show_value(value)} ({type(value).__name__}); pass an int or a float in that range"
                )
        for name, low, high in (("iterations", 1, None), ("seed", 0, MAX_SEED)):
            value = getattr(self, name)
            if not _is_int(value) or value < low or (high is not None and value > high):
                span = f">= {low}" if high is None else f"in {low}..{high} (2**63 - 1, torch's largest seed)"
                raise SpecError(
                    f"{name} must be an int {span}, got {show_value(value)} ({type(value).__name__}); "
                    "pass a whole number in that range"
                )
        for name in ("linear", "strict"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise SpecError(
                    f"{name} must be True or False, got {value!r} ({type(value).__name__}); pass the bool itself"
                )

    def replace(self, **changes: Any) -> "CSGDSpec":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready) with the config ``version``; ``from_dict`` reads it back."""
        data = {"version": CONFIG_VERSION, **dataclasses.asdict(self)}
        data["channels"] = dict(self.channels)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CSGDSpec":
        """Build from ``to_dict`` output, rejecting unknown keys and other versions."""
        return config_from_dict(cls, data)

    def resolve(self, name: str, module: nn.Module) -> tuple[int | float | None, str, bool]:
        """(count or ratio or None, reason, explicit) for one conv or linear layer."""
        if name in self.channels:
            value = self.channels[name]
            return value, "named in channels" if value is not None else "named None in channels", True
        for pattern, value in self.channels.items():
            if re.fullmatch(pattern, name):
                return value, f"matches {pattern!r}" if value is not None else f"matches {pattern!r} (None)", False
        if self.ratio is None:
            return None, "not named in channels and ratio is None", False
        if isinstance(module, nn.Linear) and not self.linear:
            return None, "linear layers are thinned only with linear=True", False
        return float(self.ratio), f"ratio {self.ratio:.4g}", False


@dataclass(frozen=True)
class FilterRow:
    """One conv or linear layer of a plan: its filter clusters, or why it is skipped.

    labels: the cluster of each output filter, numbered in order of first
        appearance (so cluster j keeps the channel order); None when skipped.
    norms: batch norms between the layer and its consumers.
    """

    name: str
    module_type: str
    channels: int
    target: int | None
    labels: tuple[int, ...] | None
    reason: str
    norms: tuple[str, ...] = ()

    @property
    def clustered(self) -> bool:
        return self.labels is not None

    @property
    def clusters(self) -> tuple[tuple[int, ...], ...]:
        """The channels of each cluster."""
        if self.labels is None:
            return ()
        groups: list[list[int]] = [[] for _ in range(self.target)]
        for channel, label in enumerate(self.labels):
            groups[label].append(channel)
        return tuple(map(tuple, groups))


class FilterPlan(list):
    """The rows ``cluster_filters`` decided, in module order; prints as a table."""

    def __init__(self, rows=(), spec: CSGDSpec | None = None):
        super().__init__(rows)
        self.spec = spec if spec is not None else CSGDSpec()

    def clustered(self) -> list[FilterRow]:
        return [row for row in self if row.clustered]

    def skipped(self) -> list[FilterRow]:
        return [row for row in self if not row.clustered]

    def row(self, name: str) -> FilterRow:
        for r in self:
            if r.name == name:
                return r
        raise KeyError(name)

    def __str__(self) -> str:
        rows = [
            (
                r.name,
                r.module_type,
                str(r.channels),
                str(r.target) if r.clustered else "-",
                f"cluster: {r.reason}" if r.clustered else f"skip: {r.reason}",
            )
            for r in self
        ]
        footer = [f"{len(self.clustered())} clustered, {len(self.skipped())} skipped"]
        return render_table(("layer", "type", "channels", "after", "decision"), rows, footer=footer, notes=True)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready), so a plan can be saved between training and surgery."""
        rows = [dataclasses.asdict(r) for r in self]
        for r in rows:
            r["labels"] = list(r["labels"]) if r["labels"] is not None else None
            r["norms"] = list(r["norms"])
        return {"version": CONFIG_VERSION, "spec": self.spec.to_dict(), "rows": rows}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FilterPlan":
        """Build from ``to_dict`` output; raises SpecError for another version."""
        version = data.get("version", CONFIG_VERSION)
        if version != CONFIG_VERSION:
            raise SpecError(f"FilterPlan dict has version {version!r}; this dkm_param reads version {CONFIG_VERSION}")
        rows = []
        for r in data["rows"]:
            r = dict(r)
            r["labels"] = tuple(r["labels"]) if r.get("labels") is not None else None
            r["norms"] = tuple(r.get("norms", ()))
            rows.append(FilterRow(**r))
        return cls(rows, CSGDSpec.from_dict(data["spec"]))


# -- the maths on tensors ---------------------------------------------------


def cluster_rows(vectors: Tensor, k: int, seed: int = 0, iterations: int = 30) -> Tensor:
    """Assign each row of ``vectors`` (n, d) to one of ``k`` non-empty k-means clusters.  # (n,) int64

    Clusters are numbered in order of their first member, so the result
    depends only on the data and the seed.
    """
    n = vectors.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..{n} for {n} rows, got {k}")
    vectors = vectors.detach().reshape(n, -1).float()
    if vectors.shape[1] > n:
        # k-means sees only distances to points and to means of points, which any
        # isometry keeps: rows of R^T from X^T = QR sit n-dimensional at the same
        # distances, and clustering them costs n/d of clustering the filters.
        vectors = torch.linalg.qr(vectors.T, mode="r").R.T.contiguous()
    codebook = init_codebook(vectors, k, "kmeans++", seed, refine=iterations)
    labels = nearest(vectors, codebook)
    counts = torch.bincount(labels, minlength=k)
    for empty in (counts == 0).nonzero().flatten().tolist():
        # Split the largest cluster: its member farthest from the cluster's mean starts the empty one.
        largest = int(counts.argmax())
        members = (labels == largest).nonzero().flatten()
        spread = (vectors[members] - vectors[members].mean(0)).pow(2).sum(1)
        labels[members[spread.argmax()]] = empty
        counts[largest] -= 1
        counts[empty] = 1
    first = torch.full((k,), n, dtype=torch.long).scatter_reduce_(0, labels.cpu(), torch.arange(n), "amin")
    rank = torch.empty(k, dtype=torch.long)
    rank[torch.argsort(first)] = torch.arange(k)
    return rank.to(labels.device)[labels]


def centripetal_gradient(
    weight: Tensor, grad: Tensor, labels: Tensor, k: int, strength: float, weight_decay: float = 0.0
) -> Tensor:
    """``M g + Dec W`` for one parameter whose first axis holds the clustered channels.

    ``M g`` is each row's cluster mean of the gradient; ``Dec W`` is
    ``weight_decay * W + strength * (W - cluster mean of W)``, the paper's
    matrices without forming them.
    """
    rows = weight.shape[0]
    w = weight.detach().reshape(rows, -1)
    g = grad.reshape(rows, -1)
    counts = torch.bincount(labels, minlength=k).to(w.dtype)[:, None]
    g_mean = torch.zeros(k, g.shape[1], dtype=g.dtype, device=g.device).index_add_(0, labels, g) / counts
    w_mean = torch.zeros(k, w.shape[1], dtype=w.dtype, device=w.device).index_add_(0, labels, w) / counts
    out = g_mean[labels] + strength * (w - w_mean[labels])
    if weight_decay:
        out = out + weight_decay * w
    return out.reshape(grad.shape)


# -- the model level --------------------------------------------------------


def cluster_filters(model: nn.Module, spec: CSGDSpec | None = None) -> FilterPlan:
    """Cluster the output filters of every layer ``spec`` selects; the plan lists every conv and linear layer.

    Layers whose channels surgery cannot remove (outputs feeding a residual
    sum, a concatenation, the model's output, a grouped conv, ...) are
    skipped with the reason. Raises SpecError for such a layer named
    exactly in ``spec.channels`` (or any selected one when ``spec.strict``),
    for a name or pattern in ``spec.channels`` that matches no conv or linear
    layer (listing the closest names), for a count above the layer's
    channels, and for non-finite weights; SurgeryError when the model cannot
    be traced with torch.fx. The model is never changed.
    """
    spec = spec if spec is not None else CSGDSpec()
    layers = list(producers(model))
    entries = [("channels", key) for key in spec.channels]
    check_names_match(model, entries, [name for name, _ in layers], "conv or linear layer")
    found = routes(model)
    rows = []
    for name, module in layers:
        channels = out_channels(module)
        kind = type(module).__name__
        row = dict(name=name, module_type=kind, channels=channels)
        value, reason, explicit = spec.resolve(name, module)
        if value is None:
            rows.append(FilterRow(**row, target=None, labels=None, reason=reason))
            continue
        route = found[name]
        if route.reason:
            if explicit or spec.strict:
                raise SpecError(
                    f"layer '{name}' ({kind}, {channels} channels): surgery cannot remove its output channels: "
                    f"{route.reason}; skip it with channels={{'{name}': None}}, or thin a layer inside the block"
                )
            rows.append(FilterRow(**row, target=None, labels=None, reason=route.reason))
            continue
        target = value if isinstance(value, int) else max(1, math.floor(channels * value + 0.5))
        if target > channels:
            raise SpecError(
                f"layer '{name}' ({kind}): asks for {target} channels but it has {channels}; give at most {channels}"
            )
        if target == channels:
            why = f"the target keeps all {channels} channels ({reason})"
            if spec.strict and not explicit:
                raise SpecError(f"layer '{name}' ({kind}, {channels} channels): {why}; lower the ratio or skip it")
            rows.append(FilterRow(**row, target=None, labels=None, reason=why))
            continue
        weight = module.weight
        if not torch.isfinite(weight).all():
            raise SpecError(
                f"layer '{name}' ({kind}): weight holds NaN or Inf; fix the model's weights or skip the layer "
                f"with channels={{'{name}': None}}"
            )
        labels = cluster_rows(weight.detach().reshape(channels, -1), target, spec.seed, spec.iterations)
        rows.append(FilterRow(**row, target=target, labels=tuple(labels.tolist()), reason=reason, norms=route.norms))
    return FilterPlan(rows, spec)


class CentripetalSGD:
    """The centripetal gradient transform of a plan, run between ``backward()`` and ``optimizer.step()``.

    For every clustered layer it replaces the gradients of the weight, the
    bias and the batch norm's scale and shift by ``M g + Dec W`` (bias and
    batch norm with ``norm_factor * strength``). Call ``apply()`` after each
    ``backward()``, or ``register(optimizer)`` once. The transform adds the
    weight decay of these parameters itself: give them ``weight_decay=0`` in
    the optimizer (``param_groups()`` builds such groups).

    strength, weight_decay: override the plan's spec.
    Raises SpecError when the plan does not fit the model.
    """

    def __init__(
        self, model: nn.Module, plan: FilterPlan, strength: float | None = None, weight_decay: float | None = None
    ):
        spec = plan.spec
        self.strength = spec.strength if strength is None else strength
        self.weight_decay = spec.weight_decay if weight_decay is None else weight_decay
        spec.replace(strength=self.strength, weight_decay=self.weight_decay)  # validates the overrides
        self.model = model
        self._layers: list[tuple[str, Tensor, int, list[tuple[Tensor, float]]]] = []
        for row in plan.clustered():
            try:
                module = model.get_submodule(row.name)
            except AttributeError:
                raise SpecError(
                    f"layer '{row.name}' of the plan is not in {type(model).__name__}; was the plan made for "
                    f"another model?"
                ) from None
            if out_channels(module) != len(row.labels):
                raise SpecError(
                    f"layer '{row.name}' has {out_channels(module)} output channels but the plan clusters "
                    f"{len(row.labels)}; "
                    "was the model already thinned, or the plan made for another model?"
                )
            side = self.strength * spec.norm_factor
            params = [(module.weight, self.strength)]
            if module.bias is not None:
                params.append((module.bias, side))
            for norm_name in row.norms:
                norm = model.get_submodule(norm_name)
                params += [(p, side) for p in (norm.weight, norm.bias) if p is not None]
            labels = torch.as_tensor(row.labels, dtype=torch.long, device=module.weight.device)
            self._layers.append((row.name, labels, row.target, params))

    def parameters(self) -> Iterator[nn.Parameter]:
        """The parameters whose gradients the transform rewrites."""
        for *_, params in self._layers:
            for param, _ in params:
                yield param

    @torch.no_grad()
    def apply(self) -> None:
        """Rewrite the gradients in place (a parameter without a gradient gets ``Dec W``)."""
        for i, (name, labels, k, params) in enumerate(self._layers):
            if labels.device != params[0][0].device:  # the model moved since the transform was built
                labels = labels.to(params[0][0].device)
                self._layers[i] = (name, labels, k, params)
            for param, strength in params:
                if not param.requires_grad:
                    continue
                grad = param.grad if param.grad is not None else torch.zeros_like(param)
                new = centripetal_gradient(param, grad, labels, k, strength, self.weight_decay)
                if param.grad is None:
                    param.grad = new
                else:
                    param.grad.copy_(new)

    def register(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """Run ``apply()`` before every ``optimizer.step()``; returns the handle to remove it.

        Warns when the optimizer also decays these parameters while the
        transform has a weight decay (decay would count twice), or when it
        does not hold them at all.
        """
        mine = {id(p) for p in self.parameters()}
        held = set()
        for group in optimizer.param_groups:
            ours = [p for p in group["params"] if id(p) in mine]
            held.update(id(p) for p in ours)
            if ours and self.weight_decay and group.get("weight_decay", 0):
                warnings.warn(
                    f"the optimizer decays {len(ours)} clustered parameters (weight_decay={group['weight_decay']}) "
                    f"and the transform adds weight_decay={self.weight_decay}: decay counts twice; "
                    "set one of them to 0 (CentripetalSGD.param_groups builds groups without it)",
                    stacklevel=2,
                )
        if held != mine:
            warnings.warn(
                f"the optimizer holds {len(held)} of the {len(mine)} clustered parameters; the others are not trained",
                stacklevel=2,
            )
        return optimizer.register_step_pre_hook(lambda *_: self.apply())

    def param_groups(self, weight_decay: float = 0.0, **options: Any) -> list[dict[str, Any]]:
        """Optimizer groups: clustered parameters without weight decay, the model's others with ``weight_decay``."""
        mine = {id(p) for p in self.parameters()}
        clustered = [p for p in self.model.parameters() if id(p) in mine]
        others = [p for p in self.model.parameters() if id(p) not in mine]
        return [
            {"params": clustered, "weight_decay": 0.0, **options},
            {"params": others, "weight_decay": weight_decay, **options},
        ]

    @torch.no_grad()
    def spread(self) -> dict[str, float]:
        """Per layer, the largest distance of a filter to its cluster's mean, relative to the largest filter norm."""
        out = {}
        for name, labels, k, params in self._layers:
            weight = params[0][0]
            flat = weight.reshape(weight.shape[0], -1)
            distance = (flat - merge(flat, labels, k)[labels.to(flat.device)]).norm(dim=1).max()
            out[name] = (distance / flat.norm(dim=1).max().clamp_min(torch.finfo(flat.dtype).tiny)).item()
        return out


@torch.no_grad()
def collapse_(model: nn.Module, plan: FilterPlan) -> None:
    """Set each cluster's filters, biases, batch-norm parameters and statistics to their mean, in place.

    The end point of C-SGD training, reached at once: after it the model
    computes the function its thinned version will.
    """
    for row in plan.clustered():
        labels = torch.as_tensor(row.labels, dtype=torch.long)
        module = model.get_submodule(row.name)
        tensors = [module.weight, module.bias]
        for norm_name in row.norms:
            norm = model.get_submodule(norm_name)
            tensors += [norm.weight, norm.bias, norm.running_mean, norm.running_var]
        for tensor in tensors:
            if tensor is not None:
                tensor.copy_(merge(tensor, labels, row.target)[labels.to(tensor.device)])


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
