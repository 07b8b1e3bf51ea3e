"""ediffi_jax/host_memory.py: freed heap that glibc keeps is given back to the kernel (RSS measured, no timing)."""

import sys

import pytest

from ediffi_jax.host_memory import release_free_heap, resident_bytes


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim and /proc: Linux only")
def test_freed_heap_is_returned_to_the_kernel():
    assert resident_bytes() > 10 * 2**20
    blocks = [bytearray(b"\x01") * 100_000 for _ in range(2000)]  # 200 MB in heap-sized (< 128 KiB) blocks
    pin = bytearray(b"\x02") * 100_000  # allocated last: the heap's top cannot shrink by itself on free
    held = resident_bytes()
    del blocks
    assert resident_bytes() > held - 50e6  # glibc kept the freed blocks
    released = release_free_heap()
    assert released > 150e6, released
    assert resident_bytes() < held - 150e6
    assert pin[0] == 2 and release_free_heap() < 50e6  # nothing large left to give back
