"""Core ML: a model converted with coremltools, each clustered weight held as the file's lookup table and indices.

The model, with the file's decoded weights, goes through ``torch.export`` and
coremltools' PyTorch frontend; each weight of the resulting MIL program that
equals a clustered layer's decoded weight (or a transpose of it) is then
replaced by ``constexpr_lut_to_dense`` over the file's codebook and indices
(iOS 18 opset: grouped lookup tables, vector lookup tables along one axis),
followed by ``constexpr_blockwise_shift_scale`` where the layer has
per-channel scales, before coremltools' optimisation passes run. Nothing is
clustered again. A layer Core ML cannot hold this way stays a dense weight
and is reported. Converting works on Linux; running the model needs macOS.
"""

from __future__ import annotations

import itertools
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import numpy as np
except ModuleNotFoundError:  # not a dependency of dkm-param; coremltools brings it, and to_coreml checks for that
    np = None
import torch
from torch import nn

from ..errors import ExportError
from ..extras import install_hint
from ..format.layer import CompressedLayer
from ..format.model import CompressedModel
from .export import split_inputs
from .inmemory import decoded_copy

# index widths constexpr_lut_to_dense takes; others are stored in the next one up, the table padded
_COREML_BITS = {1: 1, 2: 2, 3: 3, 4: 4, 5: 6, 6: 6, 7: 8, 8: 8}
# ct.convert arguments that belong to the second conversion (program to ML program), not the frontend
_BACKEND_KWARGS = ("compute_precision", "compute_units", "pass_pipeline", "skip_model_load", "package_dir", "debug")
_PREFIX = re.compile(r"^dkm(\d+)_")


@dataclass
class CoreMLExport:
    """What ``to_coreml`` made.

    mlmodel: the ``coremltools.models.MLModel``; path: where it was saved, or
    None; palettized: each clustered layer held exactly as the file's codebook
    and indices, with the names of the ``constexpr_lut_to_dense`` ops that hold
    it (more than one where the program uses the weight in more than one
    layout); unrepresented: each clustered layer that is not, and why.
    """

    mlmodel: Any
    path: Path | None
    palettized: dict[str, list[str]] = field(default_factory=dict)
    unrepresented: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"Core ML program: {len(self.palettized)} layers as the file's lookup tables"
                 + (f", saved to {self.path}" if self.path else "")]
        lines += [f"  not as its lookup table: {name}: {why}" for name, why in self.unrepresented.items()]
        return "\n".join(lines)


