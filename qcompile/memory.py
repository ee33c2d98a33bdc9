"""Handing freed heap memory back to the operating system (glibc), for runs measured by their
peak resident memory (sequential PTQ of a model larger than memory)."""
from __future__ import annotations

import ctypes
import functools


@functools.cache
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:   # not glibc (macOS, musl): nothing to do
        return None


def return_freed_heap() -> None:
    """Release the free pages inside glibc's heaps (`malloc_trim(0)`). Allocations below the mmap
    threshold come from the heap; freed, they stay resident in its holes until reused, so a
    calibration's 1-4 MB activations left the main heap at ~480 MB resident instead of ~295 before
    a block's largest step (22-layer GPTQ), by a different amount from run to run. A few ms."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def available_bytes() -> int:
    """Memory the system can give without swapping (Linux MemAvailable; else the physical memory)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
