"""The environment of a process that runs the model on CPU: how glibc keeps memory and how
OpenMP threads wait. Ray tile workers start with `worker_env()`; `segment()` in a running
process applies what can still be changed there (`keep_freed_buffers`). A variable the
user has set (even empty) is left as it is.

Host memory. PyTorch has no caching allocator on CPU, and glibc gives every freed block
over 32 MB back to the kernel (thread arenas every block over 64 MB, whatever the
settings), so each layer of each window faulted freshly zeroed pages in again. A full-size
UNet++ feature map for a 1152² window is 85 MB in bf16, its concatenations several times
that: on the build machine a third of the CPU time went to the kernel. With no mmap for
large blocks, free heap kept up to 1 GiB and one arena (so the threads that run the model
allocate from the heap too) the same window ran 1.5x (fp32) to 1.6x (bf16) faster, for a
peak RSS about 1.5x higher, still bounded by the window and not by the image. glibc reads
the arena limit once, before a process's second thread allocates, hence the environment.
(jemalloc or tcmalloc through LD_PRELOAD would do the same, but need the library on
every node.)

OpenMP waits. A worker computes one tile while its other thread reads and writes the
next; OpenMP threads that spin after each parallel region took those cores: passive
waiting made a 2048² image 15% faster end to end on 2 cores. libgomp reads the policy
when it loads, so only a process started with it gets it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from functools import lru_cache

log = logging.getLogger(__name__)

KEEP_FREE_BYTES = 1 << 30
MALLOC = f"glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold={KEEP_FREE_BYTES}"
WORKER_ENV = {"GLIBC_TUNABLES": MALLOC, "OMP_WAIT_POLICY": "PASSIVE"}
# mallopt(3) parameter numbers, from glibc's malloc.h.
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8


def worker_env() -> dict[str, str]:
    """Environment variables for a process started to run the model."""
    return {k: v for k, v in WORKER_ENV.items() if k not in os.environ}


@lru_cache(maxsize=1)
def keep_freed_buffers() -> bool:
    """Apply the host-memory settings to this process once; True when glibc took them."""
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
