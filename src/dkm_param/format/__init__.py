"""The file as data: CompressedModel and CompressedLayer, the writer, the strict reader, size accounting.

Nothing here imports the training code: a file is read and written
without DKM, post-training or filters.
"""

from .layer import CompressedLayer
from .model import CompressedModel, assemble
from .reader import load_compressed, read_compressed
from .summary import Summary, SummaryRow, summarize
from .writer import FORMAT_NAME, FORMAT_VERSION

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "CompressedLayer",
    "CompressedModel",
    "Summary",
    "SummaryRow",
    "assemble",
    "load_compressed",
    "read_compressed",
    "summarize",
]
