"""The C allocator's settings for processes that train clients in parallel.

A forked worker grows its own heap while it trains. With glibc's defaults, tensors below a
threshold that glibc raises up to 32 MiB come from the heap, and training frees and reallocates
them in an order that leaves the heap about twice as large as what it holds at any time: on the
quickstart a worker's heap grew by ~134 MiB past the fork for ~66 MiB in use. Tensors from
256 KiB up served by ``mmap`` go back to the system when freed, so the worker holds about what it
uses. Measured on the quickstart at K=4, 2 workers (parent + 1 forked): peak PSS of the run
807-841 MiB with glibc's defaults, 744-745 MiB with the fixed threshold, training time the same
(19.2-19.4 s vs 19.4-20.4 s); a 128 KiB threshold also saves memory but trains ~18% slower.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # mallopt's parameter number (glibc's malloc.h)
WORKER_MMAP_THRESHOLD = 256 * 1024


def fix_mmap_threshold(nbytes: int = WORKER_MMAP_THRESHOLD) -> bool:
    """Serve allocations of ``nbytes`` and more by ``mmap`` from now on in this process (glibc's
    ``mallopt(M_MMAP_THRESHOLD)``; it also stops glibc from raising the threshold). Returns False
    where the C library is not glibc, which leaves the allocator as it is."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False
    return libc.mallopt(M_MMAP_THRESHOLD, int(nbytes)) == 1
