"""Peak resident memory for the benchmarks: restart the peak, read it back (Linux; ru_maxrss elsewhere)."""

from __future__ import annotations

import ctypes
import gc
import resource


def reset_peak() -> None:
    """Restart the peak RSS (VmHWM, and ru_maxrss) from the current RSS, where Linux allows: else a
    step's growth hides below peaks left by start-up (importing torch, building the inputs).

    Freed memory is first handed back to the system (glibc's malloc_trim), or the next phase
    could reuse it while it is still resident and its growth would not show in the RSS.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss() -> int:
    """The process's peak RSS in bytes since the last ``reset_peak`` (VmHWM; else ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
