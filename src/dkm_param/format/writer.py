"""The file's writer: a CompressedModel as one canonical safetensors file, streamed and written atomically."""

from __future__ import annotations

import ctypes
import json
import math
import os
import re
import secrets
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor

from ..errors import FormatError
from ..ops import packing
from ..ops.dtypes import dtype_name
from .layer import CompressedLayer, outlier_index_dtype

if TYPE_CHECKING:
    from .model import CompressedModel

FORMAT_NAME = "dkm-param"
FORMAT_VERSION = 2
# the versions this dkm_param reads: 1 has no sparse outlier part
READABLE_VERSIONS = (1, 2)

# safetensors' names of the dtypes a file can hold
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _attr in (
    ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
    ("F8_E5M2FNUZ", "float8_e5m2fnuz"), ("F8_E8M0", "float8_e8m0fnu"),
    ("C64", "complex64"), ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
):
    if hasattr(torch, _attr):  # newer torch only
        SAFETENSORS_DTYPES[getattr(torch, _attr)] = _name

# A temporary file of ours: `.NAME.dkm-PID-RANDOM.tmp` beside the file it will replace.
_TEMP = re.compile(r"\.(?P<name>.+)\.dkm-(?P<pid>\d+)-[0-9a-f]{8}\.tmp")


def layer_description(layer: CompressedLayer) -> dict:
    """The JSON description of one layer in the file's ``layers`` metadata: its whole StorageSpec and more."""
    spec = layer.spec
    return {
        "shape": list(layer.shape),
        "dtype": dtype_name(layer.dtype),
        "bits": spec.bits,
        "dim": spec.dim,
        "vectors": layer.vectors,
        "packing": "lsb",
        "group_size": spec.group_size,
        "channel_scale": spec.channel_scale,
        "preserve_zeros": spec.preserve_zeros,
        "layout": spec.layout,
        "outliers": layer.outliers,
    }


def write_file(model: CompressedModel, path: Path) -> Path:
    """Write ``model`` to ``path`` (through a symbolic link, to its target); returns ``path``.

    The file is streamed tensor by tensor into a temporary file beside the
    target, flushed, renamed over it and the directory synced: a failed
    write leaves any old file intact. A new file gets the mode the umask
    allows, an overwritten one keeps its mode. Temporary files that an
    earlier, killed save left are removed. Equal models give equal bytes.
    Raises FormatError, before writing, for a layer the reader would refuse,
    a name used twice or a tensor dtype the format cannot hold; OSError for a
    failed write or a target that is not a regular file.
    """
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "layers": json.dumps({name: layer_description(layer) for name, layer in model.layers.items()}, sort_keys=True),
        "aliases": json.dumps(model.aliases, sort_keys=True),
    }
    return write_safetensors(path, _tensors(model), metadata)


def write_safetensors(
    path: Path, parts: dict[str, tuple[tuple[int, ...], torch.dtype, Callable[[], Tensor]]], metadata: dict[str, str]
) -> Path:
    """Write a safetensors file of ``parts`` (name -> shape, dtype, a function that makes the tensor),
    atomically as ``write_file`` does, making each tensor only when it is written."""
    sizes = {}
    for name, (shape, dtype, _) in parts.items():
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise FormatError(f"cannot save tensor {name!r}: its name is not valid text (a lone surrogate)") from None
        if dtype not in SAFETENSORS_DTYPES:
            raise FormatError(f"cannot save tensor {name!r}: dtype {dtype} has no safetensors name")
        sizes[name] = math.prod(shape) * dtype.itemsize
    # wider dtypes first, then by name: every tensor starts aligned to its element size
    order = sorted(parts, key=lambda name: (-parts[name][1].itemsize, name))
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name in order:
        shape, dtype, _ = parts[name]
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + sizes[name]]}
        offset += sizes[name]
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned

    def write(handle) -> None:
        handle.write(len(raw).to_bytes(8, "little"))
        handle.write(raw)
        for name in order:
            if sizes[name]:
                tensor = parts[name][2]()
                if tuple(tensor.shape) != tuple(parts[name][0]) or tensor.dtype != parts[name][1]:
                    raise FormatError(f"tensor {name!r} came out {tuple(tensor.shape)} {tensor.dtype}, not as declared")
                handle.write(_as_bytes(tensor))

    _write_atomic(Path(os.path.realpath(path)), write)
    return path