@dataclass
class _Replacement:
    """One weight of the program replaced by a layer's lookup table: the arrays put in, in the program's layout."""

    layer: str
    indices: np.ndarray  # the file's index values, uint8
    lut: np.ndarray  # the codebook (padded to 2**bits entries), in the weight's float type
    vector_axis: int | None  # None for scalar tables
    scale: np.ndarray | None  # per output channel, in the weight's float type
    bits: int  # Core ML's index width
    scale_first: bool = False  # the scales applied to the table (one per row), not to the lookup's output

    def scaled_table(self) -> tuple[np.ndarray, np.ndarray]:
        """With ``scale_first``: the table repeated to one per output channel, and the scales in its rank."""
        row = next(a for a, n in enumerate(self.scale.shape) if n > 1) if self.scale.size > 1 else 0
        lut = np.repeat(self.lut, self.scale.shape[row] // self.lut.shape[row], axis=row)
        return np.ascontiguousarray(lut), self.scale.reshape(*self.scale.shape, 1, 1)


def to_coreml(
    model: nn.Module,
    compressed: CompressedModel,
    example_inputs: Any,
    path: str | Path | None = None,
    strict: bool = False,
    **convert_kwargs: Any,
) -> CoreMLExport:
    """Convert ``model`` with the weights of ``compressed`` to a Core ML ML program, clustered weights palettized.

    Each clustered weight becomes ``constexpr_lut_to_dense`` whose lookup table
    and indices are the file's, bit for bit (index widths 5 and 7 are stored in
    6 and 8 bits and tables shorter than ``2**bits`` padded with zeros, as
    Core ML requires), and ``constexpr_blockwise_shift_scale`` for per-channel
    scales. ``model`` gives the architecture and is not changed: a copy of it,
    in eval mode with the file's decoded weights, is what is converted.
    example_inputs: a tuple of positional arguments, a dict of keyword
        arguments, or one tensor, for ``torch.export``.
    path: where to save the ``.mlpackage``; None does not save.
    strict: raise instead of warning when a layer cannot be held as its
        lookup table (it then stays dense in the program): a layer with
        outliers, vectors that run across the last axis, a codebook the
        program's float type does not hold exactly, a weight the converter
        folded into another.
    convert_kwargs: passed to ``coremltools.convert`` (e.g. ``inputs``,
        ``outputs``, ``compute_units``). ``minimum_deployment_target`` must be
        iOS 18 / macOS 15 or later (the default: iOS 18);
        ``compute_precision`` defaults to float32, so that float32 lookup
        tables stay exact (with ``FLOAT16`` they are rounded, and the layers
        whose values change are reported).
    Raises ExportError (``strict``, a target before iOS 18, a path not ending
    in .mlpackage), RegistrationError for a model that does not fit the file,
    ModuleNotFoundError without coremltools (the ``coreml`` extra).
    """
    ct = _coremltools()
    if path is not None and Path(path).suffix != ".mlpackage":
        raise ExportError(f"path {str(path)!r}: a Core ML ML program is saved as a directory ending in .mlpackage")
    target = convert_kwargs.pop("minimum_deployment_target", ct.target.iOS18)
    if target < ct.target.iOS18:
        raise ExportError(
            f"minimum_deployment_target {target!r} predates iOS 18, whose constexpr_lut_to_dense holds grouped and "
            "vector lookup tables; pass ct.target.iOS18 (or macOS15) or later"
        )
    if convert_kwargs.get("convert_to", "mlprogram") != "mlprogram":
        raise ExportError(f"convert_to={convert_kwargs['convert_to']!r}: lookup tables need an ML program")
    convert_kwargs.pop("convert_to", None)
    backend = {key: convert_kwargs.pop(key) for key in _BACKEND_KWARGS if key in convert_kwargs}
    backend.setdefault("compute_precision", ct.precision.FLOAT32)

    snapped = decoded_copy(model, compressed).eval()
    program = _frontend_program(ct, snapped, example_inputs, target, convert_kwargs)
    weights = {name: snapped.get_parameter(name) for name in compressed.layers}
    scale_first = target < ct.target.iOS26 if hasattr(ct.target, "iOS26") else True
    replacements, unrepresented = _palettize_program(program, compressed.layers, weights, scale_first)
    del snapped, weights
    mlmodel = ct.convert(program, convert_to="mlprogram", minimum_deployment_target=target, **backend)
    palettized = _check_program(mlmodel._mil_program, replacements, unrepresented)
    for name in compressed.layers:
        if name not in palettized and name not in unrepresented:
            unrepresented[name] = (
                "no weight of the converted program equals its decoded weight (the converter folded it into "
                "another operation, or forward does not use it)"
            )
    result = CoreMLExport(mlmodel=mlmodel, path=None, palettized=palettized, unrepresented=unrepresented)
    if unrepresented:
        listed = "; ".join(f"'{name}': {why}" for name, why in unrepresented.items())
        message = (
            f"{len(unrepresented)} clustered layer(s) are not the file's lookup tables in the Core ML program: {listed}"
        )
        if strict:
            raise ExportError(message + "; fix them, or pass strict=False to convert them all the same")
        warnings.warn(message, stacklevel=2)
    if path is not None:
        mlmodel.save(str(path))
        result.path = Path(path)
    return result


def _coremltools():
    try:
        import coremltools
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            f"to_coreml needs coremltools ({exc}); install it with: {install_hint('coreml')}",
            name="coremltools",
        ) from None
    return coremltools


