"""The fixed mmap threshold of parallel workers: tensors from the threshold up leave the heap."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

from fedumm.runtime.allocator import fix_mmap_threshold

# in a fresh process: this one's allocator settings stay as they are
PROBE = textwrap.dedent("""
    import ctypes, sys
    import torch
    from fedumm.runtime.allocator import fix_mmap_threshold

    class MallInfo(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks "
                    "keepcost".split()]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo

    def mapped_by_mmap(nbytes):
        before = libc.mallinfo2().hblks
        t = torch.empty(nbytes, dtype=torch.uint8)
        grew = libc.mallinfo2().hblks - before
        del t
        return grew

    big = torch.empty(8 << 20, dtype=torch.uint8)
    del big  # freeing a mapped 8 MiB raises glibc's threshold to 8 MiB
    print(mapped_by_mmap(1 << 20), fix_mmap_threshold(), mapped_by_mmap(1 << 20),
          mapped_by_mmap(64 << 10))
""")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_a_fixed_threshold_serves_large_tensors_by_mmap_and_small_ones_from_the_heap():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         check=True).stdout.split()
    # glibc's raised threshold puts 1 MiB in the heap; the fixed 256 KiB maps it, not 64 KiB
    assert out == ["0", "True", "1", "0"]


def test_elsewhere_the_allocator_is_left_alone(monkeypatch):
    import ctypes.util

    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    assert fix_mmap_threshold() is False
