"""Host memory for inference on CPU: glibc is told to keep the large buffers PyTorch frees.

PyTorch has no caching allocator on CPU, and glibc gives every freed block over 32 MB back
to the kernel (thread arenas every block over 64 MB, whatever the settings), so each layer
of each window faults freshly zeroed pages in again. A full-size UNet++ feature map for a
1152² window is 85 MB in bf16, its concatenations several times that: on the build machine
a third of the CPU time went to the kernel, and with the settings below the same window
ran 1.5x (fp32) to 1.6x (bf16) faster, for a higher peak RSS (3.5 -> 5.0 GB over one fp32
and one bf16 pass), still bounded by the window and not by the image.

The settings: no mmap for large blocks, free heap kept up to 1 GiB, and one arena, so the
threads that run the model allocate from the heap too. glibc reads the arena limit once,
before a process's second thread allocates: Ray tile workers get all three through
GLIBC_TUNABLES in their environment (`worker_env`); `keep_freed_buffers` applies them
inside a running process, fully only when called before it starts threads. jemalloc or
tcmalloc through LD_PRELOAD would do the same, but need the library on every node.
A GLIBC_TUNABLES of the user's own (even empty) is left as it is.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from functools import lru_cache

log = logging.getLogger(__name__)

KEEP_FREE_BYTES = 1 << 30
TUNABLES = f"glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold={KEEP_FREE_BYTES}"
# mallopt(3) parameter numbers, from glibc's malloc.h.
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8


def worker_env() -> dict[str, str]:
    """Environment variables for a process started to run the model."""
    return {} if "GLIBC_TUNABLES" in os.environ else {"GLIBC_TUNABLES": TUNABLES}


@lru_cache(maxsize=1)
def keep_freed_buffers() -> bool:
    """Apply the settings to this process once; True when glibc took them."""
    if "GLIBC_TUNABLES" in os.environ or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, KEEP_FREE_BYTES))
    applied = all([mallopt(param, value) == 1 for param, value in settings])
    log.debug("glibc keeps freed buffers: %s", applied)
    return applied
