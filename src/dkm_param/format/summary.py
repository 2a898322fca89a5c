"""Size accounting: what each layer takes before and after, and the summary table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..ops.dtypes import itemsize
from ..policy import weight_key
from ..tables import format_size, plural, render_table

if TYPE_CHECKING:
    from .model import CompressedModel


@dataclass(frozen=True)
class SummaryRow:
    name: str
    shape: tuple[int, ...]
    bits: int | None  # None: stored uncompressed
    dim: int | None
    params: int
    bytes_before: int
    bytes_after: int
    note: str = ""
    outliers: int = 0  # weights kept exact in the sparse part

    @property
    def bits_per_weight(self) -> float:
        """Bits per weight in the file, codebook included."""
        return 8 * self.bytes_after / self.params if self.params else 0.0


@dataclass(frozen=True)
class Summary:
    """Per-layer sizes and totals; ``str()`` is a table.

    bytes_before: every tensor of the model at its own dtype; bytes_after:
    codebooks, packed indices and the tensors stored as they are. Tensors
    shared by several names count once.
    """

    rows: tuple[SummaryRow, ...]
    other_tensors: int
    other_bytes: int

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.rows) + self.other_bytes

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.rows) + self.other_bytes

    @property
    def ratio(self) -> float:
        return self.bytes_before / self.bytes_after if self.bytes_after else float("inf")

    def __str__(self) -> str:
        rows = []
        for r in self.rows:
            notes = [f"{r.outliers:,} kept exact"] if r.outliers else []
            notes += [r.note] if r.note else []
            rows.append((
                r.name,
                "x".join(map(str, r.shape)),
                f"{r.bits}/{r.dim}" if r.bits else "-",
                f"{r.bits_per_weight:.2f}",
                format_size(r.bytes_before),
                format_size(r.bytes_after),
                "; ".join(notes),
            ))
        other = format_size(self.other_bytes)
        rows.append((f"other tensors ({self.other_tensors})", "", "", "", other, other, "kept as they are"))
        clustered = len([r for r in self.rows if r.bits])
        total = (
            f"total: {format_size(self.bytes_before)} -> {format_size(self.bytes_after)}, "
            f"compression {self.ratio:.2f}x ({plural(clustered, 'layer')} clustered)"
        )
        header = ("layer", "shape", "bits/dim", "bits/w", "before", "after", "note")
        return render_table(header, rows, right={3, 4, 5}, footer=[total], rule_below=True, notes=True)


def summarize(model: CompressedModel) -> Summary:
    """The Summary of a CompressedModel: per-layer rows, skipped layers with their reasons, other tensors."""
    rows = []
    for name, layer in model.layers.items():
        rows.append(SummaryRow(
            name=name,
            shape=layer.shape,
            bits=layer.spec.bits,
            dim=layer.spec.dim,
            params=layer.numel,
            bytes_before=layer.numel * itemsize(layer.dtype),
            bytes_after=layer.nbytes,
            note=_tied_note(model, name),
            outliers=layer.outliers,
        ))
    skipped_weights = set()
    groups: dict[str, list] = {}  # modules that are no clustering target, by reason
    for plan_row in model.skipped:
        key = weight_key(plan_row.name)
        tensor = model.tensors.get(key)
        if tensor is None:
            continue
        skipped_weights.add(key)
        if plan_row.kind is None:
            groups.setdefault(plan_row.reason, []).append(tensor)
            continue
        size = tensor.numel() * tensor.element_size()
        rows.append(
            SummaryRow(key, tuple(tensor.shape), None, None, tensor.numel(), size, size, f"skipped: {plan_row.reason}")
        )
    for reason, tensors in groups.items():
        numel = sum(t.numel() for t in tensors)
        size = sum(t.numel() * t.element_size() for t in tensors)
        name = f"({plural(len(tensors), 'tensor')}, {numel:,} values)"
        rows.append(SummaryRow(name, (), None, None, numel, size, size, f"skipped: {reason}"))
    others = [t for k, t in model.tensors.items() if k not in skipped_weights]
    other_bytes = sum(t.numel() * t.element_size() for t in others)
    return Summary(rows=tuple(rows), other_tensors=len(others), other_bytes=other_bytes)


def _tied_note(model: CompressedModel, name: str) -> str:
    tied = sorted(a for a, t in model.aliases.items() if t == name)
    return f"shared with {', '.join(tied)}" if tied else ""
