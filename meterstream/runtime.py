"""Process-wide tuning of Python's garbage collector and glibc's allocator, applied by the entry points
(``meterstream.services``): the GC in every process, the allocator in the Kafka consumers."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import os
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any, Final

#: glibc's ``mallopt`` parameter number for the mmap threshold (``M_MMAP_THRESHOLD`` in malloc.h).
_M_MMAP_THRESHOLD: Final = -3
#: glibc's default threshold: blocks at least this large get mappings of their own.
MMAP_THRESHOLD_BYTES: Final = 128 * 1024


def tune_gc() -> None:
    """Every record decodes into thousands of short-lived objects: collect the young generation less often,
    and keep what start-up loaded (modules, price data) out of every collection (measured: ~10% of the
    processor's time per event)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def tune_malloc() -> bool:
    """Pin glibc's mmap threshold at its default of 128 KiB; True if it was set.

    Left alone, glibc raises the threshold to the size of each mapped block it frees (up to 32 MiB), after
    which large buffers (Kafka fetches and records, ClickHouse batches) come from its arenas instead and
    fragment them: RSS then ramps for many minutes under a steady load (measured: the processor +25 to
    +45 MB over a 10-minute soak; pinned, +2 to +6 MB; BENCHMARKS.md, Soak). Pinned, each such block has
    its own mapping and goes back to the system when freed. Does nothing when ``MALLOC_MMAP_THRESHOLD_``
    is set (the operator's choice stands) or the C library has no ``mallopt``.

    For the Kafka consumers (processor, sink), not for processes that answer many small requests (ingest,
    the query service, ``up``): asyncio reads each socket into a fresh 256 KiB buffer, which pinned gets a
    mapping of its own on every read (measured: single-event ingest 10-20% slower).
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False  # no mallopt (macOS): nothing to pin
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


@asynccontextmanager
async def background(work: Coroutine[Any, Any, Any], name: str) -> AsyncIterator[None]:
    """Run ``work`` as a task while the ``async with`` body runs; cancelled and awaited after it."""
    task = asyncio.create_task(work, name=name)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
