"""Ask glibc where a large block of the running process went: a mapping of its own, or the heap."""

from __future__ import annotations

import ctypes


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
    ]


def _mapped_bytes() -> int:
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _MallInfo2
    return int(libc.mallinfo2().hblkhd)  # bytes in blocks that have a mapping of their own


def has_mallinfo2() -> bool:
    return hasattr(ctypes.CDLL(None), "mallinfo2")  # glibc 2.33 and later


def own_mapping_after_a_larger_one(size: int, larger: int = 8 << 20) -> bool:
    """Free a block of `larger` bytes (which, left alone, raises glibc's mmap threshold to it),
    then allocate `size`: True if that block got a mapping of its own (it is unmapped when
    freed, so its memory goes back to the system), False if it came from the heap."""
    block = bytearray(larger)
    del block
    before = _mapped_bytes()
    body = bytearray(size)
    grew = _mapped_bytes() - before
    del body
    return grew >= size
