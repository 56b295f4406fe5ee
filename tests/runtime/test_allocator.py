"""The fixed mmap threshold of parallel workers: tensors from the threshold up leave the heap."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import textwrap

import pytest

from fedumm.runtime.allocator import fix_mmap_threshold

# in a fresh process: this one's allocator settings stay as they are
PROBE = textwrap.dedent("""
    import ctypes, json
    import torch
    from fedumm.runtime.allocator import fix_mmap_threshold

    class MallInfo(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks "
                    "keepcost".split()]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo

    held = []  # kept alive, so no request is served by space an earlier one freed

    def mapped_by_mmap(nbytes, count=64):
        # how many of count requests were mapped, and how many at most the heap's free space
        # could have served (glibc serves a request from free heap space before mapping one)
        info = libc.mallinfo2()
        held.extend(torch.empty(nbytes, dtype=torch.uint8) for _ in range(count))
        return libc.mallinfo2().hblks - info.hblks, min(count, info.fordblks // nbytes)

    big = torch.empty(8 << 20, dtype=torch.uint8)
    del big  # freeing a mapped 8 MiB raises glibc's threshold to 8 MiB
    before = mapped_by_mmap(1 << 20)
    fixed = fix_mmap_threshold()
    after = mapped_by_mmap(1 << 20)
    small = mapped_by_mmap(64 << 10)
    print(json.dumps({"before": before, "fixed": fixed, "after": after, "small": small}))
""")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_a_fixed_threshold_serves_large_tensors_by_mmap_and_small_ones_from_the_heap():
    out = json.loads(subprocess.run([sys.executable, "-c", PROBE], capture_output=True,
                                    text=True, check=True).stdout)
    # glibc's raised threshold puts 1 MiB in the heap; the fixed 256 KiB maps every 1 MiB the
    # heap's free space could not serve, and no 64 KiB
    assert out["before"][0] == 0
    assert out["fixed"] is True
    mapped, heap_could_serve = out["after"]
    assert mapped >= 64 - heap_could_serve and mapped > 0
    assert out["small"][0] == 0


def test_elsewhere_the_allocator_is_left_alone(monkeypatch):
    import ctypes.util

    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    assert fix_mmap_threshold() is False
