"""Models kept compressed in memory: each clustered weight decoded from its codebook and packed indices when used."""

from __future__ import annotations

import copy
import math
import threading

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..errors import RegistrationError
from ..format.layer import CompressedLayer
from ..format.model import CompressedModel, _check_fits
from ..ops.decode import byte_digits, decode_packed, lookup_is_last

_SCRATCH_FROM = 1 << 16  # weights of fewer values are decoded into fresh memory


class CompressedWeight(nn.Module):
    """A parametrization that decodes its weight from the codebook and packed indices each time it is read.

    Its state is buffers, as in the file: ``codebook`` (k, d) or (groups, k, d),
    ``packed`` (uint8, the indices ``bits`` bits each), ``scale`` (rows,) or
    None, ``outlier_index`` (int64) and ``outlier_value`` or None; and, not
    saved, ``digits``: the indices each byte holds, where ``bits`` divides 8
    (pass one tensor to every layer of the same bits, so that a program
    exported from the model stores it once). The weight it returns is
    ``CompressedLayer.weight()``, bit for bit; the tensor it is registered
    over is an empty placeholder, so the full weight is resident only while
    it is being used. bitcast: ``decode_packed``'s faster gather, for a model
    run in PyTorch (not for one exported to ExecuTorch); scratch: a ``Scratch``
    to decode into, shared by a model's layers, so that inference does not take
    fresh memory for every weight (``load_compressed(..., keep_compressed=True)``
    gives one).
    """

    def __init__(
        self, layer: CompressedLayer, digits: Tensor | None = None, bitcast: bool = False,
        scratch: Scratch | None = None,
    ):
        super().__init__()
        self.bitcast = bitcast
        # a weight small enough for the allocator to keep in its pools gains nothing from a scratch
        direct = scratch is not None and math.prod(layer.shape) >= _SCRATCH_FROM
        self.scratch = scratch if direct and lookup_is_last(
            tuple(layer.shape), layer.spec.bits, layer.codebook, layer.packed, layer.scale, layer.spec.layout,
            layer.outlier_index) else None
        self.shape = tuple(layer.shape)
        self.dtype = layer.dtype
        self.bits = layer.spec.bits
        self.layout = layer.spec.layout
        self.register_buffer("codebook", layer.codebook.detach().clone())
        self.register_buffer("packed", layer.packed.detach())  # the file's bytes
        self.register_buffer("scale", None if layer.scale is None else layer.scale.detach().clone())
        index = None if layer.outlier_index is None else layer.outlier_index.to(torch.int64)
        self.register_buffer("outlier_index", index)
        self.register_buffer("outlier_value", None if layer.outlier_value is None else layer.outlier_value.clone())
        if 8 % self.bits == 0 and digits is None:
            digits = byte_digits(self.bits)
        self.register_buffer("digits", digits if 8 % self.bits == 0 else None, persistent=False)

    def forward(self, original: Tensor) -> Tensor:
        """The decoded weight; ``original`` (the empty placeholder) is not read."""
        out = None if self.scratch is None else self.scratch.claim(self.shape, self.dtype, self.packed)
        return decode_packed(
            self.codebook, self.packed, self.shape, self.dtype, self.bits, self.scale, self.layout,
            self.outlier_index, self.outlier_value, self.digits, self.bitcast, out,
        )

    def extra_repr(self) -> str:
        shape = "x".join(map(str, self.shape))
        return f"shape={shape}, dtype={str(self.dtype).removeprefix('torch.')}, bits={self.bits}, " \
               f"codebook={tuple(self.codebook.shape)}, layout={self.layout!r}"


