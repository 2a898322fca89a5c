"""Specs: how one weight is stored (the file's half) and how it is trained.

``StorageSpec`` is everything decoding needs and the file carries whole;
``TrainingSpec`` is how DKM gets there; ``LayerSpec`` is the two together,
as users write them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, TypeVar

from .errors import SpecError

INITS = ("kmeans++", "linear", "quantile")
LAYOUTS = ("flat", "input")
MAX_BITS = 8
# The version every config's ``to_dict`` writes; ``from_dict`` refuses others.
CONFIG_VERSION = 1
# The positive normal float32 range (torch.finfo(torch.float32).tiny and .max): the
# temperature and threshold live in float32 buffers, where a value outside it
# becomes 0 (a division by zero) or inf (a collapsed layer).
FLOAT32_TINY = 2.0**-126
FLOAT32_MAX = (2.0 - 2.0**-23) * 2.0**127
# Seeds feed torch.Generator.manual_seed, which takes a signed 64-bit int.
MAX_SEED = 2**63 - 1

T = TypeVar("T")


class _Config:
    """``to_dict`` and ``from_dict`` for a config dataclass, versioned."""

    def to_dict(self) -> dict[str, Any]:
        """The fields and the config ``version``, for JSON."""
        return config_to_dict(self)

    @classmethod
    def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
        """Build from ``to_dict`` output, rejecting unknown keys and other versions."""
        return config_from_dict(cls, data)


@dataclass(frozen=True)
class StorageSpec(_Config):
    """How one clustered weight is stored: what the file carries and decoding needs.

    bits: index width; the codebook has ``2**bits`` centroids.
    dim: vector length; the weight is read as ``numel/dim`` vectors.
    group_size: None for one codebook per tensor; else each group of this
        many output channels (rows of the weight) gets its own codebook.
    channel_scale: each output channel is clustered divided by its largest
        magnitude, and one scale per channel is stored.
    preserve_zeros: codebook entry 0 is pinned at zero and vectors that are
        exactly zero stay exactly zero (for pruned models).
    layout: how vectors are read: ``flat`` takes ``dim`` consecutive values
        of the row-major weight; ``input`` takes blocks of ``dim`` input
        channels at one kernel position (the iPQ layout for convolutions).
    """

    bits: int = 4
    dim: int = 1
    group_size: int | None = None
    channel_scale: bool = False
    preserve_zeros: bool = False
    layout: str = "flat"

    def __post_init__(self):
        _check_int("bits", self.bits, 1, MAX_BITS)
        _check_int("dim", self.dim, 1, None)
        if self.group_size is not None:
            _check_int("group_size", self.group_size, 1, None)
        for flag in ("channel_scale", "preserve_zeros"):
            if not isinstance(getattr(self, flag), bool):
                raise SpecError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        if self.preserve_zeros and self.bits < 2:
            raise SpecError("preserve_zeros needs bits >= 2: one centroid is pinned at zero")
        if self.layout not in LAYOUTS:
            raise SpecError(f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")

    @property
    def clusters(self) -> int:
        """Number of centroids, ``2**bits``."""
        return 1 << self.bits

    @property
    def bits_per_weight(self) -> float:
        """Index bits per weight, ``bits / dim`` (the codebook comes on top)."""
        return self.bits / self.dim

    @property
    def per_channel(self) -> bool:
        """True when vectors must not straddle output channels (groups or scales)."""
        return self.group_size is not None or self.channel_scale

    def misfit(self, shape: tuple[int, ...] | int) -> str | None:
        """Why this spec cannot cluster a weight of this shape (or numel), or None."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        numel = math.prod(shape)
        rows = shape[0] if len(shape) > 1 else 1
        if self.group_size is not None and rows % self.group_size:
            return f"group_size={self.group_size} does not divide the {rows} output channels"
        if self.layout == "input" and len(shape) > 2 and shape[1] % self.dim:
            return f"dim={self.dim} does not divide the {shape[1]} input channels (layout='input')"
        span, what = (numel // rows, "an output channel's") if self.per_channel else (numel, "the weight's")
        if span % self.dim:
            near = [d for d in (1, 2, 4, 8, 16) if span % d == 0 and d != self.dim]
            hint = f", e.g. {' or '.join(map(str, near[-2:]))}" if near else ""
            return f"dim={self.dim} does not divide the weight; choose a dim that divides {what} {span} values{hint}"
        groups = rows // self.group_size if self.group_size else 1
        vectors = numel // self.dim // groups
        if vectors < self.clusters:
            where = " per group" if groups > 1 else ""
            return (
                f"{vectors} vectors{where} are fewer than the {self.clusters} clusters of bits={self.bits}; "
                f"use bits <= {max(1, vectors.bit_length() - 1)}, a smaller dim or larger groups"
            )
        return None


@dataclass(frozen=True)
class TrainingSpec(_Config):
    """How DKM trains one weight's clustering; nothing of it is needed to decode.

    tau: absolute temperature of the attention, as in the paper's tables
        (which assume ImageNet-scale weights). ``None`` (the default) derives
        it from the layer itself with ``tau_rel``.
    tau_rel: temperature relative to the layer's own clustering error:
        ``tau = tau_rel * mean squared distance of a vector to its nearest
        initial centroid``. It does not depend on the weight's scale; 2.0
        matches the paper's ResNet18 temperatures at 1 to 3 bits. A derived
        tau is kept below 0.4 x the temperature at which every centroid
        would settle onto the mean (twice the vectors' largest variance
        along one direction), which long vectors with few centroids (e.g.
        2 bits for vectors of 4) would otherwise reach.
    max_iter: cap on the centroid iterations per training step.
    settle_iter: cap on the centroid iterations run once at registration,
        without gradient, on a summary of the weight (``ops.soft.settle``), so
        that the seeded codebook starts at the soft clustering's fixed point and
        training steps stop after one or two iterations instead of spending
        ``max_iter`` on catching up; they stop at ``epsilon / 4``. 0 keeps the
        seeded codebook.
    epsilon: the iterations stop once no centroid moves more than
        ``epsilon * std(weight)``.
    init: how the codebook is seeded: ``kmeans++``, ``linear`` (evenly
        spaced between the extremes) or ``quantile`` (by density).
    seed: seed of the initialisation's own random generator, so that
        registration never touches the global RNG and is repeatable; at most
        ``2**63 - 1``, the largest seed torch's generator takes.

    tau, tau_rel and a non-zero epsilon live in float32 buffers: each must be
    a positive normal float32, ``FLOAT32_TINY`` to ``FLOAT32_MAX``. Raises
    SpecError naming the field otherwise.
    """

    tau: float | None = None
    tau_rel: float = 2.0
    max_iter: int = 5
    settle_iter: int = 300
    epsilon: float = 1e-3
    init: str = "kmeans++"
    seed: int = 0

    def __post_init__(self):
        _check_int("max_iter", self.max_iter, 1, None)
        _check_int("settle_iter", self.settle_iter, 0, None)
        _check_int("seed", self.seed, 0, MAX_SEED, " (2**63 - 1, torch's largest seed)")
        if self.tau is not None:
            _check_float32("tau", self.tau, ", or tau=None to derive it from the layer with tau_rel")
        _check_float32("tau_rel", self.tau_rel, " (the default 2.0 suits most layers)")
        _check_float32("epsilon", self.epsilon, ", or 0 to always run max_iter iterations", zero=True)
        if self.init not in INITS:
            raise SpecError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")


_STORAGE_FIELDS = tuple(f.name for f in dataclasses.fields(StorageSpec))
_TRAINING_FIELDS = tuple(f.name for f in dataclasses.fields(TrainingSpec))


@dataclass(frozen=True)
class LayerSpec(_Config):
    """How one weight tensor is clustered: a ``StorageSpec`` and a ``TrainingSpec`` in one.

    Storage (written to the file, see ``StorageSpec``): bits, dim,
    group_size, channel_scale, preserve_zeros, layout. Training (see
    ``TrainingSpec``): tau, tau_rel, max_iter, settle_iter, epsilon, init,
    seed. ``spec.storage`` and ``spec.training`` give the two halves;
    ``LayerSpec.from_parts(storage, training)`` joins them.
    """

    bits: int = 4
    dim: int = 1
    tau: float | None = None
    tau_rel: float = 2.0
    max_iter: int = 5
    settle_iter: int = 300
    epsilon: float = 1e-3
    init: str = "kmeans++"
    seed: int = 0
    group_size: int | None = None
    channel_scale: bool = False
    preserve_zeros: bool = False
    layout: str = "flat"

    def __post_init__(self):
        # each half validates its own fields; kept, so the properties cost nothing
        object.__setattr__(self, "_storage", StorageSpec(**{n: getattr(self, n) for n in _STORAGE_FIELDS}))
        object.__setattr__(self, "_training", TrainingSpec(**{n: getattr(self, n) for n in _TRAINING_FIELDS}))

    @classmethod
    def from_parts(cls, storage: StorageSpec, training: TrainingSpec | None = None) -> "LayerSpec":
        """The LayerSpec of a storage half and a training half (default ``TrainingSpec()``)."""
        training = training if training is not None else TrainingSpec()
        return cls(**dataclasses.asdict(storage), **dataclasses.asdict(training))

    @property
    def storage(self) -> StorageSpec:
        """The half the file carries: bits, dim, groups, scales, zeros, layout."""
        return self._storage

    @property
    def training(self) -> TrainingSpec:
        """The half that only training reads: temperature, iterations, init, seed."""
        return self._training

    @property
    def clusters(self) -> int:
        """Number of centroids, ``2**bits``."""
        return self._storage.clusters

    @property
    def bits_per_weight(self) -> float:
        """Index bits per weight, ``bits / dim`` (the codebook comes on top)."""
        return self._storage.bits_per_weight

    @property
    def per_channel(self) -> bool:
        """True when vectors must not straddle output channels (groups or scales)."""
        return self._storage.per_channel

    def misfit(self, shape: tuple[int, ...] | int) -> str | None:
        """Why this spec cannot cluster a weight of this shape (or numel), or None."""
        return self._storage.misfit(shape)

    def replace(self, **changes: Any) -> "LayerSpec":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass's fields as a dict, with the ``version`` it is written in."""
    return {"version": CONFIG_VERSION, **{f.name: getattr(config, f.name) for f in dataclasses.fields(config)}}


def config_from_dict(cls: Callable[..., T], data: Mapping[str, Any], **convert: Callable[[Any], Any]) -> T:
    """Build config ``cls`` from ``to_dict`` output.

    convert: per field, a function applied to its value first (nested configs).
    A dict without ``version`` is read as the current version. Raises
    SpecError for a non-dict, unknown keys or another version.
    """
    if not isinstance(data, Mapping):
        raise SpecError(f"{cls.__name__}.from_dict needs a dict, got {type(data).__name__}")
    data = dict(data)
    version = data.pop("version", CONFIG_VERSION)
    if version != CONFIG_VERSION or isinstance(version, bool):
        raise SpecError(
            f"{cls.__name__} dict has version {version!r}; this dkm_param reads version {CONFIG_VERSION} "
            "(a newer dkm_param wrote it: upgrade, or write the dict again with this one)"
        )
    check_fields(cls, data)
    for name, fn in convert.items():
        if name in data:
            data[name] = fn(data[name])
    return cls(**data)


def check_fields(cls: type, data: Mapping[str, Any]) -> None:
    """Raise SpecError naming any key of ``data`` that is not a field of dataclass ``cls``."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise SpecError(f"unknown {cls.__name__} field(s) {unknown}; known fields are {sorted(names)}")


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(name: str, value: Any, low: int, high: int | None, why: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise SpecError(f"{name} must be an int, got {value!r} ({type(value).__name__}); pass a whole number")
    if value < low or (high is not None and value > high):
        span = f"{low}..{high}" if high is not None else f">= {low}"
        raise SpecError(f"{name} must be in {span}{why}, got {show_value(value)}")


def _check_float32(name: str, value: Any, hint: str, zero: bool = False) -> None:
    """Raise SpecError unless ``value`` is a number float32 holds as a positive normal (or 0, with ``zero``)."""
    if not _is_real(value):
        raise SpecError(f"{name} must be a number, got {value!r} ({type(value).__name__}); pass an int or a float")
    # comparisons, not math.isfinite: a huge int must fail here, not overflow converting to float
    if (zero and value == 0) or FLOAT32_TINY <= value <= FLOAT32_MAX:
        return
    what = "0 or a positive number" if zero else "a positive number"
    if FLOAT32_MAX < value < math.inf:
        effect = " (inf in the float32 buffer it is stored in)"
    elif 0 < value < FLOAT32_TINY:
        effect = " (0 or a subnormal in the float32 buffer it is stored in)"
    else:
        effect = ""
    raise SpecError(
        f"{name} must be {what} that float32 holds, {FLOAT32_TINY:.4g} to {FLOAT32_MAX:.4g}, "
        f"got {show_value(value)}{effect}; pass a value in that range{hint}"
    )


def show_value(value: Any) -> str:
    """``repr`` of a value for an error message, a huge int shortened (``repr`` refuses the longest)."""
    if isinstance(value, int) and abs(value) >= 10**20:
        return f"{'a negative' if value < 0 else 'an'} int of {abs(value).bit_length()} bits"
    return repr(value)
