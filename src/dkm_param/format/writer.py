"""The file's writer: a CompressedModel as one canonical safetensors file, written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors.torch import save
from torch import Tensor

from ..ops import packing
from ..ops.dtypes import dtype_name
from .layer import CompressedLayer

if TYPE_CHECKING:
    from .model import CompressedModel

FORMAT_NAME = "dkm-param"
FORMAT_VERSION = 1


def layer_description(layer: CompressedLayer) -> dict:
    """The JSON description of one layer in the file's ``layers`` metadata: its whole StorageSpec and more."""
    spec = layer.spec
    return {
        "shape": list(layer.shape),
        "dtype": dtype_name(layer.dtype),
        "bits": spec.bits,
        "dim": spec.dim,
        "vectors": layer.indices.numel(),
        "packing": "lsb",
        "group_size": spec.group_size,
        "channel_scale": spec.channel_scale,
        "preserve_zeros": spec.preserve_zeros,
        "layout": spec.layout,
    }


def write_file(model: CompressedModel, path: Path) -> Path:
    """Write ``model`` to ``path``: a failed write leaves any old file intact."""
    tensors: dict[str, Tensor] = {}
    layers_meta = {}
    for name, layer in model.layers.items():
        tensors[f"{name}.codebook"] = layer.codebook.detach().cpu().contiguous()
        tensors[f"{name}.indices"] = packing.pack(layer.indices.cpu(), layer.spec.bits)
        if layer.scale is not None:
            tensors[f"{name}.scale"] = layer.scale.detach().cpu().contiguous()
        layers_meta[name] = layer_description(layer)
    for name, tensor in model.tensors.items():
        tensors[name] = tensor.detach().cpu().contiguous()
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "layers": json.dumps(layers_meta),
        "aliases": json.dumps(model.aliases),
    }
    _write_atomic(path, _canonical(save(tensors, metadata=metadata)))
    return path


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
