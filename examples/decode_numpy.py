"""Decode a dkm-param file with numpy and safetensors alone (no torch, no dkm_param)."""

import json
import sys

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file

try:  # numpy has no bfloat16 of its own: ml_dtypes registers one (pip install ml_dtypes)
    import ml_dtypes  # noqa: F401
except ImportError:
    ml_dtypes = None


def decode(path):
    """Return {name: numpy array}: every weight of the model, decoded."""
    with safe_open(path, "np") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "dkm-param" or meta.get("format_version") not in ("1", "2"):
        raise ValueError(f"{path} is not a dkm-param file of format version 1 or 2")
    layers = json.loads(meta["layers"])
    try:
        tensors = load_file(path)
    except TypeError as exc:  # "data type 'bfloat16' not understood"
        if ml_dtypes is None and "bfloat16" in str(exc):
            raise SystemExit(f"{path} holds bfloat16 tensors, which numpy reads with ml_dtypes: pip install ml_dtypes")
        raise
    weights = {}
    for name, info in layers.items():
        codebook = tensors.pop(name + ".codebook")  # (2**bits, dim) or (groups, 2**bits, dim)
        packed = tensors.pop(name + ".indices")  # uint8, bits packed LSB first
        bits, count = info["bits"], info["vectors"]
        stream = np.unpackbits(packed, bitorder="little")[: count * bits]
        indices = (stream.reshape(count, bits).astype(np.int64) << np.arange(bits)).sum(axis=1)
        if codebook.ndim == 3:  # one codebook per group of output channels, groups in order
            vectors = codebook[np.arange(count) // (count // len(codebook)), indices]
        else:
            vectors = codebook[indices]
        work = np.float64 if info["dtype"] == "float64" else np.float32
        rows = info["shape"][0] if len(info["shape"]) > 1 else 1
        vectors = vectors.astype(work).reshape(rows, -1)
        if name + ".scale" in tensors:  # per output channel
            vectors = vectors * tensors.pop(name + ".scale").astype(work)[:, None]
        shape = info["shape"]
        if info.get("layout") == "input" and len(shape) > 2:  # vectors ran along the input channels
            vectors = np.moveaxis(vectors.reshape(shape[0], *shape[2:], shape[1]), -1, 1)
        weight = np.ascontiguousarray(vectors.astype(info["dtype"]).reshape(shape))
        if info.get("outliers", 0):  # the sparse part (version 2): exact values at flat positions
            weight.reshape(-1)[tensors.pop(name + ".outlier_index")] = tensors.pop(name + ".outlier_value")
        weights[name] = weight
    weights.update(tensors)
    for alias, target in json.loads(meta["aliases"]).items():
        weights[alias] = weights[target]
    return weights


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python decode_numpy.py MODEL.safetensors  (prints each decoded weight's dtype and shape)")
    try:
        weights = decode(sys.argv[1])
    except (OSError, ValueError, KeyError, SafetensorError) as exc:  # no such file, or not a dkm-param file
        sys.exit(f"{sys.argv[1]}: cannot decode: {exc}")
    for name, array in weights.items():
        print(name, array.dtype, array.shape)