def _frontend_program(ct, model: nn.Module, example_inputs: Any, target, convert_kwargs: dict):
    """The model as a MIL program straight from coremltools' PyTorch frontend, constants folded:
    its weights are still the model's values (no batch norm or bias fused into them yet)."""
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY

    args, kwargs = split_inputs(example_inputs)
    # the core ATen operations coremltools converts, but linear kept whole: decomposed, a weight can reach
    # the program only broadcast for a batched matmul, no longer a constant of the layer's values
    table = torch.export.default_decompositions()
    table.pop(torch.ops.aten.linear.default, None)
    try:
        with torch.no_grad():
            exported = torch.export.export(model, args, kwargs).run_decompositions(table)
    except Exception as exc:  # torch's own errors, many kinds
        raise ExportError(
            f"torch.export could not trace the model with these example inputs ({type(exc).__name__}: "
            f"{_first_line(exc)}); check example_inputs, or export the model with torch.export first to see why"
        ) from exc
    _drop_aliases(exported)
    try:
        program = ct.convert(
            exported, convert_to="milinternal", minimum_deployment_target=target,
            pass_pipeline=ct.PassPipeline.EMPTY, **convert_kwargs,
        )
    except Exception as exc:  # coremltools' own errors, many kinds
        raise ExportError(
            f"coremltools {ct.__version__} could not convert the exported model ({type(exc).__name__}: "
            f"{_first_line(exc)}); an operation it has no converter for is the usual cause"
        ) from exc
    # fold e.g. transpose(weight) into one constant, as the optimisation passes would, so that the
    # constant that replaces it is a weight the program reads directly
    for name in ("common::const_elimination", "common::dead_code_elimination"):
        PASS_REGISTRY[name](program)
    return program


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


def _drop_aliases(exported: torch.export.ExportedProgram) -> None:
    """Remove ``aten.alias`` nodes (a view of their input that coremltools has no converter for)."""
    graph = exported.graph_module.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target == torch.ops.aten.alias.default:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    exported.graph_module.recompile()


def _palettize_program(
    program, layers: dict[str, CompressedLayer], weights: dict[str, torch.Tensor], scale_first: bool
) -> tuple[dict[int, _Replacement], dict[str, str]]:
    """Replace every constant of ``program`` that is a clustered layer's weight by its lookup table.

    scale_first: per-channel scales scale the table, as coremltools writes them before iOS 26 (its
    passes reorder the other way, and Core ML before iOS 26 reads only that order).

    Returns the replacements by their number (the ``dkm<number>_`` their ops' names start with) and,
    by layer, why a layer found in the program could not be replaced.
    """
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil.scope import ScopeInfo, ScopeSource

    arrays = {name: _numpy(weight) for name, weight in weights.items()}
    by_size: dict[int, list[str]] = {}
    for name, array in arrays.items():
        by_size.setdefault(array.size, []).append(name)
    replacements: dict[int, _Replacement] = {}
    unrepresented: dict[str, str] = {}
    scope = ScopeInfo(source=ScopeSource.COREMLTOOLS_GRAPH_PASS, data=["dkm_param.to_coreml"])
    with mb.scope(scope):
        for op in _constants(program):
            value = op.outputs[0].val
            found = _find_layer(op.name, value, by_size.get(value.size, ()), arrays)
            if found is None:
                continue
            name, perm = found
            try:
                replacement = _lookup_table(name, layers[name], perm, value)
            except _Unrepresentable as exc:
                unrepresented.setdefault(name, str(exc))
                continue
            number = len(replacements)
            replacement.scale_first = scale_first and replacement.scale is not None
            replacements[number] = replacement
            _replace(mb, op, replacement, f"dkm{number}_{re.sub(r'[^0-9A-Za-z_]', '_', name)}")
    return replacements, unrepresented


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()


