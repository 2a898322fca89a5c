"""The value table's passes over a weight as compiled loops, when a C compiler is at hand.

Each pass of ``ops.table`` over a weight on the CPU (count its values, look up
the soft weight, sum the gradient by value, spread it back) is otherwise a few
torch operations, each a pass over memory of its own, and torch's
``index_select`` and ``bincount`` there are serial loops. Here each pass is
one loop in C (``_table_passes.c``) that reads each weight once, compiled on
first use with the system's C compiler (``$CC``, else ``cc``, ``gcc`` or
``clang``) into a cache directory (``$DKM_PARAM_CACHE``, else
``$XDG_CACHE_HOME/dkm_param``, else ``~/.cache/dkm_param``) and loaded with
ctypes. Where torch runs on OpenMP the loops are built with it too, and share
torch's own runtime and threads (the library asks for ``libgomp.so.1``,
which torch has loaded): a loop runs on as many threads as
``torch.set_num_threads`` gives, on threads that are already running. Where
``-fopenmp`` does not build, the loops run on one thread.

The arithmetic per weight is the torch operations', in the same order, so
counts, soft values and their rounding to the weight's dtype are bit for bit
the same; the gradient's sums by value are added in float64 (torch: float32
pass by pass), each thread's share apart and then in thread order, so the
gradient may differ from the torch operations' in its last bits (and is the
same from run to run at one thread count). With ``DKM_PARAM_NATIVE=0``, no
compiler, or one that fails (a warning says so, once), the torch operations
run: the same results, slower.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["available", "count", "gather", "lookup", "spread"]

_SOURCE = Path(__file__).with_name("_table_passes.c")
_FLAGS = ("-O3", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC")
# GCC's: a loop of a few instructions that straddles a 64-byte line runs at two thirds the speed
_GCC_FLAGS = ("-falign-loops=64",)
_VERSION = 3  # dkm_table_passes_version() of the source this module calls
_PTR, _N, _F, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
_SIGNATURES = {
    "dkm_count_half": (_PTR, _N, _PTR),
    "dkm_count_grid": (_PTR, _N, _F, _F, _N, _PTR),
    "dkm_lookup_half": (_PTR, _N, _PTR, _PTR),
    "dkm_lookup_line": (_PTR, _N, _F, _F, _N, _PTR, _PTR, _PTR),
    "dkm_gather_half": (_PTR, _PTR, _N, _INT, _PTR),
    "dkm_gather_grid": (_PTR, _PTR, _N, _F, _F, _N, _PTR),
    "dkm_spread_half": (_PTR, _PTR, _N, _INT, _PTR, _PTR, _PTR),
    "dkm_spread_grid": (_PTR, _PTR, _N, _F, _F, _N, _PTR, _PTR, _PTR, _PTR),
}
_LOADED: dict[str, ctypes.CDLL | None] = {}
_LOCK = threading.Lock()


def available() -> bool:
    """Whether the compiled passes run here (compiling them on the first call)."""
    return _library() is not None


def _library() -> ctypes.CDLL | None:
    if os.environ.get("DKM_PARAM_NATIVE", "1").strip() in ("0", "false", "no", "off"):
        return None
    with _LOCK:
        if "lib" not in _LOADED:
            _LOADED["lib"] = _load()
        return _LOADED["lib"]


def _cache_dir() -> Path:
    if os.environ.get("DKM_PARAM_CACHE"):
        return Path(os.environ["DKM_PARAM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dkm_param"


def _compiler() -> str | None:
    named = os.environ.get("CC")
    return shutil.which(named) if named else next(filter(None, map(shutil.which, ("cc", "gcc", "clang"))), None)


def _load() -> ctypes.CDLL | None:
    compiler = _compiler()
    if compiler is None:
        return None
    for flags in _builds(compiler):
        path = _path(compiler, flags)
        try:
            try:
                library = _opened(path)
            except OSError:  # not compiled yet, or a file that is not a whole library: compiled afresh
                _compile(compiler, flags, path)
                library = _opened(path)
            if "-fopenmp" in flags and _gomp_loaded() != 1:
                raise OSError("the OpenMP build loaded an OpenMP runtime other than torch's")
            break
        except (OSError, subprocess.SubprocessError) as error:
            failure = error
    else:
        warnings.warn(f"dkm_param: the compiled value-table passes are not available ({failure}); the torch "
                      "operations run instead, the same results more slowly (DKM_PARAM_NATIVE=0 silences this)",
                      RuntimeWarning, stacklevel=3)
        return None
    for name, arguments in _SIGNATURES.items():
        function = getattr(library, name)
        function.argtypes, function.restype = arguments, None
    return library


def _builds(compiler: str) -> list[tuple[str, ...]]:
    """The flags to try, in order: with OpenMP where torch's is GCC's and so is the compiler (else a
    second runtime would come in), then without (the loops on one thread)."""
    if not _is_gcc(compiler):
        return [_FLAGS]
    flags = (*_FLAGS, *_GCC_FLAGS)
    return [(*flags, "-fopenmp"), flags] if _gomp_loaded() == 1 else [flags]


def _gomp_loaded() -> int:
    """How many copies of GCC's OpenMP runtime (``libgomp.so.1``) the process has loaded (Linux;
    elsewhere 0): torch's, where its parallel backend is GCC's OpenMP."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if line.rstrip().endswith("/libgomp.so.1")}
    except OSError:
        return 0
    return len(paths)