def _tensors(model: CompressedModel) -> dict[str, tuple[tuple[int, ...], torch.dtype, Callable[[], Tensor]]]:
    """Every tensor the file will hold: name -> (shape, dtype, a function that makes it).

    Packed indices are made only when written, one layer at a time.
    """
    parts: dict = {}
    for name in sorted(set(model.layers) & set(model.tensors)):
        raise FormatError(f"cannot save: {name!r} is both a clustered layer and a plain tensor")
    for name, layer in model.layers.items():
        problem = layer.problem()
        if problem:
            raise FormatError(f"cannot save layer {name!r}: {problem}")
    for name in [*model.aliases, *model.aliases.values()]:
        if not isinstance(name, str):
            raise FormatError(f"cannot save: alias names must be str, got {name!r}")

    def add(name: str, shape, dtype: torch.dtype, make: Callable[[], Tensor]) -> None:
        if name in parts:
            raise FormatError(f"cannot save: the name {name!r} is used twice (a layer's part and a tensor?)")
        parts[name] = (tuple(int(s) for s in shape), dtype, make)

    for name, layer in model.layers.items():
        add(f"{name}.codebook", layer.codebook.shape, layer.codebook.dtype, lambda t=layer.codebook: t)
        size = packing.packed_size(layer.vectors, layer.spec.bits)
        add(f"{name}.indices", (size,), torch.uint8, lambda layer=layer: layer.packed)
        if layer.scale is not None:
            add(f"{name}.scale", layer.scale.shape, layer.scale.dtype, lambda t=layer.scale: t)
        if layer.outliers:
            index_dtype = outlier_index_dtype(layer.numel)
            add(f"{name}.outlier_index", (layer.outliers,), index_dtype,
                lambda t=layer.outlier_index, d=index_dtype: t.to(d))
            add(f"{name}.outlier_value", (layer.outliers,), layer.dtype, lambda t=layer.outlier_value: t)
    for name, tensor in model.tensors.items():
        add(name, tensor.shape, tensor.dtype, lambda t=tensor: t)
    taken = set(model.layers) | set(model.tensors)
    for alias, target in model.aliases.items():
        try:
            alias.encode("utf-8"), target.encode("utf-8")
        except UnicodeEncodeError:
            raise FormatError(f"cannot save alias {alias!r}: a name is not valid text (a lone surrogate)") from None
        if alias in taken or alias in parts:
            raise FormatError(f"cannot save: alias {alias!r} is also the name of a stored layer or tensor")
        if target not in taken:
            raise FormatError(f"cannot save: alias {alias!r} points at {target!r}, neither a layer nor a tensor")
    return parts


def _as_bytes(tensor: Tensor) -> memoryview:
    """The tensor's bytes, little-endian as safetensors wants, without another copy where it is already contiguous.

    Read through ctypes, not numpy: numpy is not a dependency of dkm-param.
    """
    flat = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    if not flat.numel():
        return memoryview(b"")
    raw = (ctypes.c_char * flat.numel()).from_address(flat.data_ptr())
    raw.owner = flat  # the tensor's memory lives as long as this view of it
    return memoryview(raw).cast("B")


def _write_atomic(path: Path, write: Callable) -> None:
    """Call ``write(handle)`` on a temporary file beside ``path``, then rename it over ``path``."""
    parent = path.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"cannot save {path}: directory {parent} does not exist")
    try:
        kind = path.stat().st_mode
    except FileNotFoundError:
        kind = None
    if kind is not None and stat.S_ISDIR(kind):
        raise IsADirectoryError(f"cannot save {path}: it is a directory; give a file name")
    if kind is not None and not stat.S_ISREG(kind):
        raise FileExistsError(f"cannot save over {path}: it is not a regular file (a pipe, device or socket)")
    _remove_stale_temporaries(path)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)  # an overwritten file keeps its mode
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    tmp = parent / f".{path.name}.dkm-{os.getpid()}-{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    _sync_directory(parent)


def _remove_stale_temporaries(path: Path) -> None:
    """Delete the temporary files of saves to ``path`` whose process is gone (killed mid-save)."""
    try:
        names = os.listdir(path.parent)
    except OSError:
        return
    for name in names:
        match = _TEMP.fullmatch(name)
        if match is None or match["name"] != path.name or _alive(int(match["pid"])):
            continue
        try:
            os.unlink(path.parent / name)
        except OSError:
            pass  # gone already, or not ours to remove


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # someone else's process: leave its file alone
    return True


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _sync_directory(directory: Path) -> None:
    """fsync the directory, so that the rename itself survives a crash (where the system allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


