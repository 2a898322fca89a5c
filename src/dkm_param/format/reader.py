"""The file's strict reader: every field and tensor shape checked before the tensors are read."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..errors import FormatError, SpecError
from ..ops import layout, packing
from ..ops.dtypes import DTYPES, is_supported
from ..spec import StorageSpec
from .layer import CompressedLayer
from .model import CompressedModel
from .writer import FORMAT_NAME, FORMAT_VERSION


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
    """Load a dkm-param file into ``model`` in place: its weights become the snapped weights, bit for bit."""
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
        dtype = DTYPES[info["dtype"]]
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
    has_scale = f"{name}.scale" in keys
    # files written before the whole StorageSpec was stored lack the last three keys
    channel_scale = info.get("channel_scale", has_scale)
    if channel_scale is not has_scale:
        raise FormatError(
            f"{where}: channel_scale is {channel_scale!r} but the scale tensor is {'' if has_scale else 'not '}there"
        )
    try:
        spec = StorageSpec(
            bits=bits,
            dim=dim,
            group_size=info.get("group_size"),
            channel_scale=channel_scale,
            preserve_zeros=info.get("preserve_zeros", False),
            layout=info.get("layout", "flat"),
        )
    except SpecError as exc:
        raise FormatError(f"{where}: {exc}") from None
    rows = layout.rows(shape)
    if spec.group_size is not None and rows % spec.group_size:
        raise FormatError(f"{where}: group_size {spec.group_size!r} does not divide its {rows} output channels")
    groups = layout.groups(shape, spec.group_size)
    if vectors % groups:
        raise FormatError(f"{where}: {vectors} vectors do not split into {groups} groups")
    codebook_shape = tuple(f.get_slice(f"{name}.codebook").get_shape())
    lead = (groups,) if spec.group_size is not None else ()
    if (
        len(codebook_shape) != len(lead) + 2
        or codebook_shape[: len(lead)] != lead
        or codebook_shape[-1] != dim
        or not 1 <= codebook_shape[-2] <= (1 << bits)
    ):
        raise FormatError(
            f"{where}: codebook shape {codebook_shape} does not fit bits={bits}, dim={dim}, groups={groups}"
        )
    scale = None
    if has_scale:
        if tuple(f.get_slice(f"{name}.scale").get_shape()) != (rows,):
            raise FormatError(f"{where}: scale must have shape ({rows},)")
        scale = f.get_tensor(f"{name}.scale")
        if not is_supported(scale.dtype) or not torch.isfinite(scale).all():
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
    if not is_supported(codebook.dtype):
        raise FormatError(f"{where}: codebook dtype {codebook.dtype} is not supported")
    if not torch.isfinite(codebook).all():
        raise FormatError(f"{where}: codebook holds NaN or Inf")
    if spec.preserve_zeros and (codebook[..., 0, :] != 0).any():
        raise FormatError(f"{where}: preserve_zeros is set but codebook entry 0 is not zero")
    indices = packing.unpack(packed, bits, vectors)
    entries = codebook.shape[-2]
    if vectors and int(indices.max()) >= entries:
        raise FormatError(f"{where}: index {int(indices.max())} is out of range of a {entries}-entry codebook")
    return CompressedLayer(
        shape=shape, dtype=dtype, spec=spec, codebook=codebook, indices=indices.to(torch.uint8), scale=scale
    )