def _constants(program):
    """The float tensor constants of every block of the program (nested blocks included)."""

    def walk(block):
        for op in list(block.operations):
            for inner in op.blocks:
                yield from walk(inner)
            if op.op_type == "const":
                value = op.outputs[0].val
                if isinstance(value, np.ndarray) and value.ndim >= 1 and np.issubdtype(value.dtype, np.floating):
                    yield op

    for function in program.functions.values():
        yield from walk(function)


def _find_layer(
    const_name: str, value: np.ndarray, names: Any, arrays: dict[str, np.ndarray]
) -> tuple[str, tuple[int, ...]] | None:
    """The layer whose weight ``value`` is, and the axes order ``value = weight.transpose(perm)``; or None.

    Layers named like the constant are tried first (two layers may hold equal weights).
    """
    const = re.sub(r"[^0-9A-Za-z]", "", const_name)
    ordered = sorted(names, key=lambda n: not const.endswith(re.sub(r"[^0-9A-Za-z]", "", n)))
    for name in ordered:
        weight = arrays[name]
        if weight.ndim != value.ndim:
            continue
        perms = itertools.permutations(range(weight.ndim)) if weight.ndim <= 4 else [tuple(range(weight.ndim))]
        for perm in perms:
            view = weight.transpose(perm)
            if view.shape != value.shape:
                continue
            corner = (0,) * (value.ndim - 1)  # one row first: rejects a wrong candidate without a full pass
            if np.array_equal(view[corner][:64], value[corner][:64]) and np.array_equal(view, value):
                return name, perm
    return None


class _Unrepresentable(Exception):
    """A layer Core ML's lookup tables cannot hold exactly; the message says why and what to do."""