def _is_gcc(compiler: str) -> bool:
    """Whether ``compiler`` is GCC (whose ``-fopenmp`` links ``libgomp.so.1``), not clang or another."""
    try:
        macros = subprocess.run([compiler, "-dM", "-E", "-x", "c", os.devnull], capture_output=True, text=True,
                                timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "#define __GNUC__" in macros and "__clang__" not in macros and "__INTEL" not in macros


def _path(compiler: str, flags: tuple[str, ...]) -> Path:
    """Where the library compiled by ``compiler`` with ``flags`` is kept: named by what it is built from."""
    made_of = [_SOURCE.read_bytes(), compiler.encode(), " ".join(flags).encode(), platform.machine().encode()]
    key = hashlib.sha256(b"\0".join(made_of)).hexdigest()[:16]
    return _cache_dir() / f"table_passes_{key}.so"


def _opened(path: Path) -> ctypes.CDLL:
    library = ctypes.CDLL(str(path))
    if getattr(library, "dkm_table_passes_version", lambda: None)() != _VERSION:
        raise OSError(f"{path} is not this version's library")
    return library


def _compile(compiler: str, flags: tuple[str, ...], path: Path) -> None:
    """Compile the source into ``path``: into a file beside it, renamed into place once whole (a
    process compiling at the same time renames its own whole file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    os.close(handle)
    try:
        done = subprocess.run([compiler, *flags, str(_SOURCE), "-o", partial], capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            raise OSError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _bits(tensor: Tensor) -> int:
    return tensor.data_ptr()


def _check(values: Tensor, entries: int, *pairs: tuple[Tensor, int, torch.dtype]) -> None:
    """The loops read and write raw memory: refuse anything but contiguous CPU tensors of the sizes
    and dtypes they take (``pairs``: each tensor, its size, its dtype; a size of -1 is ``entries``)."""
    if values.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"the compiled passes take bfloat16, float16 or float32 values, got {values.dtype}")
    if values.dtype != torch.float32 and entries != 1 << 16:
        raise ValueError(f"a half-precision table has 65536 entries, got {entries}")
    for tensor, size, dtype in ((values, values.numel(), values.dtype), *pairs):
        size = entries if size == -1 else size
        if tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor.numel() != size or tensor.dtype != dtype:
            raise ValueError(f"the compiled passes take contiguous CPU tensors: wanted {size} of {dtype}, got "
                             f"{tuple(tensor.shape)} of {tensor.dtype} on {tensor.device}, contiguous "
                             f"{tensor.is_contiguous()}")


def count(values: Tensor, counts: Tensor, low: float = 0.0, scale: float = 0.0) -> None:
    """Add each value's count to ``counts`` (entries,) int64: a half-precision value at its bit
    pattern, a float32 one at its grid point (``low``, ``scale``: the grid's least point and one
    over its step; ``counts.numel()`` points)."""
    _check(values, counts.numel(), (counts, -1, torch.int64))
    library, n = _library(), values.numel()
    if values.dtype == torch.float32:
        library.dkm_count_grid(_bits(values), n, low, scale, counts.numel(), _bits(counts))
    else:
        library.dkm_count_half(_bits(values), n, _bits(counts))


def lookup(values: Tensor, out: Tensor, table: Tensor, slope: Tensor | None = None, low: float = 0.0,
           scale: float = 0.0) -> None:
    """``out = table[entry(v)]`` for half-precision values (``table`` in their dtype), or
    ``table[entry(v)] + v slope[entry(v)]`` for float32 values on a grid (both float32)."""
    line = () if slope is None else ((slope, -1, torch.float32),)
    _check(values, table.numel(), (out, values.numel(), values.dtype), (table, -1, values.dtype), *line)
    if values.dtype == torch.float32 and slope is None:
        raise ValueError("a float32 lookup takes the slope too")
    library, n = _library(), values.numel()
    if values.dtype == torch.float32:
        library.dkm_lookup_line(_bits(values), n, low, scale, table.numel(), _bits(table), _bits(slope), _bits(out))
    else:
        library.dkm_lookup_half(_bits(values), n, _bits(table), _bits(out))


def gather(values: Tensor, grad: Tensor, sums: Tensor, low: float = 0.0, scale: float = 0.0) -> None:
    """Add each value's gradient ``grad`` (the values' dtype) into ``sums`` (entries,) float64."""
    _check(values, sums.numel(), (grad, values.numel(), values.dtype), (sums, -1, torch.float64))
    library, n = _library(), values.numel()
    if values.dtype == torch.float32:
        library.dkm_gather_grid(_bits(values), _bits(grad), n, low, scale, sums.numel(), _bits(sums))
    else:
        library.dkm_gather_half(_bits(values), _bits(grad), n, int(values.dtype == torch.bfloat16), _bits(sums))


def spread(values: Tensor, grad: Tensor, out: Tensor, tables: tuple[Tensor, ...], low: float = 0.0,
           scale: float = 0.0) -> None:
    """The weight's gradient from ``grad`` (each the values' dtype) and float32 tables over the
    entries: ``grad a + b`` for half-precision values (``tables``: ``(a, b)``), or
    ``(bend v + base) grad + shared`` on a grid (``(base, bend, shared)``)."""
    if len(tables) != (3 if values.dtype == torch.float32 else 2):
        raise ValueError(f"a {values.dtype} gradient takes {3 if values.dtype == torch.float32 else 2} tables")
    _check(values, tables[0].numel(), (grad, values.numel(), values.dtype), (out, values.numel(), values.dtype),
           *((table, -1, torch.float32) for table in tables))
    library, n = _library(), values.numel()
    pointers = [_bits(table) for table in tables]
    if values.dtype == torch.float32:
        library.dkm_spread_grid(_bits(values), _bits(grad), n, low, scale, tables[0].numel(), *pointers, _bits(out))
    else:
        library.dkm_spread_half(_bits(values), _bits(grad), n, int(values.dtype == torch.bfloat16), *pointers,
                                _bits(out))
