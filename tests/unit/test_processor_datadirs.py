"""A processor killed with SIGKILL leaves its (empty) Faust data directory behind; the next processor to start
removes those of processes that are gone, and leaves the live ones."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from processors.app import DATADIR_PREFIX, remove_stale_datadirs


def test_the_directories_of_dead_processors_are_removed(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True)
    dead_pid = int(dead.stdout)
    gone = tmp_path / f"{DATADIR_PREFIX}{dead_pid}-abc"
    live = tmp_path / f"{DATADIR_PREFIX}{os.getpid()}-def"
    other = tmp_path / "meterstream-faust-nopid"
    for path in (gone, live, other):
        path.mkdir()
    (gone / "leftover").write_text("x")
    assert remove_stale_datadirs(tmp_path) == [gone]
    assert not gone.exists()
    assert live.exists()
    assert other.exists()
