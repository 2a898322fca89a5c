"""finalize, CompressedModel and the safetensors file format.

A CompressedModel is data, not modules: per clustered weight a codebook and
its indices, plus the model's other tensors. Saving and loading never run
the training code paths.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import layout, packing
from .errors import DKMError, FormatError, RegistrationError
from .policy import LayerPlan
from .progress import track
from .register import dkm_parametrizations, registered_plan
from .compressed import CompressedLayer
from .spec import LayerSpec

FORMAT_NAME = "dkm-param"
FORMAT_VERSION = 1

_DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES[dtype]


@dataclass
class CompressedModel:
    """A model as codebooks, indices and plain tensors, ready to save.

    layers: clustered weights by state_dict name; tensors: every other entry
    of the state_dict; aliases: names that hold the same tensor as another
    (tied weights), stored once; skipped: the plan rows of layers left
    uncompressed, with their reasons (empty when the plan is unknown).
    """

    layers: dict[str, CompressedLayer]
    tensors: dict[str, Tensor]
    aliases: dict[str, str] = field(default_factory=dict)
    skipped: list[LayerPlan] = field(default_factory=list)

    def state_dict(self) -> dict[str, Tensor]:
        """The decoded model weights, as a plain state_dict."""
        state = dict(self.tensors)
        state.update({name: layer.weight() for name, layer in self.layers.items()})
        for alias, target in self.aliases.items():
            state[alias] = state[target]
        return state

    def load_into(self, model: nn.Module) -> nn.Module:
        """Copy the decoded weights into ``model`` (an ordinary, unregistered model)."""
        return _load_state(model, self.state_dict())

    def save(self, path: str | os.PathLike) -> Path:
        """Write one .safetensors file atomically: a failed save leaves any old file intact."""
        tensors: dict[str, Tensor] = {}
        layers_meta = {}
        for name, layer in self.layers.items():
            tensors[f"{name}.codebook"] = layer.codebook.detach().cpu().contiguous()
            tensors[f"{name}.indices"] = packing.pack(layer.indices.cpu(), layer.spec.bits)
            layers_meta[name] = {
                "shape": list(layer.shape),
                "dtype": dtype_name(layer.dtype),
                "bits": layer.spec.bits,
                "dim": layer.spec.dim,
                "vectors": layer.indices.numel(),
                "packing": "lsb",
            }
            if layer.codebook.dim() == 3:
                layers_meta[name]["group_size"] = layer.spec.group_size
            if layer.spec.layout != "flat":
                layers_meta[name]["layout"] = layer.spec.layout
            if layer.scale is not None:
                tensors[f"{name}.scale"] = layer.scale.detach().cpu().contiguous()
        for name, tensor in self.tensors.items():
            tensors[name] = tensor.detach().cpu().contiguous()
        metadata = {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "layers": json.dumps(layers_meta),
            "aliases": json.dumps(self.aliases),
        }
        path = Path(path)
        _write_atomic(path, _canonical(save(tensors, metadata=metadata)))
        return path

    def summary(self):
        """Per-layer bits, dim, sizes, and the totals; prints as a table."""
        from .report import summarize

        return summarize(self)


def _canonical(blob: bytes) -> bytes:
    """The same safetensors file with its header's keys sorted.

    safetensors keeps metadata in a hash map whose order changes from process
    to process; sorting makes equal models give byte-identical files. Data
    offsets are relative to the end of the header, so they stay valid.
    """
    size = int.from_bytes(blob[:8], "little")
    header = json.dumps(json.loads(blob[8 : 8 + size]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # keep the data 8-byte aligned
    return len(header).to_bytes(8, "little") + header + blob[8 + size :]


def _write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, then rename it over ``path``."""
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot save {path}: directory {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            _write_all(handle, data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_all(handle, data: bytes) -> None:
    view = memoryview(data)
    for start in range(0, len(view), 1 << 24):
        handle.write(view[start : start + (1 << 24)])


def finalize(model: nn.Module, codebook_dtype: torch.dtype | None = None) -> CompressedModel:
    """Snap every DKM weight to its nearest centroid and take DKM off the model.

    Afterwards ``model`` is an ordinary model holding the snapped weights
    (``remove_parametrizations(..., leave_parametrized=True)``).
    codebook_dtype: dtype the codebooks are stored in (default: each weight's
    own dtype); the snapped weights use the rounded codebook, so a saved file
    reproduces them bit for bit.
    Also takes off the codebooks ``finetune_codebooks`` attached.
    Raises RegistrationError when no weight has DKM registered.
    """
    found = list(dkm_parametrizations(model))
    if not found:
        raise RegistrationError("no weight has DKM registered; call dp.register_dkm(model, policy) first")
    groups: dict[int, list[tuple[str, nn.Module]]] = {}
    params = {}
    for name, module, param in found:
        groups.setdefault(id(param), []).append((name, module))
        params[id(param)] = param
    layers: dict[str, CompressedLayer] = {}
    aliases: dict[str, str] = {}
    for key, members in track(groups.items(), total=len(groups), desc="finalizing"):
        param = params[key]
        # the layer the plan chose leads; the others alias its weight
        members.sort(key=lambda member: member[0] != param.name)
        (lead_name, lead), followers = members[0], members[1:]
        layers[weight_key(lead_name)] = _snap_and_remove(param, lead, lead_name, codebook_dtype)
        for name, module in followers:
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
            aliases[weight_key(name)] = weight_key(lead_name)
    plan = registered_plan(model)
    return assemble(model.state_dict(), layers, aliases, plan.skipped() if plan is not None else [])


def assemble(
    state: dict[str, Tensor], layers: dict[str, CompressedLayer], aliases: dict[str, str], skipped
) -> CompressedModel:
    """A CompressedModel of ``layers`` plus every other tensor of ``state`` (a state_dict)."""
    aliases = dict(aliases)
    tensors, shared = _plain_tensors(state, skip=set(layers) | set(aliases))
    aliases.update(shared)
    return CompressedModel(layers=layers, tensors=tensors, aliases=aliases, skipped=list(skipped))


def weight_key(module_name: str) -> str:
    """The state_dict key of a module's weight."""
    return f"{module_name}.weight" if module_name else "weight"


def _snap_and_remove(param, module: nn.Module, name: str, codebook_dtype: torch.dtype | None) -> CompressedLayer:
    original = module.parametrizations.weight.original
    stored = codebook_dtype or original.dtype
    if stored not in _DTYPE_NAMES:
        raise FormatError(f"codebook dtype {stored} is not supported; use one of {', '.join(_DTYPES)}")
    with torch.no_grad():
        layer = param.export(original, stored)
        param.eval()
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    if not torch.equal(module.weight, layer.weight()):  # snapping is deterministic; guard the contract
        raise DKMError(f"layer '{name}': snapped weight differs from its codebook and indices")
    return layer


def _plain_tensors(state: dict[str, Tensor], skip: set[str]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The state_dict entries not in ``skip``, with tensors sharing storage stored once."""
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in state.items():
        if name in skip:
            continue
        ident = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))
        if tensor.numel() and ident in seen:
            aliases[name] = seen[ident]
            continue
        seen[ident] = name
        tensors[name] = tensor.detach().cpu()
    return tensors, aliases


# -- reading ---------------------------------------------------------------


def read_compressed(path: str | os.PathLike) -> CompressedModel:
    """Read and validate a dkm-param file. Raises FormatError on a bad file."""
    path = Path(path)
    try:
        handle = safe_open(str(path), framework="pt")
    except FileNotFoundError:
        raise
    except Exception as exc:  # safetensors raises its own errors for bad headers
        raise FormatError(f"{path}: not a readable safetensors file ({exc})") from None
    with handle as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT_NAME:
            raise FormatError(f"{path}: format is {meta.get('format')!r}, expected {FORMAT_NAME!r}")
        version = meta.get("format_version")
        if version != str(FORMAT_VERSION):
            raise FormatError(
                f"{path}: format version {version!r} is not supported (this dkm_param reads {FORMAT_VERSION}); "
                "upgrade dkm_param to read newer files"
            )
        layers_meta = _json(path, meta, "layers")
        aliases = _json(path, meta, "aliases")
        keys = set(f.keys())
        layers = {name: _read_layer(path, f, keys, name, info) for name, info in layers_meta.items()}
        used = {f"{n}.{part}" for n in layers for part in ("codebook", "indices", "scale")}
        tensors = {k: f.get_tensor(k) for k in sorted(keys - used)}
    for alias, target in aliases.items():
        if target not in layers and target not in tensors:
            raise FormatError(f"{path}: alias {alias!r} points at {target!r}, which the file does not hold")
    return CompressedModel(layers=layers, tensors=tensors, aliases=aliases)


def load_compressed(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Load a dkm-param file into ``model``: its weights become the snapped weights, bit for bit."""
    return read_compressed(path).load_into(model)


def _json(path: Path, meta: dict, key: str) -> dict:
    try:
        value = json.loads(meta.get(key, "{}"))
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: metadata {key!r} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise FormatError(f"{path}: metadata {key!r} must be a JSON object")
    return value


def _read_layer(path: Path, f, keys: set[str], name: str, info) -> CompressedLayer:
    where = f"{path}: layer {name!r}"
    if not isinstance(info, dict):
        raise FormatError(f"{where}: description must be a JSON object")
    try:
        shape = tuple(int(s) for s in info["shape"])
        bits, dim, vectors = int(info["bits"]), int(info["dim"]), int(info["vectors"])
        dtype = _DTYPES[info["dtype"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise FormatError(f"{where}: bad or missing field in its description ({exc!r})") from None
    if info.get("packing", "lsb") != "lsb":
        raise FormatError(f"{where}: unknown packing {info.get('packing')!r}")
    if not 1 <= bits <= 8 or dim < 1 or any(s < 0 for s in shape):
        raise FormatError(f"{where}: bits={bits}, dim={dim}, shape={shape} are out of range")
    if vectors * dim != math.prod(shape):
        raise FormatError(f"{where}: {vectors} vectors of dim {dim} do not make shape {shape}")
    for part in ("codebook", "indices"):
        if f"{name}.{part}" not in keys:
            raise FormatError(f"{where}: tensor {name}.{part} is missing")
    group_size = info.get("group_size")
    rows = layout.rows(shape)
    if group_size is not None and (not isinstance(group_size, int) or group_size < 1 or rows % group_size):
        raise FormatError(f"{where}: group_size {group_size!r} does not divide its {rows} output channels")
    groups = layout.groups(shape, group_size)
    if vectors % groups:
        raise FormatError(f"{where}: {vectors} vectors do not split into {groups} groups")
    codebook_shape = tuple(f.get_slice(f"{name}.codebook").get_shape())
    lead = (groups,) if group_size is not None else ()
    if (
        len(codebook_shape) != len(lead) + 2
        or codebook_shape[: len(lead)] != lead
        or codebook_shape[-1] != dim
        or not 1 <= codebook_shape[-2] <= (1 << bits)
    ):
        raise FormatError(f"{where}: codebook shape {codebook_shape} does not fit bits={bits}, dim={dim}, groups={groups}")
    scale = None
    if f"{name}.scale" in keys:
        if tuple(f.get_slice(f"{name}.scale").get_shape()) != (rows,):
            raise FormatError(f"{where}: scale must have shape ({rows},)")
        scale = f.get_tensor(f"{name}.scale")
        if scale.dtype not in _DTYPE_NAMES or not torch.isfinite(scale).all():
            raise FormatError(f"{where}: scale must be finite floats")
    indices_shape = tuple(f.get_slice(f"{name}.indices").get_shape())
    if indices_shape != (packing.packed_size(vectors, bits),):
        raise FormatError(
            f"{where}: packed indices have shape {indices_shape}, expected ({packing.packed_size(vectors, bits)},)"
        )
    packed = f.get_tensor(f"{name}.indices")
    if packed.dtype != torch.uint8:
        raise FormatError(f"{where}: packed indices must be uint8, got {packed.dtype}")
    codebook = f.get_tensor(f"{name}.codebook")
    if codebook.dtype not in _DTYPE_NAMES:
        raise FormatError(f"{where}: codebook dtype {codebook.dtype} is not supported")
    if not torch.isfinite(codebook).all():
        raise FormatError(f"{where}: codebook holds NaN or Inf")
    indices = packing.unpack(packed, bits, vectors)
    entries = codebook.shape[-2]
    if vectors and int(indices.max()) >= entries:
        raise FormatError(f"{where}: index {int(indices.max())} is out of range of a {entries}-entry codebook")
    vector_layout = info.get("layout", "flat")
    if vector_layout not in ("flat", "input"):
        raise FormatError(f"{where}: unknown layout {vector_layout!r}")
    spec = LayerSpec(bits=bits, dim=dim, group_size=group_size, channel_scale=scale is not None, layout=vector_layout)
    return CompressedLayer(
        shape=shape, dtype=dtype, spec=spec, codebook=codebook, indices=indices.to(torch.uint8), scale=scale
    )


def _load_state(model: nn.Module, state: dict[str, Tensor]) -> nn.Module:
    if next(dkm_parametrizations(model), None) is not None:
        raise RegistrationError("model has DKM registered; load into a plain model (or call dp.remove_dkm first)")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    mismatched += [
        f"{k}: file {state[k].dtype} vs model {own[k].dtype}"
        for k in own
        if k in state and tuple(state[k].shape) == tuple(own[k].shape) and state[k].dtype != own[k].dtype
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing from the file: {_few(missing)}")
        if unexpected:
            parts.append(f"not in the model: {_few(unexpected)}")
        if mismatched:
            parts.append(f"shape or dtype differs: {_few(mismatched)}")
        raise RegistrationError("file does not fit the model; " + "; ".join(parts))
    model.load_state_dict(state, strict=True)
    return model


def _few(items: list[str], limit: int = 5) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
