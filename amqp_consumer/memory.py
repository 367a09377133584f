"""Give the memory of large message bodies back to the system once they are settled.

glibc's malloc gives a block above its mmap threshold a mapping of its own, unmapped when
freed. But each time it frees such a block it raises the threshold to that block's size (up to
32 MiB): after the first 4 MB body, every body up to 4 MB comes from the heap, whose freed
space stays in the process and fragments. A daemon that now and then gets bodies of a few MB
climbs to the high-water mark of everything it ever had in flight and stays there: in
`make soak` on RabbitMQ 4.3 (1-4 MB bodies among small ones, prefetch 20), 110 MB for the
last third of the run against 73 MB for the first, and 72-118 MB for one such body a second
(52-78 MB with the threshold fixed; bench/README.md has the runs).

Setting the threshold turns that adjustment off, so RSS follows what is in flight. 256 KiB
keeps pika's frames (128 KiB at most), the 64 KiB socket reads and everyday messages on the
heap, where they are cheapest; an operator who tuned malloc through its environment variables
(``MALLOC_MMAP_THRESHOLD_`` and the others that turn the adjustment off) is left alone.
"""

from __future__ import annotations

import ctypes
import enum
import os
from typing import Mapping

THRESHOLD = 256 * 1024
_M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
# Setting any of these turns off glibc's adjustment of the threshold: the operator has chosen.
OPERATOR_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


class LargeBlocks(enum.Enum):
    """What became of the threshold; the tests read it, the daemon carries on whatever it is."""

    FIXED = enum.auto()
    OPERATOR = enum.auto()  # left as the environment sets it
    NOT_GLIBC = enum.auto()  # nothing to set
    REFUSED = enum.auto()  # mallopt said no: glibc's own adjustment stays


def _libc_is_glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (ValueError, OSError):
        return False


def return_large_blocks(environ: Mapping[str, str] = os.environ) -> LargeBlocks:
    """Fix glibc's mmap threshold for this process, unless the operator tuned malloc."""
    if any(name in environ for name in OPERATOR_VARIABLES):
        return LargeBlocks.OPERATOR
    if not _libc_is_glibc():
        return LargeBlocks.NOT_GLIBC
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # no mallopt to be found: not worth failing the start for
        return LargeBlocks.NOT_GLIBC
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return LargeBlocks.FIXED if mallopt(_M_MMAP_THRESHOLD, THRESHOLD) == 1 else LargeBlocks.REFUSED
