"""Policy: which weights are clustered, and with which LayerSpec.

A policy resolves each layer in a fixed order: the skip list, an exact module
name, a name pattern (regular expression, full match), the layer's kind
(``cv``, ``fc``, ``emb``), then the default. ``None`` at any step skips the
layer. The policy never touches the model: ``plan(model)`` returns rows.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from .errors import RegistrationError, SpecError
from .ops import layout
from .ops.dtypes import DTYPES, compute_dtype, dtype_name, is_supported, itemsize
from .ops.packing import packed_size
from .spec import CONFIG_VERSION, MAX_BITS, LayerSpec, StorageSpec, config_from_dict, show_value
from .tables import plural, render_table

KINDS = ("cv", "fc", "emb")
_SUPPORTED = ", ".join(DTYPES)  # the dtypes the file format holds
_EXAMPLE_KEY = {"kinds": "fc", "overrides": "features.0"}

_KIND_OF_TYPE: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.Linear, "fc"),
    (nn.Bilinear, "fc"),
    (nn.modules.conv._ConvNd, "cv"),  # Conv1d/2d/3d and ConvTranspose1d/2d/3d
    (nn.Embedding, "emb"),
)


def layer_kind(module: nn.Module) -> str | None:
    """``cv``, ``fc`` or ``emb`` for a module whose weight can be clustered, else None."""
    for cls, kind in _KIND_OF_TYPE:
        if isinstance(module, cls):
            return kind
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        # transformers' GPT-2 linear layer, its weight stored transposed (in, out);
        # recognised by name so transformers is never imported
        return "fc"
    return None


def weight_key(module_name: str) -> str:
    """The state_dict key of a module's weight."""
    return f"{module_name}.weight" if module_name else "weight"


