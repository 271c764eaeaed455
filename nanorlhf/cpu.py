"""On CPU, ask glibc's malloc to keep freed memory for reuse instead of handing it back to the kernel.

Every training step here allocates and frees the same large buffers: blocks of logits (up to 512 x 32,768 fp32 =
67 MB in the log-prob seam), the dense (50,257, 128) gradient of the token embedding (25.7 MB), Adam's temporaries.
By default glibc serves an allocation above its mmap threshold (128 KB, raised by itself to at most 32 MB) with
fresh pages from the kernel and unmaps them on free, and it returns the free top of its heap to the kernel above a
trim threshold; either way the next step's buffer is new memory, and the kernel page-faults and zeroes it 4 KB at a
time before any arithmetic runs. Raising both thresholds lets each step reuse the last one's buffers, at the
price of a higher peak memory (docs/experiments.md has the measurements).

PyTorch's CPU tuning guide gets the same effect by preloading another allocator (jemalloc, tcmalloc); this needs no
install. It changes no result, only where freed memory goes; elsewhere than glibc (macOS, musl) it does nothing.
"""

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3


def keep_freed_memory(device: str, mmap_threshold: int = 256 << 20, trim_threshold: int = 1 << 30) -> bool:
    """On device "cpu": serve allocations below mmap_threshold from malloc's heap, and keep up to trim_threshold of
    free heap instead of returning it. True if glibc took both settings; False (nothing changed) on a GPU device,
    where the big buffers are the GPU's, or where there is no glibc."""
    if device != "cpu" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))
