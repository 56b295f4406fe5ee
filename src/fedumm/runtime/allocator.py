"""The C allocator's settings for processes that train clients in parallel.

A forked worker grows its own heap while it trains. With glibc's defaults, tensors below a
threshold that glibc raises up to 32 MiB come from the heap, and training frees and reallocates
them in an order that leaves the heap far larger than what it holds: on the quickstart a
worker's heap grew by 134 MiB past the fork while at most 66 MiB more than at the fork was in
use. Tensors from 256 KiB up served by ``mmap`` go back to the system when freed; the heap then
grew by 86-92 MiB. Peak PSS of the quickstart with ``workers=2`` (K=4 and 16): 827-868 MiB
without it, 789-827 MiB with it, training no slower; a 128 KiB threshold saved a little more but
trained ~18% slower. On Janus-Pro-1B's decoder (4 layers, 640 tokens, LoRA; MBs per activation)
it trained up to ~8% slower per step and peaked 19% lower (benchmarks/allocator.py). Numbers
and commands: docs/peers.md.
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
