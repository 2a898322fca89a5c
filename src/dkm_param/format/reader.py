"""The file's strict reader: every metadata field, name and tensor shape checked before a tensor is read."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from ..errors import FormatError, SpecError
from ..ops import layout, packing
from ..ops.dtypes import DTYPES
from ..spec import LAYOUTS, MAX_BITS, StorageSpec
from ..tables import natural_key
from .layer import CompressedLayer
from .model import CompressedModel
from .writer import FORMAT_NAME, READABLE_VERSIONS

# safetensors refuses larger headers; so do we, before it reads one.
MAX_HEADER_BYTES = 100_000_000
# A header may take this much, plus this many bytes per byte of tensor data: names,
# shapes and descriptions of the smallest tensors stay far below it; a header that
# would swamp the parser with little data behind it is refused unread.
_HEADER_BASE = 1 << 20
_HEADER_PER_DATA_BYTE = 64
# The JSON metadata a file may hold: this much, plus this much per tensor it stores.
_METADATA_BASE = 1 << 16
_METADATA_PER_TENSOR = 1 << 12
_ALIASES_BASE = 1 << 20
# ... and at most this many JSON objects and arrays, plus two per tensor
_CONTAINERS_BASE = 64
_LAYER_KEYS = ("shape", "dtype", "bits", "dim", "vectors", "packing", "group_size", "channel_scale",
               "preserve_zeros", "layout", "outliers")
_PARTS = ("codebook", "indices", "scale", "outlier_index", "outlier_value")
_REQUIRED = ("shape", "dtype", "bits", "dim", "vectors")
_MAX_DIMS = 16
_MAX_COUNT = 1 << 62


def read_compressed(path: str | os.PathLike) -> CompressedModel:
    """Read and validate a dkm-param file; decodes nothing.

    Every metadata field must have its exact JSON type and lie in range, every
    name must be unique across layers, plain tensors and aliases, and every
    tensor's shape and dtype must fit its layer, all checked before the
    tensors are read; decoded weights must be finite in their dtype.
    Memory stays within a small multiple of the file's size.
    Raises FormatError for anything else, FileNotFoundError for a missing file.
    """
    path = Path(path)
    entries = _check_header(path)
    try:
        handle = safe_open(str(path), framework="pt")
    except FileNotFoundError:
        raise
    except Exception as exc:  # safetensors raises its own errors for bad headers
        raise FormatError(f"{path}: not a readable safetensors file ({_short(str(exc), 200)})") from None
    with handle as f:
        meta = f.metadata() or {}
        keys = set(f.keys())
        if entries != len(keys):
            raise FormatError(
                f"{path}: the header describes {entries} tensors under {len(keys)} names: a tensor is given twice"
            )
        if meta.get("format") != FORMAT_NAME:
            raise FormatError(f"{path}: format is {_short(meta.get('format'))}, expected {FORMAT_NAME!r}")
        version = meta.get("format_version")
        if version not in [str(v) for v in READABLE_VERSIONS]:
            raise FormatError(
                f"{path}: format version {_short(version)} is not supported (this dkm_param reads "
                f"{', '.join(map(str, READABLE_VERSIONS))}); upgrade dkm_param to read newer files"
            )
        # descriptions take a few hundred bytes and two JSON containers a layer, aliases one container in
        # all; bounds checked on the text, so that the parse cannot swamp memory
        containers = _CONTAINERS_BASE + 2 * len(keys)
        layers_meta = _json_object(path, meta, "layers", _METADATA_BASE + _METADATA_PER_TENSOR * len(keys), containers)
        # aliases name the model's state_dict entries that share a stored tensor: a megabyte of
        # names is already far more than any model has
        aliases = _json_object(path, meta, "aliases", _ALIASES_BASE + _METADATA_PER_TENSOR * len(keys), containers)
        layers = {  # in natural order: layers.2 before layers.11
            name: _read_layer(path, f, keys, name, layers_meta[name], int(version))
            for name in sorted(layers_meta, key=natural_key)
        }
        plain = keys - {f"{n}.{part}" for n in layers for part in _PARTS}
        _check_names(path, layers, plain, aliases)
        tensors = {k: _tensor(path, f, k) for k in sorted(plain, key=natural_key)}
    return CompressedModel(layers=layers, tensors=tensors, aliases=aliases)


def load_compressed(path: str | os.PathLike, model: nn.Module, keep_compressed: bool = False) -> nn.Module:
    """Load a dkm-param file into ``model`` in place: its weights become the snapped weights, bit for bit.

    The file is checked whole, and against the model's names, shapes and
    dtypes, before anything is decoded; layers are then decoded one at a time.
    keep_compressed: keep each clustered weight as its codebook and packed
        indices instead (a ``CompressedWeight`` parametrization, the model's
        full-size weight released) and decode it each time it is used: the
        model then takes about the file's size in memory, plus the largest
        decoded weight while it runs, and gives the same outputs.
    Returns ``model``. Raises RegistrationError for a model that does not fit.
    """
    compressed = read_compressed(path)
    if keep_compressed:
        from ..deploy.inmemory import register_compressed  # deploy code only when asked for

        return register_compressed(model, compressed)
    return compressed.load_into(model)


def _check_header(path: Path) -> int:
    """Check the header's size against the file before safetensors parses it; returns how many
    tensor entries its text holds, repeated names included (safetensors keeps one of each)."""
    try:
        with open(path, "rb") as handle:
            first = handle.read(8)
            size = os.fstat(handle.fileno()).st_size
            header = int.from_bytes(first, "little") if len(first) == 8 else 0
            if len(first) < 8:
                raise FormatError(f"{path}: {size} bytes is too short for a safetensors file")
            if header > min(size - 8, MAX_HEADER_BYTES):
                raise FormatError(f"{path}: header of {header} bytes does not fit the file's {size} bytes or 100 MB")
            data = size - 8 - header
            if header > _HEADER_BASE + _HEADER_PER_DATA_BYTE * data:
                raise FormatError(
                    f"{path}: a header of {header} bytes for {data} bytes of tensors is more than any model needs; "
                    "this is not a file dkm_param wrote"
                )
            text = handle.read(header)
    except IsADirectoryError:
        raise FormatError(f"{path}: is a directory, not a safetensors file") from None
    # Inside JSON strings a quote is escaped, so a quoted name followed by a colon is a key:
    # the metadata is an object of strings, a tensor's entry an object.
    for key, value in ((b"__metadata__", rb"\{"), (b"format", b'"'), (b"format_version", b'"'), (b"layers", b'"'),
                       (b"aliases", b'"')):
        if len(re.findall(rb'"' + key + rb'"\s*:\s*' + value, text)) > 1:
            raise FormatError(f"{path}: the header gives {key.decode()!r} twice; JSON readers differ on which counts")
    return text.count(b'"data_offsets"')


def _json_object(path: Path, meta: dict, key: str, budget: int, containers: int) -> dict:
    """Metadata ``key`` parsed as a JSON object; refused unread when its text is larger than
    ``budget`` bytes or opens more than ``containers`` objects and arrays, and refused when a
    key repeats (JSON parsers differ on which of the two they keep)."""
    text = meta.get(key, "{}")
    if len(text) > budget:
        raise FormatError(
            f"{path}: metadata {key!r} is {len(text)} bytes, more than a file of its tensors can need ({budget})"
        )
    opened = text.count("{") + text.count("[")
    if opened > containers:
        raise FormatError(
            f"{path}: metadata {key!r} opens {opened} JSON objects and arrays, more than a file of its tensors "
            f"can need ({containers})"
        )
    try:
        value = json.loads(text, parse_constant=_no_constant, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError, and so is a huge integer
        raise FormatError(f"{path}: metadata {key!r} is not valid JSON ({_short(str(exc), 120)})") from None
    if not isinstance(value, dict):
        raise FormatError(f"{path}: metadata {key!r} must be a JSON object, got {type(value).__name__}")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    found = dict(pairs)
    if len(found) != len(pairs):
        seen: set[str] = set()
        repeated = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {_short(repeated)} appears twice")
    return found


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _check_names(path: Path, layers: dict, plain: set[str], aliases: dict) -> None:
    """Every name the state_dict will hold is given once; aliases point at a stored layer or tensor."""
    for name in sorted(plain & set(layers)):
        raise FormatError(f"{path}: {_short(name)} is both a clustered layer and a plain tensor; a name is stored once")
    for alias, target in aliases.items():
        if not isinstance(target, str):
            raise FormatError(f"{path}: alias {_short(alias)} must name a tensor, got {type(target).__name__}")
        if alias in layers or alias in plain:
            raise FormatError(f"{path}: alias {_short(alias)} is also the name of a stored layer or tensor")
        if target not in layers and target not in plain:
            raise FormatError(f"{path}: alias {_short(alias)} points at {_short(target)}, which the file does not hold")


def _read_layer(path: Path, f, keys: set[str], name: str, info: Any, version: int) -> CompressedLayer:
    where = f"{path}: layer {_short(name)}"
    if not isinstance(info, dict):
        raise FormatError(f"{where}: description must be a JSON object, got {type(info).__name__}")
    known = _LAYER_KEYS if version >= 2 else _LAYER_KEYS[:-1]  # version 1 has no outliers
    unknown = sorted(set(info) - set(known))
    if unknown:
        raise FormatError(
            f"{where}: unknown key(s) {_short(unknown)}; format version {version} knows {', '.join(known)}"
        )
    missing = [key for key in _REQUIRED if key not in info]
    if missing:
        raise FormatError(f"{where}: description lacks {', '.join(missing)}")
    shape = info["shape"]
    if not isinstance(shape, list) or not 1 <= len(shape) <= _MAX_DIMS:
        raise FormatError(f"{where}: shape must be a list of 1 to {_MAX_DIMS} integers, got {_short(shape)}")
    shape = tuple(_int(where, "shape", s, 1, _MAX_COUNT) for s in shape)
    bits = _int(where, "bits", info["bits"], 1, MAX_BITS)
    dim = _int(where, "dim", info["dim"], 1, _MAX_COUNT)
    vectors = _int(where, "vectors", info["vectors"], 1, _MAX_COUNT)
    dtype = DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
    if dtype is None:
        raise FormatError(f"{where}: dtype must be one of {', '.join(DTYPES)}, got {_short(info['dtype'])}")
    if info.get("packing", "lsb") != "lsb":
        raise FormatError(f"{where}: unknown packing {_short(info.get('packing'))}; this dkm_param reads 'lsb'")
    numel = math.prod(shape)
    if vectors * dim != numel:
        raise FormatError(f"{where}: {vectors} vectors of dim {dim} do not make shape {shape}")
    group_size = info.get("group_size")
    if group_size is not None:
        group_size = _int(where, "group_size", group_size, 1, _MAX_COUNT)
    layout_name = info.get("layout", "flat")
    if layout_name not in LAYOUTS:
        raise FormatError(f"{where}: layout must be one of {', '.join(LAYOUTS)}, got {_short(layout_name)}")
    for part in ("codebook", "indices"):
        if f"{name}.{part}" not in keys:
            raise FormatError(f"{where}: tensor {_short(name + '.' + part)} is missing")
    has_scale = f"{name}.scale" in keys
    # files written before the whole StorageSpec was stored lack the last keys
    channel_scale = _flag(where, "channel_scale", info.get("channel_scale", has_scale))
    if channel_scale is not has_scale:
        there = "there" if has_scale else "not there"
        raise FormatError(f"{where}: channel_scale is {channel_scale} but the scale tensor is {there}")
    try:
        spec = StorageSpec(
            bits=bits,
            dim=dim,
            group_size=group_size,
            channel_scale=channel_scale,
            preserve_zeros=_flag(where, "preserve_zeros", info.get("preserve_zeros", False)),
            layout=layout_name,
        )
    except SpecError as exc:
        raise FormatError(f"{where}: {exc}") from None
    rows = layout.rows(shape)
    if group_size is not None and rows % group_size:
        raise FormatError(f"{where}: group_size {group_size} does not divide its {rows} output channels")
    groups = layout.groups(shape, group_size)
    if vectors % groups:
        raise FormatError(f"{where}: {vectors} vectors do not split into {groups} groups")
    if layout_name == "input" and len(shape) > 2 and shape[1] % dim:
        raise FormatError(f"{where}: dim {dim} does not divide its {shape[1]} input channels (layout 'input')")
    if spec.per_channel and (numel // rows) % dim:
        raise FormatError(f"{where}: dim {dim} does not divide an output channel's {numel // rows} values")
    codebook_shape = _shape(path, f, f"{name}.codebook")
    lead = (groups,) if group_size is not None else ()
    if (
        len(codebook_shape) != len(lead) + 2
        or codebook_shape[: len(lead)] != lead
        or codebook_shape[-1] != dim
        or not 1 <= codebook_shape[-2] <= (1 << bits)
    ):
        raise FormatError(
            f"{where}: codebook shape {codebook_shape} does not fit bits={bits}, dim={dim}, groups={groups}"
        )
    indices_shape = _shape(path, f, f"{name}.indices")
    if indices_shape != (packing.packed_size(vectors, bits),):
        raise FormatError(
            f"{where}: packed indices have shape {indices_shape}, expected ({packing.packed_size(vectors, bits)},)"
        )
    if has_scale and _shape(path, f, f"{name}.scale") != (rows,):
        raise FormatError(f"{where}: scale must have shape ({rows},)")
    outliers = _int(where, "outliers", info.get("outliers", 0), 0, numel)
    sparse = [f"{name}.{part}" for part in ("outlier_index", "outlier_value")]
    for part in sparse:
        there = part in keys
        if there != bool(outliers):
            raise FormatError(
                f"{where}: outliers is {outliers} but tensor {_short(part)} is {'there' if there else 'missing'}"
            )
        if there and _shape(path, f, part) != (outliers,):
            raise FormatError(f"{where}: tensor {_short(part)} must have shape ({outliers},), as outliers says")
    packed = _tensor(path, f, f"{name}.indices")
    if packed.dtype != torch.uint8:
        raise FormatError(f"{where}: packed indices must be uint8, got {packed.dtype}")
    layer = CompressedLayer(
        shape=shape,
        dtype=dtype,
        spec=spec,
        codebook=_tensor(path, f, f"{name}.codebook"),
        indices=packing.unpack(packed, bits, vectors),
        scale=_tensor(path, f, f"{name}.scale") if has_scale else None,
        outlier_index=_tensor(path, f, sparse[0]) if outliers else None,
        outlier_value=_tensor(path, f, sparse[1]) if outliers else None,
    )
    problem = layer.problem()  # what the tensors hold: finite values, indices in range, no overflow
    if problem:
        raise FormatError(f"{where}: {problem}")
    if outliers:
        layer.outlier_index = layer.outlier_index.long()
    return layer


def _int(where: str, key: str, value: Any, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise FormatError(f"{where}: {key} must be an integer in {low}..{high}, got {_short(value)}")
    return value


def _flag(where: str, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise FormatError(f"{where}: {key} must be true or false, got {_short(value)}")
    return value


def _shape(path: Path, f, name: str) -> tuple[int, ...]:
    try:
        return tuple(f.get_slice(name).get_shape())
    except Exception as exc:  # safetensors' own error types
        raise FormatError(f"{path}: tensor {_short(name)} cannot be read ({_short(str(exc), 120)})") from None


def _tensor(path: Path, f, name: str) -> Tensor:
    try:
        return f.get_tensor(name)
    except Exception as exc:  # e.g. a dtype this torch does not have
        raise FormatError(f"{path}: tensor {_short(name)} cannot be read ({_short(str(exc), 120)})") from None


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters: hostile values can be megabytes long."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
