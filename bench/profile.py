"""Sampling profiles of the measured processes (``--profile``), with py-spy if it is installed.

py-spy attaches to a running process from outside (no code change, little overhead at 100 Hz) and writes
collapsed stacks; :func:`summarize` turns them into the functions with the most samples, by own time
(the frame on top of the stack), by total time (anywhere on the stack; Meterstream's functions only) and
by thread. Shares are of the samples in which a thread was running (py-spy leaves idle threads out).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import log


def py_spy() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return found if Path(found).exists() else None


@dataclass
class Profiler:
    """``py-spy record`` on each named pid for ``seconds``, started now, collected by ``collect()``."""

    pids: dict[str, int]
    seconds: float
    out_dir: Path
    _running: dict[str, tuple[subprocess.Popen[bytes], Path]] = field(default_factory=dict)

    def start(self) -> Profiler:
        binary = py_spy()
        if binary is None:
            log("py-spy is not installed (pip install py-spy): no profile")
            return self
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for name, pid in self.pids.items():
            out = self.out_dir / f"{name}.folded"
            command = [binary, "record", "--pid", str(pid), "--duration", str(int(self.seconds)), "--rate", "100",
                       "--format", "raw", "--threads", "--nonblocking", "--output", str(out)]  # fmt: skip
            self._running[name] = (
                subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
                out,
            )
        return self

    def collect(self, top: int = 15) -> dict[str, dict[str, list[tuple[str, float]]]]:
        """Per process: the top functions by own and by total share of samples (percent)."""
        summaries = {}
        for name, (process, out) in self._running.items():
            try:
                process.wait(self.seconds + 30)
            except subprocess.TimeoutExpired:
                process.kill()
            if out.exists():
                summaries[name] = summarize(out, top)
                print(f"\nprofile of {name} ({out}):")
                for kind in ("self", "total", "threads"):
                    print(f"  by {kind}:")
                    for function, share in summaries[name][kind]:
                        print(f"    {share:5.1f}%  {function}")
        return summaries


def _frame(frame: str) -> str:
    # py-spy frames look like "function (path/to/module.py:123)"; keep function and file, drop the line.
    function, _, where = frame.partition(" (")
    path = where.rsplit(":", 1)[0]
    for marker in ("site-packages/", "/work/main/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{function} ({path})" if path else function


#: Meterstream's packages; "by total" lists only their functions (the frames above them are the event loop
#: and the web framework, on every stack), leaving out the entry points.
_OURS = ("ingest/", "processors/", "sinks/", "schemas/", "query/", "meterstream/")
_ENTRY = ("meterstream/cli.py", "meterstream/services.py", "<module>")


def _ours(function: str) -> bool:
    where = function.rpartition("(")[2]
    return where.startswith(_OURS) and not any(entry in function for entry in _ENTRY)


def summarize(path: Path, top: int = 15) -> dict[str, list[tuple[str, float]]]:
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    samples = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        samples += count
        thread = frames[0] if frames and frames[0].startswith(("thread", "process")) else ""
        calls = [_frame(f) for f in frames if f and not f.startswith(("thread", "process"))]
        if thread:
            threads[thread] += count
        if calls:
            own[calls[-1]] += count
            for function in {c for c in calls if _ours(c)}:
                total[function] += count
    if not samples:
        return {"self": [], "total": [], "threads": []}

    def share(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(k, round(100 * v / samples, 1)) for k, v in counter.most_common(top)]

    return {"self": share(own), "total": share(total), "threads": share(threads)}
