"""torch.export: programs that store clustered weights as codebooks and packed indices, decoded in the graph.

The program reaches ExecuTorch the usual way, ``executorch.exir.to_edge(program).to_executorch()``:
the decoding is core ATen operations (``index_select``, indexing, integer division and remainder,
reshapes) that ExecuTorch's portable kernels run, and the ``.pte`` keeps the packed bytes.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..format.model import CompressedModel, _check_fits
from ..format.writer import _write_atomic
from .inmemory import CompressedWeight, _check_parameters, _clustered_names, attach, copy_without_weights


def export_program(
    model: nn.Module, compressed: CompressedModel, example_inputs: Any, *, keep_traces: bool = False,
    **export_kwargs: Any,
) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model`` with the weights of ``compressed``, each clustered weight kept compressed.

    The program holds codebooks, packed indices (uint8, as in the file), scales
    and outliers as buffers and decodes every clustered weight inside the graph,
    so ``save_program`` (or ``torch.export.save``, whose graph is larger) writes
    about the file's size, and
    ``torch.export.load(path).module()(*example_inputs)`` gives the output of the
    model with ``compressed.load_into`` applied. ``model`` gives the architecture
    and its mode (call ``model.eval()`` first for inference) and is not changed
    (its clustered weights are not copied). The example inputs are not kept in
    the program (``program.example_inputs`` is None): they can outweigh a small
    model's weights. Nor, unless ``keep_traces``, are the Python stack traces
    ``torch.export`` records on each node (for debugging the export itself):
    a convolutional network's saved graph is mostly those.
    example_inputs: a tuple of positional arguments, a dict of keyword
        arguments, or a single tensor; export_kwargs go to ``torch.export.export``
        (e.g. ``dynamic_shapes``).
    Raises RegistrationError for a model that does not fit the file.
    """
    _check_fits(model, compressed._declared(), compressed.aliases)
    _check_parameters(model, compressed)
    program_model = attach(copy_without_weights(model, _clustered_names(compressed)), compressed)
    args, kwargs = split_inputs(example_inputs)
    program = torch.export.export(program_model, args, kwargs, **export_kwargs)
    program.example_inputs = None  # the caller's data, often larger than a small model's weights
    _slim_decoding_nodes(program, keep_traces)
    return program


def save_program(program: torch.export.ExportedProgram, path: str | os.PathLike) -> Path:
    """``torch.export.save`` with the graph's JSON compressed: the ``.pt2`` of a small model shrinks by half.

    ``torch.export.save`` stores every entry of the archive uncompressed; the
    graph and its metadata (JSON, hundreds of kB for a network of 50 layers:
    as much as the compressed weights of a small one) are deflated here, the
    tensors stay stored as they are, 64-byte aligned as ``torch.export.save``
    leaves them. ``torch.export.load`` reads the file as it reads its own.
    The write is atomic: a failed save leaves any old file in place.
    """
    path = Path(os.path.realpath(path))
    saved = io.BytesIO()
    torch.export.save(program, saved)
    saved.seek(0)
    _write_atomic(path, lambda handle: _deflate_json(saved, handle))
    return path


_ALIGNMENT = 64  # where torch.export.save starts each entry's data
_PADDING_FIELD = 0x4246  # the extra field torch.export.save pads with


def _deflate_json(source, handle) -> None:
    """Copy the zip archive ``source`` to ``handle``, its ``.json`` entries deflated, the rest stored aligned."""
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(handle, "w", allowZip64=True) as out:
        for info in archive.infolist():
            entry = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            entry.file_size = info.file_size
            entry.external_attr = info.external_attr
            if info.filename.endswith(".json"):
                entry.compress_type = zipfile.ZIP_DEFLATED
            else:
                entry.compress_type = zipfile.ZIP_STORED
                entry.extra = _padding(handle.tell(), entry)
            with archive.open(info) as reader, out.open(entry, "w") as writer:
                shutil.copyfileobj(reader, writer, 1 << 22)


def _padding(offset: int, entry: zipfile.ZipInfo) -> bytes:
    """An extra field that starts the entry's data at a multiple of ``_ALIGNMENT`` bytes from the archive's start."""
    zip64 = entry.file_size * 1.05 > zipfile.ZIP64_LIMIT  # as ZipFile.open(..., "w") decides it
    start = offset + 30 + len(entry.filename.encode()) + 4 + (20 if zip64 else 0)
    size = -start % _ALIGNMENT
    return struct.pack("<HH", _PADDING_FIELD, size) + b"Z" * size


def _slim_decoding_nodes(program: torch.export.ExportedProgram, keep_traces: bool) -> None:
    """Keep the decoding out of the saved graph's size, and the stack traces unless ``keep_traces``.

    The decoding's nodes lose their Python stack traces and source functions, and their module stacks
    stop at the module that owns the weight (the same dkm_param lines for every layer: most of a small
    program's saved graph); the dtype assertions ``torch.export`` puts before each cast of the packed
    bytes (uint8 buffers of the program itself) are removed.
    """
    qualname = CompressedWeight.__qualname__
    graph = program.graph
    for node in list(graph.nodes):
        if not keep_traces:
            node.meta.pop("stack_trace", None)
        stack = node.meta.get("nn_module_stack") or {}
        if not any(qualname in str(kind) for _, kind in stack.values()):
            continue
        if node.op == "call_function" and node.target == torch.ops.aten._assert_tensor_metadata.default:
            graph.erase_node(node)
            continue
        for key in ("stack_trace", "torch_fn", "source_fn_stack"):
            node.meta.pop(key, None)
        # the stack down to the module that owns the weight, which torch.export.unflatten needs
        node.meta["nn_module_stack"] = {
            key: (path, kind) for key, (path, kind) in stack.items() if ".parametrizations." not in f".{path}."
        }
    program.graph_module.recompile()


def split_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """Positional and keyword arguments from a tuple, a dict or a single value."""
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, tuple):
        return example_inputs, {}
    if isinstance(example_inputs, list):
        return tuple(example_inputs), {}
    return (example_inputs,), {}