def weight_of(module: nn.Module):
    """The module's own weight tensor (the original one if it is parametrized), or None."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    weight = module._parameters.get("weight")
    return weight


@dataclass(frozen=True)
class LayerPlan:
    """One row of a plan: a module that owns a weight, and what happens to it."""

    name: str
    module_type: str
    kind: str | None
    shape: tuple[int, ...]
    spec: LayerSpec | None
    reason: str
    tied_to: str | None = None  # the layer that clusters this shared weight
    followers: tuple[str, ...] = ()  # layers that share this weight

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def clustered(self) -> bool:
        """True when this row registers the clustering (tied followers do not)."""
        return self.spec is not None and self.tied_to is None


class Plan(list):
    """The rows ``Policy.plan`` decided, in module order; prints as a table."""

    def clustered(self) -> list[LayerPlan]:
        return [row for row in self if row.clustered]

    def skipped(self) -> list[LayerPlan]:
        return [row for row in self if row.spec is None]

    def row(self, name: str) -> LayerPlan:
        for r in self:
            if r.name == name:
                return r
        raise KeyError(name)

    def __str__(self) -> str:
        rows = []
        for r in self:
            bits = str(r.spec.bits) if r.spec else "-"
            dim = str(r.spec.dim) if r.spec else "-"
            decision = r.reason if r.spec is None or r.tied_to else f"cluster: {r.reason}"
            rows.append((r.name, r.module_type, r.kind or "-", f"{r.numel:,}", bits, dim, decision))
        footer = [f"{len(self.clustered())} clustered, {len(self.skipped())} skipped"]
        header = ("layer", "type", "kind", "weights", "bits", "dim", "decision")
        return render_table(header, rows, right={3}, footer=footer, notes=True)

    def require_clustered(self, model: nn.Module) -> list[LayerPlan]:
        """The rows clustered; SpecError, with why each layer was left, when there are none."""
        rows = self.clustered()
        if rows:
            return rows
        reasons = Counter(row.reason for row in self)  # in the order first seen
        why = "; ".join(f"{plural(count, 'layer')}: {reason}" for reason, count in list(reasons.items())[:4])
        seen = f" ({why})" if why else " (it has no module that owns a weight)"
        raise SpecError(
            f"the policy clusters no layer of {type(model).__name__}{seen}; give the kinds it has a spec "
            "(e.g. Policy.from_notation('cv:4/1, fc:4/1')) or name layers in overrides; print(policy.plan(model)) "
            "shows every decision"
        )


@dataclass(frozen=True)
class Policy:
    """Which layers are clustered and how.

    default: spec for any cv/fc layer not otherwise matched (None skips them).
    kinds: spec per kind, ``{"cv": ..., "fc": ..., "emb": ...}``; embeddings are
        clustered only when ``emb`` is named here.
    overrides: per module name or regular expression (full match), a spec or
        None; exact names win over patterns, patterns apply in order.
    skip: module names or patterns never clustered.
    skip_first_last: leave the first and the last cv/fc layer uncompressed
        (the paper's protocol).
    small_layer_params, small_layer_bits: layers with fewer weights than this
        use at least ``small_layer_bits`` bits (the paper: 10,000 and 8);
        ``small_layer_bits=None`` turns the rule off. Where those bits would
        store the layer larger than it is (the codebook outweighs the
        saving), the layer is kept as it is instead.
    strict: raise instead of skipping a layer the policy selected but cannot
        cluster (a dim that does not divide it, too few vectors).

    Names and patterns (in ``skip`` and ``overrides``) match the full names of
    modules that own a weight, as ``plan`` lists them; one that matches none
    of a model's is an error when the policy is applied to it. A layer that
    clustering would store larger than it is (codebook, packed indices and
    scales against the weight at its own dtype) is kept as it is, with that
    reason in the plan. Exact-name overrides are explicit requests: a misfit
    or a layer made larger there always raises.
    Raises SpecError, naming the field, for a value of the wrong type or range
    (``skip`` may be a str or a list of them; it is kept as a tuple).
    """

    default: LayerSpec | None = field(default_factory=LayerSpec)
    kinds: Mapping[str, LayerSpec | None] = field(default_factory=dict)
    overrides: Mapping[str, LayerSpec | None] = field(default_factory=dict)
    skip: tuple[str, ...] = ()
    skip_first_last: bool = False
    small_layer_params: int = 10_000
    small_layer_bits: int | None = 8
    strict: bool = False

    def __post_init__(self):
        for flag in ("skip_first_last", "strict"):
            value = getattr(self, flag)
            if not isinstance(value, bool):
                text = " (as text, any non-empty string would read as True)" if isinstance(value, str) else ""
                raise SpecError(
                    f"policy {flag} must be True or False, got {value!r} ({type(value).__name__}); "
                    f"pass the bool itself{text}"
                )
        if not _is_int(self.small_layer_params) or self.small_layer_params < 0:
            raise SpecError(
                f"policy small_layer_params must be an int >= 0, got {show_value(self.small_layer_params)}; "
                "give a weight count (the paper: 10_000), or small_layer_bits=None to turn the rule off"
            )
        bits = self.small_layer_bits
        if bits is not None and not (_is_int(bits) and 1 <= bits <= MAX_BITS):
            raise SpecError(
                f"policy small_layer_bits must be an int in 1..{MAX_BITS} or None, got {show_value(bits)}; "
                "give the bits small layers get at least (the paper: 8), or None to turn the rule off"
            )
        skip = (self.skip,) if isinstance(self.skip, str) else self.skip
        if not isinstance(skip, (tuple, list)) or not all(isinstance(p, str) for p in skip):
            raise SpecError(
                f"policy skip must be a module name or pattern (str) or a tuple or list of them, got {self.skip!r}; "
                "write e.g. skip=('classifier', r'layer4\\..*')"
            )
        object.__setattr__(self, "skip", tuple(skip))
        for table, key_is in (("kinds", "a kind ('cv', 'fc', 'emb')"), ("overrides", "a module name or pattern")):
            entries = getattr(self, table)
            if not isinstance(entries, Mapping):
                raise SpecError(
                    f"policy {table} must be a dict from {key_is} to a LayerSpec or None, got "
                    f"{type(entries).__name__} {entries!r}; write e.g. {table}={{'{_EXAMPLE_KEY[table]}': LayerSpec()}}"
                )
            for key in entries:
                if not isinstance(key, str):
                    raise SpecError(
                        f"policy {table} keys must be str, got {key!r} ({type(key).__name__}); "
                        f"write {key_is} as a string"
                    )
        unknown = sorted(set(self.kinds) - set(KINDS))
        if unknown:
            raise SpecError(f"unknown layer kind(s) {unknown} in policy; kinds are {', '.join(KINDS)}")
        for key, spec in [("default", self.default), *self.kinds.items(), *self.overrides.items()]:
            if spec is not None and not isinstance(spec, LayerSpec):
                raise SpecError(f"policy entry {key!r} must be a LayerSpec or None, got {type(spec).__name__}")
        for pattern in [*self.overrides, *self.skip]:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise SpecError(f"policy pattern {pattern!r} is not a valid regular expression: {exc}") from None

    @classmethod
    def from_notation(cls, notation: str, spec: LayerSpec | None = None, **kwargs: Any) -> "Policy":
        """Parse the paper's notation, e.g. ``"cv:6/8, fc:6/4"`` (kind:bits/dim).

        Kinds not named are skipped. ``spec`` supplies the other fields
        (tau, iterations, ...); keyword arguments go to ``Policy``.
        """
        base = spec or LayerSpec()
        kinds: dict[str, LayerSpec | None] = {}
        for part in filter(None, (p.strip() for p in notation.split(","))):
            match = re.fullmatch(r"(\w+)\s*:\s*(\d+)\s*/\s*(\d+)", part)
            if not match:
                raise SpecError(
                    f"cannot read {part!r} in policy notation {notation!r}; write kind:bits/dim, e.g. 'cv:4/1'"
                )
            kind, bits, dim = match.group(1), int(match.group(2)), int(match.group(3))
            if kind not in KINDS:
                raise SpecError(f"unknown kind {kind!r} in policy notation {notation!r}; kinds are {', '.join(KINDS)}")
            if kind in kinds:
                raise SpecError(f"kind {kind!r} appears twice in policy notation {notation!r}")
            kinds[kind] = base.replace(bits=bits, dim=dim)
        if not kinds:
            raise SpecError(f"policy notation {notation!r} names no layer kind; write e.g. 'cv:4/1, fc:4/1'")
        kwargs.setdefault("default", None)
        return cls(kinds=kinds, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready) with the config ``version``; ``from_dict`` reads it back."""
        spec = lambda s: None if s is None else s.to_dict()  # noqa: E731
        return {
            "version": CONFIG_VERSION,
            "default": spec(self.default),
            "kinds": {k: spec(v) for k, v in self.kinds.items()},
            "overrides": {k: spec(v) for k, v in self.overrides.items()},
            "skip": list(self.skip),
            "skip_first_last": self.skip_first_last,
            "small_layer_params": self.small_layer_params,
            "small_layer_bits": self.small_layer_bits,
            "strict": self.strict,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Policy":
        """Build from ``to_dict`` output, rejecting unknown keys and other versions."""
        spec = lambda s: None if s is None else LayerSpec.from_dict(s)  # noqa: E731
        # anything but a dict is passed on as it is, for __post_init__ to name
        specs = lambda table: {k: spec(v) for k, v in table.items()} if isinstance(table, Mapping) else table  # noqa: E731
        # skip: the list JSON gives becomes a tuple in __post_init__ (tuple() would split a str into letters)
        return config_from_dict(cls, data, default=spec, kinds=specs, overrides=specs)

    # -- deciding ---------------------------------------------------------

    def _resolve(self, name: str, kind: str) -> tuple[LayerSpec | None, str, str]:
        """(spec, reason, source) before the size rules; source says how explicit it is."""
        for pattern in self.skip:
            if name == pattern or re.fullmatch(pattern, name):
                return None, f"in the skip list ({pattern!r})", "skip"
        if name in self.overrides:
            spec = self.overrides[name]
            return spec, "named in the policy" if spec else "named None in the policy", "name"
        for pattern, spec in self.overrides.items():
            if re.fullmatch(pattern, name):
                return spec, f"matches {pattern!r}" if spec else f"matches {pattern!r} (None)", "pattern"
        if kind in self.kinds:
            spec = self.kinds[kind]
            return spec, f"kind {kind}" if spec else f"kind {kind} is None in the policy", "kind"
        if kind == "emb":
            return None, "embeddings are clustered only when the policy names 'emb'", "kind"
        if self.default is None:
            return None, f"kind {kind} has no spec and the policy's default is None", "default"
        return self.default, "default", "default"

    def plan(self, model: nn.Module, codebook_dtype: torch.dtype | None = None) -> Plan:
        """Decide every module that owns a weight, without touching the model.

        Each row's reason says why the layer got its bits or was skipped.
        codebook_dtype: the dtype the codebooks will be stored in (default:
        each weight's own, as ``finalize`` and ``palettize`` store them); a
        layer that would not be smaller clustered is kept as it is.
        Raises SpecError for a name or pattern in ``skip`` or ``overrides``
        that matches no module with a weight (listing the closest names), for
        an override giving a spec that matches only modules whose weights are
        not clustered (a BatchNorm, a LayerNorm), for a misfit or a layer made
        larger on an exactly named layer, and for a misfit on any selected
        layer when ``strict``.
        """
        candidates = list(_weighted_modules(model))
        entries = [("policy skip", pattern) for pattern in self.skip]
        entries += [("policy overrides", key) for key in self.overrides]
        check_names_match(model, entries, [name for name, _, _ in candidates], "module that owns a weight")
        clustered_kinds = [(name, module) for name, module, _ in candidates if layer_kind(module) is not None]
        given = [("policy overrides", key) for key, spec in self.overrides.items() if spec is not None]
        check_names_match(model, given, [name for name, _ in clustered_kinds], "conv, linear or embedding layer")
        targets = [name for name, module, _ in candidates if layer_kind(module) is not None]
        edges = {targets[0], targets[-1]} if self.skip_first_last and targets else set()

        decided: list[LayerPlan] = []
        for name, module, weight in candidates:
            kind = layer_kind(module)
            shape = tuple(weight.shape)
            row = dict(name=name, module_type=type(module).__name__, kind=kind, shape=shape)
            if kind is None:
                decided.append(LayerPlan(**row, spec=None, reason=f"{type(module).__name__} weights are not clustered"))
                continue
            spec, reason, source = self._resolve(name, kind)
            general = source in ("kind", "default")
            numel = weight.numel()
            if spec is not None and general and name in edges:
                spec, reason = None, "first or last layer (skip_first_last)"
            if spec is not None and general and self.small_layer_bits and numel < self.small_layer_params:
                if spec.bits < self.small_layer_bits and is_supported(weight.dtype):
                    spec, reason = self._small_layer(spec, shape, weight.dtype, codebook_dtype or weight.dtype)
            if spec is not None and parametrize.is_parametrized(module, "weight"):
                kinds = ", ".join(type(p).__name__ for p in module.parametrizations.weight)
                spec, reason = None, f"its weight already has a parametrization ({kinds}) that would be lost"
                if not general or self.strict:
                    raise SpecError(
                        f"layer '{name}' ({type(module).__name__}): {reason}; remove it "
                        "(torch.nn.utils.parametrize.remove_parametrizations) or skip the layer in the policy"
                    )
            if spec is not None and not is_supported(weight.dtype):
                what = "supported" if weight.is_floating_point() else "floating point"
                spec, reason = None, f"weight dtype {weight.dtype} is not {what} (supported: {_SUPPORTED})"
                if not general or self.strict:
                    raise SpecError(
                        f"layer '{name}' ({type(module).__name__}): {reason}; cast the weight to one of them "
                        "(e.g. module.to(torch.bfloat16)) or skip it in the policy"
                    )
            if spec is not None:
                misfit = spec.misfit(shape)
                if misfit:
                    if not general or self.strict:
                        raise SpecError(
                            f"layer '{name}' ({type(module).__name__}, {numel} weights): {misfit}, "
                            "or skip the layer in the policy"
                        )
                    spec, reason = None, misfit
            if spec is not None:
                stored = stored_size(spec.storage, shape, codebook_dtype or weight.dtype, weight.dtype)
                dense = numel * itemsize(weight.dtype)
                if stored >= dense:
                    larger = (
                        f"bits={spec.bits}, dim={spec.dim} would take {stored:,} B with the codebook"
                        f"{_in_dtype(codebook_dtype)}, not less than its own {dense:,} B in {dtype_name(weight.dtype)}"
                    )
                    if source == "name":
                        raise SpecError(
                            f"layer '{name}' ({type(module).__name__}, {numel} weights): {larger}; "
                            "give it fewer bits or a larger dim"
                            f"{', store the codebooks in the weight dtype' if codebook_dtype else ''}, "
                            "or skip the layer in the policy"
                        )
                    spec, reason = None, f"kept as it is: {larger}"
            decided.append(LayerPlan(**row, spec=spec, reason=reason))
        return Plan(_tie(decided, candidates))

    def _small_layer(
        self, spec: LayerSpec, shape: tuple[int, ...], dtype, codebook_dtype
    ) -> tuple[LayerSpec | None, str]:
        """The small-layer rule: ``small_layer_bits`` bits, or none where those bits would make the layer larger."""
        bits = self.small_layer_bits
        rule = f"small layer (< {self.small_layer_params:,} weights, small_layer_bits={bits})"
        raised = spec.replace(bits=bits)
        stored, dense = stored_size(raised.storage, shape, codebook_dtype, dtype), math.prod(shape) * itemsize(dtype)
        if spec.misfit(shape) is None and stored >= dense:
            # also where the layer has fewer vectors than 2**bits clusters: their codebook alone outweighs it
            return None, (
                f"{rule}: kept as it is, as {bits} bits would take {stored:,} B with the codebook"
                f"{_in_dtype(codebook_dtype if codebook_dtype != dtype else None)}, not less than "
                f"its own {dense:,} B; small_layer_bits=None clusters it at bits={spec.bits}"
            )
        return raised, f"{rule}: {bits} bits"


def stored_size(spec: StorageSpec, shape: tuple[int, ...], codebook_dtype, dtype=None) -> int:
    """Bytes a weight of ``shape`` takes clustered with ``spec``: the full codebooks in
    ``codebook_dtype``, the packed indices and the per-channel scales (in the compute dtype of
    the weight's ``dtype``, default ``codebook_dtype``)."""
    codebooks = layout.groups(shape, spec.group_size) * spec.clusters * spec.dim * itemsize(codebook_dtype)
    scales = layout.rows(shape) * itemsize(compute_dtype(dtype or codebook_dtype)) if spec.channel_scale else 0
    return codebooks + scales + packed_size(math.prod(shape) // spec.dim, spec.bits)


def check_names_match(model: nn.Module, entries: Iterable[tuple[str, str]], names: list[str], what: str) -> None:
    """Raise SpecError for the ``(field, name or pattern)`` entries that match none of ``names``.

    A name matches itself, a pattern the names it matches in full. The error
    lists each unmatched entry with the closest names (a module's own layers
    first, then names spelled alike) and says what a name must be.
    """
    known = set(names)
    unmatched = [
        (table, pattern)
        for table, pattern in entries
        if pattern not in known and not any(re.fullmatch(pattern, name) for name in names)
    ]
    if not unmatched:
        return
    modules = dict(model.named_modules(remove_duplicate=False))
    parts = []
    for table, pattern in unmatched:
        close = _closest(pattern, names)
        if pattern in modules:
            found = f"a {type(modules[pattern]).__name__}, not a {what}"
        else:
            found = f"no {what} matches it"
        hint = f"; closest: {', '.join(repr(n) for n in close[:4])}" if close else ""
        parts.append(f"{table} {pattern!r} ({found}{hint})")
    example = f", e.g. {names[-1]!r}" if names else ""
    raise SpecError(
        f"{'; '.join(parts)} in {type(model).__name__}: each must be the full name of a {what} "
        f"(as model.named_modules() gives it{example}) or a regular expression matching whole names; "
        "correct or remove it"
    )


def _closest(pattern: str, names: list[str]) -> list[str]:
    """Names close to an unmatched one: the module a state_dict key (``'fc.weight'``) belongs
    to, a module's own layers, then names spelled alike, whatever their case."""
    owner = re.sub(r"\.(weight|bias|original\d*)$", "", pattern)
    found = [owner] if owner != pattern and owner in names else []
    found += [name for name in names if name.startswith(f"{pattern}.")][:3]
    lowered: dict[str, str] = {}
    for name in names:
        lowered.setdefault(name.lower(), name)
    alike = difflib.get_close_matches(pattern.lower(), list(lowered), n=4, cutoff=0.6)
    found += [lowered[name] for name in alike]
    return list(dict.fromkeys(found))


def _in_dtype(codebook_dtype) -> str:
    """`` in <dtype>`` for a codebook dtype the caller chose, else nothing."""
    return f" in {dtype_name(codebook_dtype)}" if codebook_dtype is not None else ""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _weighted_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, Any]]:
    for name, module in model.named_modules():
        weight = weight_of(module)
        if weight is not None:
            yield name, module, weight


def _tie(rows: list[LayerPlan], candidates: list[tuple[str, nn.Module, Any]]) -> list[LayerPlan]:
    """Cluster a shared weight once: the first selected user leads, the others follow."""
    groups: dict[int, list[int]] = {}
    for i, (_, _, weight) in enumerate(candidates):
        groups.setdefault(id(weight), []).append(i)
    out = list(rows)
    for members in groups.values():
        if len(members) < 2:
            continue
        leaders = [i for i in members if rows[i].spec is not None]
        if not leaders:
            continue
        lead = leaders[0]
        followers = tuple(rows[i].name for i in members if i != lead)
        out[lead] = dataclasses.replace(rows[lead], followers=followers)
        for i in members:
            if i != lead:
                out[i] = dataclasses.replace(
                    rows[i],
                    spec=rows[lead].spec,
                    reason=f"shares its weight with '{rows[lead].name}'",
                    tied_to=rows[lead].name,
                )
    return out


def check_materialized(model: nn.Module, rows: list[LayerPlan]) -> None:
    """Raise RegistrationError if a selected weight has no data (the meta device), before anything is built."""
    empty = [row for row in rows if model.get_submodule(row.name).weight.is_meta]
    if empty:
        row = empty[0]
        others = len(empty) - 1
        more = f" and {others} more selected layer{'s' if others > 1 else ''}" if others else ""
        raise RegistrationError(
            f"layer '{row.name}' ({row.module_type}){more}: the weight is on the meta device and holds no values "
            "to cluster; materialize the model first, e.g. model.to_empty(device='cpu') and then load its weights "
            "(model.load_state_dict(...)), and try again"
        )
