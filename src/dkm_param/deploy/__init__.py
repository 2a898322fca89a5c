"""Hand-offs to runtimes: Core ML, torch.export (and ExecuTorch), models kept compressed in memory.

Each module imports its runtime's package (coremltools) only when called.
"""

from .coreml import CoreMLExport, to_coreml
from .export import export_program, save_program
from .inmemory import CompressedWeight, register_compressed

__all__ = ["CompressedWeight", "CoreMLExport", "export_program", "register_compressed", "save_program", "to_coreml"]