class Scratch:
    """Memory for the decoded weights of one model's ``CompressedWeight``s, reused from forward to forward.

    A weight decoded into fresh memory costs the operating system's page faults
    on every forward (most of the decoding's time on some machines: memory that
    large comes from and goes back to the system each time); decoded into this
    buffer (the largest weight's size), it is written in place. The buffer is
    lent only while no tensor but the scratch itself holds its memory (not the
    last weight, a view or a detached alias of it, nor autograd for backward),
    so a weight the caller keeps is never overwritten: the next one gets fresh
    memory. Only on the CPU, with gradients off, and not while tracing
    (``torch.compile``, ``torch.export``).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._buffers: dict[torch.dtype, tuple[Tensor, int]] = {}  # each with its storage's use count when free

    def claim(self, shape: tuple[int, ...], dtype: torch.dtype, like: Tensor) -> Tensor | None:
        """A contiguous (numel,) tensor of ``dtype`` to decode into, or None to decode into fresh memory."""
        if (torch.is_grad_enabled() or like.device.type != "cpu" or type(like) is not Tensor
                or torch.compiler.is_compiling() or torch.jit.is_tracing()):
            return None
        numel = math.prod(shape)
        with self._lock:  # the check and the slice that marks the buffer lent, together
            buffer, free = self._buffers.get(dtype, (None, 0))
            if buffer is not None and _use_count(buffer) > free:
                return None  # a weight decoded into it is still alive
            if buffer is None or buffer.numel() < numel:
                del buffer
                self._buffers.pop(dtype, None)  # released before the larger one is made
                with torch.inference_mode(False):  # a normal tensor, writable outside inference mode too
                    buffer = torch.empty(numel, dtype=dtype)
                self._buffers[dtype] = buffer, _use_count(buffer)
            return buffer[:numel]

    def __deepcopy__(self, memo: dict) -> Scratch:
        return Scratch()  # a copied model gets its own, empty

    def __reduce__(self):
        return Scratch, ()


def _use_count(tensor: Tensor) -> int:
    """How many holders ``tensor``'s memory has (tensors, views, aliases, autograd's saved copies)."""
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)


def register_compressed(model: nn.Module, compressed: CompressedModel) -> nn.Module:
    """Load ``compressed`` into ``model`` in place, keeping each clustered weight compressed.

    Every clustered weight becomes a ``CompressedWeight`` parametrization
    (``torch.nn.utils.parametrize``, over an empty placeholder: the model's
    own full-size weight is released); every other tensor is copied in as
    ``load_into`` does. Weights the model ties (the file's aliases) share one
    parametrization. Outputs equal those of ``compressed.load_into(model)``;
    ``parametrize.cached()`` decodes each weight once per forward where a
    module runs several times. Returns ``model``.
    Raises RegistrationError, before changing anything, for a model that
    does not fit the file (names, shapes, dtypes, ties) or is parametrized.
    """
    _check_fits(model, compressed._declared(), compressed.aliases)
    _check_parameters(model, compressed)
    return attach(model, compressed, bitcast=True, scratch=Scratch())


def attach(
    model: nn.Module, compressed: CompressedModel, bitcast: bool = False, scratch: Scratch | None = None
) -> nn.Module:
    """``register_compressed`` without its checks, for a model already checked against the file
    (e.g. before ``copy_without_weights`` emptied the weights it replaces); bitcast, scratch (shared by
    every layer): see ``CompressedWeight``."""
    tied: dict[str, list[str]] = {}
    for alias, target in compressed.aliases.items():
        tied.setdefault(target, []).append(alias)
    digits = {bits: byte_digits(bits) for bits in (1, 2, 4, 8)}  # shared by the layers of each width
    with torch.no_grad():
        plain = dict(compressed.tensors)
        plain.update({alias: compressed.tensors[t] for alias, t in compressed.aliases.items() if t in plain})
        model.load_state_dict(plain, strict=False)
        for name, layer in compressed.layers.items():
            weight = None
            for each in (name, *tied.get(name, ())):
                weight = _parametrize(model, each, layer, weight, digits, bitcast, scratch)
    return model


def decoded_copy(model: nn.Module, compressed: CompressedModel) -> nn.Module:
    """A copy of ``model`` holding the weights of ``compressed`` decoded, as ``load_into`` gives them, bit
    for bit; ``model`` is not changed and its clustered weights are not copied. Decodes from the packed
    bytes, a layer at a time. Raises RegistrationError for a model that does not fit the file."""
    _check_fits(model, compressed._declared(), compressed.aliases)
    _check_parameters(model, compressed)
    twin = attach(copy_without_weights(model, _clustered_names(compressed)), compressed)
    decoded: dict[str, nn.Parameter] = {}
    for name in compressed.layers:
        owner, _, attr = name.rpartition(".")
        parametrize.remove_parametrizations(twin.get_submodule(owner), attr, leave_parametrized=True)
        decoded[name] = getattr(twin.get_submodule(owner), attr)
    for alias, target in compressed.aliases.items():  # the model's ties, kept
        if target in decoded:
            owner, _, attr = alias.rpartition(".")
            module = twin.get_submodule(owner)
            parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
            setattr(module, attr, decoded[target])
    return twin


def _clustered_names(compressed: CompressedModel) -> set[str]:
    """The state_dict names a CompressedWeight replaces: the clustered layers and the names tied to them."""
    return set(compressed.layers) | {a for a, t in compressed.aliases.items() if t in compressed.layers}


def copy_without_weights(model: nn.Module, names: set[str]) -> nn.Module:
    """A deep copy of ``model`` whose parameters or buffers ``names`` are empty placeholders:
    the weights a ``CompressedWeight`` will replace are not copied at full size."""
    memo: dict[int, object] = {}
    for name, tensor in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers()):
        if name in names:
            empty = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
            memo[id(tensor)] = nn.Parameter(empty, requires_grad=False) if isinstance(tensor, nn.Parameter) else empty
    return copy.deepcopy(model, memo)


def _check_parameters(model: nn.Module, compressed: CompressedModel) -> None:
    """Raise RegistrationError unless every clustered layer of the file is a parameter of ``model``."""
    names = _clustered_names(compressed)
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    buffers = sorted(names - params)
    if buffers:
        raise RegistrationError(
            f"layer '{buffers[0]}' is a buffer of the model, not a parameter; keep_compressed parametrizes "
            "parameters only: load this model with keep_compressed=False"
        )


def _parametrize(
    model: nn.Module,
    name: str,
    layer: CompressedLayer,
    weight: CompressedWeight | None,
    digits: dict[int, Tensor],
    bitcast: bool,
    scratch: Scratch | None,
) -> CompressedWeight:
    """Put a ``CompressedWeight`` of ``layer`` (or ``weight``, one already made for a tied name) over the
    parameter ``name`` of ``model``, replacing it by an empty placeholder first. Returns the parametrization."""
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner)
    current = getattr(module, attr)
    device, dtype = current.device, current.dtype
    # the placeholder is what parametrize keeps as ``original``: an empty tensor, not the full weight
    setattr(module, attr, nn.Parameter(torch.empty(0, dtype=dtype, device=device), requires_grad=False))
    del current
    if weight is None:
        weight = CompressedWeight(layer, digits.get(layer.spec.bits), bitcast, scratch).to(device)
    parametrize.register_parametrization(module, attr, weight, unsafe=True)
    return weight
