"""What ``dkm-param inspect`` shows of a file: its facts as data, and as text."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from ..format import FORMAT_NAME, CompressedModel
from ..tables import format_size, plural, printable, render_table


def facts(path: Path, compressed: CompressedModel) -> dict[str, Any]:
    """Everything ``inspect`` shows of the file at ``path``, already read as ``compressed``, as plain data."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    summary = compressed.summary()
    rows = {row.name: row for row in summary.rows}
    layers = []
    for name, layer in compressed.layers.items():
        spec = layer.spec
        layers.append({
            "name": name,
            "shape": list(layer.shape),
            "dtype": str(layer.dtype).removeprefix("torch."),
            "bits": spec.bits,
            "dim": spec.dim,
            "codebook": list(layer.codebook.shape),
            "codebook_dtype": str(layer.codebook.dtype).removeprefix("torch."),
            "group_size": spec.group_size,
            "channel_scale": spec.channel_scale,
            "preserve_zeros": spec.preserve_zeros,
            "layout": spec.layout,
            "outliers": layer.outliers,
            "params": rows[name].params,
            "bits_per_weight": round(rows[name].bits_per_weight, 4),
            "bytes_before": rows[name].bytes_before,
            "bytes_after": rows[name].bytes_after,
            "shared_with": sorted(a for a, t in compressed.aliases.items() if t == name),
        })
    tensors = [
        {
            "name": name,
            "shape": list(t.shape),
            "dtype": str(t.dtype).removeprefix("torch."),
            "bytes": t.numel() * t.element_size(),
        }
        for name, t in compressed.tensors.items()
    ]
    return {
        "file": str(path),
        "file_bytes": path.stat().st_size,
        "format": metadata.get("format", FORMAT_NAME),
        "format_version": metadata.get("format_version"),
        "metadata": {k: v for k, v in metadata.items() if k not in ("format", "format_version", "layers", "aliases")},
        "layers": layers,
        "tensors": tensors,
        "aliases": dict(compressed.aliases),
        "bytes_before": summary.bytes_before,
        "bytes_after": summary.bytes_after,
        "ratio": round(summary.ratio, 4) if math.isfinite(summary.ratio) else None,  # JSON has no Infinity
    }


def facts_text(facts: dict[str, Any]) -> str:
    """The facts as the text ``inspect`` prints."""
    # names and metadata come from the file: escaped, so that they cannot drive the terminal
    lines = [
        f"{printable(facts['file'])}: {printable(str(facts['format']))} format version "
        f"{printable(str(facts['format_version']))}, {format_size(facts['file_bytes'])} on disk"
    ]
    lines += [f"metadata {printable(key)}: {printable(value)}" for key, value in facts["metadata"].items()]
    lines.append("")
    header = ("layer", "shape", "bits/dim", "codebook", "bits/w", "weights", "before", "after", "notes")
    table = []
    for layer in facts["layers"]:
        notes = []
        if layer["group_size"]:
            notes.append(f"{layer['codebook'][0]} groups of {layer['group_size']} channels")
        if layer["preserve_zeros"]:
            notes.append("zeros kept")
        if layer["channel_scale"]:
            notes.append("scale per channel")
        if layer["layout"] != "flat":
            notes.append(f"layout {layer['layout']}")
        if layer["outliers"]:
            notes.append(f"{layer['outliers']:,} kept exact")
        if layer["shared_with"]:
            notes.append(f"shared with {', '.join(map(printable, layer['shared_with']))}")
        table.append((
            printable(layer["name"]),
            _dims(layer["shape"]),
            f"{layer['bits']}/{layer['dim']}",
            f"{_dims(layer['codebook'])} {layer['codebook_dtype']}",
            f"{layer['bits_per_weight']:.2f}",
            f"{layer['params']:,}",
            format_size(layer["bytes_before"]),
            format_size(layer["bytes_after"]),
            "; ".join(notes),
        ))
    lines.append(render_table(header, table, right={4, 5, 6, 7}, notes=True))
    plain = facts["tensors"]
    lines.append("")
    lines.append(f"stored plain ({len(plain)} tensors, {format_size(sum(t['bytes'] for t in plain))}):")
    if plain:
        table = [(printable(t["name"]), _dims(t["shape"]), t["dtype"], format_size(t["bytes"])) for t in plain]
        text = render_table(("tensor", "shape", "dtype", "size"), table, right={3})
        lines += ["  " + line for line in text.splitlines()]
    for alias, target in facts["aliases"].items():
        lines.append(f"alias: {printable(alias)} -> {printable(target)} (stored once)")
    lines.append("")
    lines.append(
        f"total: {format_size(facts['bytes_before'])} -> {format_size(facts['bytes_after'])}, "
        f"compression {_ratio(facts['ratio'])} ({plural(len(facts['layers']), 'layer')} clustered)"
    )
    return "\n".join(lines)


def _dims(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape)) or "scalar"


def _ratio(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"
