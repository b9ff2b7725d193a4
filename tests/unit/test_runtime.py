"""tune_malloc pins glibc's mmap threshold: a large block freed must not move the threshold up, so the next
large block still gets a mapping of its own (and goes back to the system when freed). Each case runs in a
fresh interpreter: the threshold is process-wide state."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest

from meterstream.runtime import tune_malloc

_PROBE = """
import ctypes, sys
from meterstream.runtime import tune_malloc

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "tuned":
    assert tune_malloc()
big = bytearray(8_000_000)  # mapped (over the threshold); freeing it raises glibc's threshold unless pinned
del big
before = libc.mallinfo2().hblks
block = bytearray(1_000_000)
print(libc.mallinfo2().hblks - before)
"""


def _glibc_with_mallinfo2() -> bool:
    try:
        ctypes.CDLL(None).mallinfo2  # noqa: B018 (the lookup is the check)
    except (OSError, AttributeError):
        return False
    return True


def _new_mappings(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], env=env, capture_output=True, text=True, check=True, timeout=60
    )
    return int(out.stdout.strip())


@pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="glibc >= 2.33 only (mallinfo2)")
def test_a_large_block_keeps_its_own_mapping_after_a_larger_one_was_freed() -> None:
    assert _new_mappings("default") == 0  # glibc alone: the 1 MB block came from a heap
    assert _new_mappings("tuned") == 1


def test_an_operators_threshold_stands(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert tune_malloc() is False