def _lookup_table(name: str, layer: CompressedLayer, perm: tuple[int, ...], value: np.ndarray) -> _Replacement:
    """The lookup table, indices and scale, in the program's layout, that decode to ``value`` exactly."""
    spec, shape, dim = layer.spec, tuple(layer.shape), layer.spec.dim
    if layer.outliers:
        raise _Unrepresentable(
            f"{layer.outliers} outliers kept exact: constexpr_lut_to_dense has no sparse part to put them back "
            "(palettize the layer without outliers to deploy it to Core ML)"
        )
    ndim = len(shape)
    index = layer.indices.numpy()  # (n,) uint8, unpacked from the layer's packed bytes
    if spec.layout == "input" and ndim > 2:  # vectors of input channels at one kernel position
        index = np.moveaxis(index.reshape(shape[0], *shape[2:], shape[1] // dim), -1, 1)
        axis = 1
    else:
        if shape[-1] % dim:
            raise _Unrepresentable(
                f"vectors of dim={dim} run across the last axis ({shape[-1]} values), and Core ML's vector lookup "
                f"tables read vectors along one axis; cluster it with a dim that divides {shape[-1]}"
                + (" or layout='input'" if ndim > 2 else "")
            )
        index = index.reshape(*shape[:-1], shape[-1] // dim)
        axis = ndim - 1
    book = layer.codebook if layer.codebook.dim() == 3 else layer.codebook[None]  # (groups, k, d)
    groups, k, _ = book.shape
    exact = book.double().numpy()
    if not np.array_equal(exact.astype(value.dtype).astype(np.float64), exact):
        raise _Unrepresentable(
            f"its {str(layer.codebook.dtype).removeprefix('torch.')} codebook is not exact in the program's "
            f"{value.dtype} weights; store codebooks in {value.dtype} (palettize(..., codebook_dtype=...))"
        )
    bits = _COREML_BITS[spec.bits]
    # one table per group of rows (axis 0), one for all when there are no groups
    lut = np.zeros((groups, *([1] * (ndim - 1)), 1 << bits, dim), dtype=value.dtype)
    lut[..., :k, :] = exact.reshape(groups, *([1] * (ndim - 1)), k, dim)
    scale = None
    if layer.scale is not None:
        scale64 = layer.scale.double().numpy()
        if not np.array_equal(scale64.astype(value.dtype).astype(np.float64), scale64):
            raise _Unrepresentable(
                f"its {str(layer.scale.dtype).removeprefix('torch.')} scales are not exact in the program's "
                f"{value.dtype} weights"
            )
        scale = scale64.reshape(shape[0], *([1] * (ndim - 1)))  # one per row: blocks of whole rows
    # the program's weight is the layer's, its axes in the order perm
    index = np.ascontiguousarray(index.transpose(perm))
    lut = np.ascontiguousarray(lut.transpose(*perm, ndim, ndim + 1))
    axis = perm.index(axis) if dim > 1 else None
    scale = None if scale is None else np.ascontiguousarray(scale.transpose(perm).astype(value.dtype))
    dense = lut_to_dense(index, lut, axis)
    if scale is not None:
        dense = scale * dense  # constexpr_blockwise_shift_scale: scale * data, in the weight's float type
    if not np.array_equal(dense, value):
        raise _Unrepresentable(
            f"the lookup table decodes to other values than the program's {value.dtype} weight (per-channel "
            f"scales multiply in {value.dtype} in Core ML, in float32 in the file)"
        )
    return _Replacement(layer=name, indices=index, lut=lut, vector_axis=axis, scale=scale, bits=bits)


def lut_to_dense(indices: np.ndarray, lut: np.ndarray, vector_axis: int | None) -> np.ndarray:
    """What iOS 18's ``constexpr_lut_to_dense`` gives: ``lut`` (*blocks, k, d) read at ``indices``, each index
    a vector of d values along ``vector_axis``; without coremltools' reference's copy of the table per index."""
    k, dim = lut.shape[-2:]
    blocks = lut.shape[:-2]
    table = lut.reshape(-1, k, dim)
    if table.shape[0] == 1:
        values = table[0][indices.astype(np.intp)]
    else:
        out = [n * (dim if a == vector_axis else 1) for a, n in enumerate(indices.shape)]
        group = np.zeros((1,) * indices.ndim, dtype=np.intp)
        for a, (size, count) in enumerate(zip(indices.shape, blocks)):
            along = np.arange(size) * (dim if a == vector_axis else 1) // (out[a] // count)
            group = group * count + along.reshape([-1 if b == a else 1 for b in range(indices.ndim)])
        values = table[group, indices.astype(np.intp)]
    if vector_axis is None:
        return values[..., 0]
    values = np.moveaxis(values, -1, vector_axis + 1)
    shape = list(indices.shape)
    shape[vector_axis] *= dim
    return values.reshape(shape)


def _replace(mb, op, replacement: _Replacement, name: str) -> None:
    """Put the lookup table (and the scale) in place of the constant ``op``, as ops named ``name...``."""
    from coremltools.converters.mil.mil import types

    block = op.enclosing_block
    index_type = types.nptype_from_builtin(types.string_to_builtin(f"uint{replacement.bits}"))
    extra = {} if replacement.vector_axis is None else {"vector_axis": replacement.vector_axis}
    with block:
        lut = replacement.lut
        if replacement.scale_first:
            data, scale = replacement.scaled_table()
            lut = mb.constexpr_blockwise_shift_scale(data=data, scale=scale, before_op=op, name=name + "_scaled_lut")
        new = mb.constexpr_lut_to_dense(
            indices=replacement.indices.astype(index_type), lut=lut, before_op=op, name=name, **extra
        )
        if replacement.scale is not None and not replacement.scale_first:
            new = mb.constexpr_blockwise_shift_scale(data=new, scale=replacement.scale, before_op=op,
                                                     name=name + "_scaled")
        block.replace_uses_of_var_after_op(anchor_op=op, old_var=op.outputs[0], new_var=new)
        block.remove_ops([op])


def _check_program(
    program, replacements: dict[int, _Replacement], unrepresented: dict[str, str]
) -> dict[str, list[str]]:
    """The layers every replacement of which the converted program holds exactly as put in, with the ops'
    names; the others go to ``unrepresented`` (e.g. tables rounded to float16 by compute_precision)."""
    from coremltools.converters.mil.mil import types

    held: dict[int, list[str]] = {}
    wrong: dict[str, str] = {}
    for function in program.functions.values():
        for op in _operations(function):
            match = _PREFIX.match(op.name) if op.op_type == "constexpr_lut_to_dense" else None
            if match is None or int(match.group(1)) not in replacements:
                continue
            put = replacements[int(match.group(1))]
            why = _differs(op, put, types)
            if why:
                wrong.setdefault(put.layer, why)
            held.setdefault(int(match.group(1)), []).append(op.name)
    palettized: dict[str, list[str]] = {}
    for number, put in replacements.items():
        if number in held:
            palettized.setdefault(put.layer, []).extend(held[number])
            continue
        # merged into an identical table (two layers of equal weights), or gone
        twin = next((n for n in held if _identical(replacements[n], put)), None)
        if twin is None:
            wrong.setdefault(put.layer, "its lookup table was removed from the program by the conversion")
        else:
            palettized.setdefault(put.layer, []).extend(held[twin])
    for name, why in wrong.items():
        palettized.pop(name, None)
        unrepresented.setdefault(name, why)
    return palettized


def _differs(op, put: _Replacement, types) -> str | None:
    """Why the program's ``constexpr_lut_to_dense`` op does not hold the replacement exactly, or None."""
    index_type = types.builtin_to_string(op.indices.dtype)
    if index_type != f"uint{put.bits}" or not np.array_equal(op.indices.val, put.indices):
        return f"its indices changed in the conversion (now {index_type})"
    if put.scale_first:
        data, scale = put.scaled_table()
        table = op.lut.op
        if table is None or table.op_type != "constexpr_blockwise_shift_scale" or table.offset is not None:
            return "its scaled lookup table changed in the conversion"
        if not _same(table.data.val, data) or not _same(table.scale.val, scale):
            return _rounded(table.data.dtype, types)
    else:
        if not _same(op.lut.val, put.lut):
            return _rounded(op.lut.dtype, types)
        if put.scale is not None:
            scales = [c for c in op.outputs[0].child_ops if c.op_type == "constexpr_blockwise_shift_scale"]
            if not scales or not all(_same(c.scale.val, put.scale) and c.offset is None for c in scales):
                return "its per-channel scales changed in the conversion"
    axis = op.vector_axis.val if op.vector_axis is not None else None
    if put.vector_axis is not None and axis != put.vector_axis:
        return f"its vector axis changed in the conversion ({axis})"
    return None


def _identical(a: _Replacement, b: _Replacement) -> bool:
    """Whether two replacements put the same table, indices and scales in the program."""
    arrays = lambda r: (r.indices, r.lut) + (() if r.scale is None else (r.scale,))  # noqa: E731
    return (a.bits, a.vector_axis, a.scale_first, a.scale is None) == (b.bits, b.vector_axis, b.scale_first,
                                                                        b.scale is None) and all(
        x.shape == y.shape and np.array_equal(x, y) for x, y in zip(arrays(a), arrays(b)))


def _same(value: np.ndarray | None, expected: np.ndarray) -> bool:
    """Whether ``value`` holds exactly the values of ``expected``, in the same shape."""
    if value is None or value.shape != expected.shape:
        return False
    return np.array_equal(value.astype(np.float64), expected.astype(np.float64))


def _rounded(dtype, types) -> str:
    return (
        f"its lookup table changed in the conversion (now {types.builtin_to_string(dtype)}: compute_precision="
        "FLOAT16 rounds float32 codebooks; convert with ct.precision.FLOAT32 or store codebooks in float16)"
    )


def _operations(block):
    for op in list(block.operations):
        for inner in op.blocks:
            yield from _operations(inner)
        yield op
