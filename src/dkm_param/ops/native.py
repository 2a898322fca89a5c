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
soft values and their rounding to the weight's dtype are bit for bit the same
(NaN's payload aside); counts are exact integers (torch's float32 sums are,
up to 2^24 weights an entry); the gradient's sums by value are added in
float64 (torch: float32 pass by pass), each thread's share apart and then in
thread order, so the gradient may differ from the torch operations' in its
last bit (and is the same from run to run at one thread count). A float32
value that is NaN is refused (ValueError) once the pass is over; a grid the
loops cannot take (not finite, no step, more than 2^24 points) is left to
the torch operations (``usable_grid``). With ``DKM_PARAM_NATIVE=0``, no
compiler, or one that fails (a warning says so, once), the torch operations
run: the same results, slower.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import struct
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["MOST_GRID_POINTS", "available", "count", "gather", "lookup", "spread", "usable_grid"]

_SOURCE = Path(__file__).with_name("_table_passes.c")
_FLAGS = ("-O3", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC")
# GCC's: a loop of a few instructions that straddles a 64-byte line runs at two thirds the speed
_GCC_FLAGS = ("-falign-loops=64",)
_VERSION = 4  # dkm_table_passes_version() of the source this module calls
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
    failure: Exception | None = None
    for flags in _builds(compiler):
        try:
            path = _path(compiler, flags)
            try:
                library = _opened(path)
            except OSError:  # not compiled yet, or a file that is not a whole library: compiled afresh
                library = _compile(compiler, flags, path)
            if "-fopenmp" in flags and _gomp_loaded() != 1:
                raise OSError("the OpenMP build loaded an OpenMP runtime other than torch's")
            break
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:  # RuntimeError: no home directory
            failure = error
    else:
        warnings.warn(f"dkm_param: the compiled value-table passes are not available ({failure}); the torch "
                      "operations run instead, the same results more slowly (DKM_PARAM_NATIVE=0 silences this)",
                      RuntimeWarning, stacklevel=3)
        return None
    for name, arguments in _SIGNATURES.items():
        function = getattr(library, name)
        # the grid's passes return how many values were NaN
        function.argtypes, function.restype = arguments, ctypes.c_int64 if name.endswith(("_grid", "_line")) else None
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
    """The library at ``path``, if it is whole and of this version (a file cut short would crash
    the loader: its parts are checked against its size first)."""
    if not _whole(path):
        raise OSError(f"{path} is not a whole library")
    library = ctypes.CDLL(str(path))
    if getattr(library, "dkm_table_passes_version", lambda: None)() != _VERSION:
        raise OSError(f"{path} is not this version's library")
    return library


def _whole(path: Path) -> bool:
    """Whether the ELF file at ``path`` holds every part its headers name (other formats: whether it
    exists; a missing file is not whole)."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    if data[:4] != b"\x7fELF":
        return data[:4] in (b"\xcf\xfa\xed\xfe", b"\xce\xfa\xed\xfe")  # Mach-O: loaded as it is
    if len(data) < 64 or data[4] != 2 or data[5] not in (1, 2):  # a 64-bit ELF header
        return False
    order = "<" if data[5] == 1 else ">"
    phoff, shoff = struct.unpack_from(order + "QQ", data, 32)
    phentsize, phnum, shentsize, shnum = struct.unpack_from(order + "HHHH", data, 54)
    if phoff + phnum * phentsize > len(data) or shoff + shnum * shentsize > len(data):
        return False
    for at in range(phoff, phoff + phnum * phentsize, phentsize):  # each segment's bytes in the file
        offset, _, _, size = struct.unpack_from(order + "QQQQ", data, at + 8)
        if offset + size > len(data):
            return False
    return True


def _compile(compiler: str, flags: tuple[str, ...], path: Path) -> ctypes.CDLL:
    """Compile the source into ``path`` and load it: into a file beside it, loaded, then renamed
    into place (a process compiling at the same time renames its own whole file; loading by the
    new file's own name gets it, not a library loaded before from ``path``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    os.close(handle)
    try:
        done = subprocess.run([compiler, *flags, str(_SOURCE), "-o", partial], capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            raise OSError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
        library = _opened(Path(partial))
        os.replace(partial, path)
        return library
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _bits(tensor: Tensor) -> int:
    return tensor.data_ptr()


# the most points of a grid: each entry's index stays exact in float32
MOST_GRID_POINTS = 1 << 24


def usable_grid(low: float, scale: float, size: int) -> bool:
    """Whether the compiled passes take a grid of ``size`` points from ``low``, one over its step
    ``scale``: finite, with a step, of at most ``MOST_GRID_POINTS``."""
    return 1 <= size <= MOST_GRID_POINTS and math.isfinite(low) and math.isfinite(scale) and scale > 0


def _check(values: Tensor, entries: int, *pairs: tuple[Tensor, int, torch.dtype], grid: tuple[float, float] = ()):
    """The loops read and write raw memory: refuse anything but contiguous CPU tensors of the sizes
    and dtypes they take (``pairs``: each tensor, its size, its dtype; a size of -1 is ``entries``),
    and a float32 weight's grid (``grid``: its least point and one over its step) but a usable one."""
    if values.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"the compiled passes take bfloat16, float16 or float32 values, got {values.dtype}")
    if values.dtype != torch.float32 and entries != 1 << 16:
        raise ValueError(f"a half-precision table has 65536 entries, got {entries}")
    if values.dtype == torch.float32 and not (len(grid) == 2 and usable_grid(*grid, entries)):
        raise ValueError(f"the compiled passes take a grid of 1 to {MOST_GRID_POINTS} points with a finite least "
                         f"point and step, got {entries} points from {grid}")
    for tensor, size, dtype in ((values, values.numel(), values.dtype), *pairs):
        size = entries if size == -1 else size
        if tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor.numel() != size or tensor.dtype != dtype:
            raise ValueError(f"the compiled passes take contiguous CPU tensors: wanted {size} of {dtype}, got "
                             f"{tuple(tensor.shape)} of {tensor.dtype} on {tensor.device}, contiguous "
                             f"{tensor.is_contiguous()}")


def _refuse_nan(found: int, n: int) -> None:
    if found:
        raise ValueError(f"{found} of {n} float32 values are NaN: a grid has no point for them")


def count(values: Tensor, counts: Tensor, *grid: float) -> None:
    """Add each value's count to ``counts`` (entries,) int64: a half-precision value at its bit
    pattern, a float32 one at its grid point (``grid``: the grid's least point and one over its
    step; ``counts.numel()`` points). Raises ValueError for NaN (after counting them at the
    first point)."""
    _check(values, counts.numel(), (counts, -1, torch.int64), grid=grid)
    library, n = _library(), values.numel()
    if values.dtype == torch.float32:
        _refuse_nan(library.dkm_count_grid(_bits(values), n, *grid, counts.numel(), _bits(counts)), n)
    else:
        library.dkm_count_half(_bits(values), n, _bits(counts))


def lookup(values: Tensor, out: Tensor, table: Tensor, slope: Tensor | None = None, *grid: float) -> None:
    """``out = table[entry(v)]`` for half-precision values (``table`` in their dtype), or
    ``table[entry(v)] + v slope[entry(v)]`` for float32 values on a grid (both float32)."""
    line = () if slope is None else ((slope, -1, torch.float32),)
    _check(values, table.numel(), (out, values.numel(), values.dtype), (table, -1, values.dtype), *line, grid=grid)
    if values.dtype == torch.float32 and slope is None:
        raise ValueError("a float32 lookup takes the slope too")
    library, n = _library(), values.numel()
    if values.dtype == torch.float32:
        found = library.dkm_lookup_line(_bits(values), n, *grid, table.numel(), _bits(table), _bits(slope), _bits(out))
        _refuse_nan(found, n)
    else:
        library.dkm_lookup_half(_bits(values), n, _bits(table), _bits(out))


def gather(values: Tensor, grad: Tensor, sums: Tensor, *grid: float) -> None:
    """Add each value's gradient ``grad`` (the values' dtype) into ``sums`` (entries,) float64."""
    _check(values, sums.numel(), (grad, values.numel(), values.dtype), (sums, -1, torch.float64), grid=grid)
    library, n = _library(), values.numel()
    if values.dtype == torch.float32:
        _refuse_nan(library.dkm_gather_grid(_bits(values), _bits(grad), n, *grid, sums.numel(), _bits(sums)), n)
    else:
        library.dkm_gather_half(_bits(values), _bits(grad), n, int(values.dtype == torch.bfloat16), _bits(sums))


def spread(values: Tensor, grad: Tensor, out: Tensor, tables: tuple[Tensor, ...], *grid: float) -> None:
    """The weight's gradient from ``grad`` (each the values' dtype) and float32 tables over the
    entries: ``grad a + b`` for half-precision values (``tables``: ``(a, b)``), or
    ``(bend v + base) grad + shared`` on a grid (``(base, bend, shared)``)."""
    if len(tables) != (3 if values.dtype == torch.float32 else 2):
        raise ValueError(f"a {values.dtype} gradient takes {3 if values.dtype == torch.float32 else 2} tables")
    _check(values, tables[0].numel(), (grad, values.numel(), values.dtype), (out, values.numel(), values.dtype),
           *((table, -1, torch.float32) for table in tables), grid=grid)
    library, n = _library(), values.numel()
    pointers = [_bits(table) for table in tables]
    if values.dtype == torch.float32:
        found = library.dkm_spread_grid(_bits(values), _bits(grad), n, *grid, tables[0].numel(), *pointers,
                                        _bits(out))
        _refuse_nan(found, n)
    else:
        library.dkm_spread_half(_bits(values), _bits(grad), n, int(values.dtype == torch.bfloat16), *pointers,
                                _bits(out))
