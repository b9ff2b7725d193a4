"""Shared pieces of the benchmarks: results, percentiles, per-process CPU and memory, the results table."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Row:
    """One line of the results table: a metric measured on Meterstream and, where there is one, on a
    baseline. ``higher_is_better`` decides how the ratio reads: it is always "how many times better
    Meterstream is" (> 1: Meterstream wins)."""

    scenario: str
    metric: str
    unit: str
    meterstream: float | None
    baseline: float | None = None
    baseline_name: str = ""
    higher_is_better: bool = True
    target: str = ""
    #: True / False when the metric has a target, None otherwise.
    met: bool | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.meterstream is None or self.baseline is None or self.meterstream == 0 or self.baseline == 0:
            return None
        return self.meterstream / self.baseline if self.higher_is_better else self.baseline / self.meterstream


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100), nearest-rank on the sorted values; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


# -- per-process CPU and memory ---------------------------------------------------------------------------


@dataclass
class ProcessUsage:
    """CPU (in cores: 1.0 is one core busy all the time) and memory of one process over a measurement."""

    name: str
    pid: int
    cpu_cores: float
    rss_mb_end: float
    rss_mb_peak: float


class ProcessSampler:
    """Samples the CPU time and RSS of named processes (children included) from a background thread.

    ``start()`` records the CPU times, ``stop()`` returns each process's CPU use over the interval and its
    final and peak RSS. ``series`` keeps (elapsed s, {name: rss MB}) samples, for soak runs."""

    def __init__(
        self, pids: dict[str, int], interval_s: float = 0.5, extra: Callable[[], dict[str, float]] | None = None
    ) -> None:
        self._procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        #: Further MB figures sampled with the RSS (e.g. the embedded engine's own accounting), into ``series``.
        self._extra = extra
        self._interval_s = interval_s
        self._start_cpu: dict[str, float] = {}
        self._peak: dict[str, float] = dict.fromkeys(self._procs, 0.0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0
        self.series: list[tuple[float, dict[str, float]]] = []

    @staticmethod
    def _cpu(proc: psutil.Process) -> float:
        try:
            times = proc.cpu_times()
            total = times.user + times.system
            for child in proc.children(recursive=True):
                try:
                    child_times = child.cpu_times()
                    total += child_times.user + child_times.system
                except psutil.Error:
                    pass
            return total
        except psutil.Error:
            return 0.0

    @staticmethod
    def _rss_mb(proc: psutil.Process) -> float:
        """RSS of the process and its children (ingest with several workers is a process tree)."""
        try:
            total = proc.memory_info().rss
            for child in proc.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    total += child.memory_info().rss
            return total / 2**20
        except psutil.Error:
            return 0.0

    def _sample(self) -> None:
        sample = {name: self._rss_mb(proc) for name, proc in self._procs.items()}
        for name, rss in sample.items():
            self._peak[name] = max(self._peak[name], rss)
        if self._extra is not None:
            sample |= self._extra()
        self.series.append((time.monotonic() - self._started, sample))

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._sample()

    def start(self) -> ProcessSampler:
        self._started = time.monotonic()
        self._start_cpu = {name: self._cpu(proc) for name, proc in self._procs.items()}
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="bench-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[ProcessUsage]:
        elapsed = max(1e-9, time.monotonic() - self._started)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        usage = []
        for name, proc in self._procs.items():
            cpu = (self._cpu(proc) - self._start_cpu.get(name, 0.0)) / elapsed
            usage.append(ProcessUsage(name, proc.pid, round(cpu, 3), round(self._rss_mb(proc), 1), self._peak[name]))
        return usage


def usage_dict(usage: Iterable[ProcessUsage]) -> dict[str, dict[str, float]]:
    return {
        u.name: {"cpu_cores": u.cpu_cores, "rss_mb": u.rss_mb_end, "rss_mb_peak": round(u.rss_mb_peak, 1)}
        for u in usage
    }


#: Processes the bench started outside its own process tree (the PostgreSQL server daemonises): they and
#: their descendants are not "other processes" for :class:`ForeignLoad`.
OWN_ROOTS: set[int] = set()


class ForeignLoad:
    """CPU used on this machine by processes that are not the bench's own (the bench and its descendants):
    the machine is shared, and a busy neighbour makes every number here worse. Sampled every 2 s."""

    def __init__(self, interval_s: float = 2.0) -> None:
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._samples: list[float] = []
        self._top: dict[str, float] = {}
        self._thread = threading.Thread(target=self._loop, name="bench-foreign-load", daemon=True)

    def _loop(self) -> None:
        me = psutil.Process()
        procs: dict[int, psutil.Process] = {}
        while not self._stop.wait(self._interval_s):
            ours = {me.pid} | {c.pid for c in me.children(recursive=True)}
            for root in list(OWN_ROOTS):
                try:
                    ours |= {root} | {c.pid for c in psutil.Process(root).children(recursive=True)}
                except psutil.Error:
                    OWN_ROOTS.discard(root)
            total = 0.0
            for proc in psutil.process_iter(["name", "cmdline"]):
                if proc.pid in ours:
                    continue
                known = procs.setdefault(proc.pid, proc)
                try:
                    cores = known.cpu_percent(None) / 100
                except psutil.Error:
                    continue
                total += cores
                if cores > 0.05:
                    name = " ".join((proc.info.get("cmdline") or [proc.info.get("name") or "?"])[:3])[:80]
                    self._top[name] = self._top.get(name, 0.0) + cores * self._interval_s
            self._samples.append(total)

    def start(self) -> ForeignLoad:
        self._thread.start()
        return self

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join()
        samples = self._samples[1:]  # the first sample has no interval behind it
        top = sorted(self._top.items(), key=lambda kv: -kv[1])[:3]
        return {
            "mean_cores": round(sum(samples) / len(samples), 3) if samples else 0.0,
            "max_cores": round(max(samples), 3) if samples else 0.0,
            "top_cpu_seconds": {name: round(seconds, 1) for name, seconds in top},
        }


# -- the machine, the code, the report --------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""

    def run(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False).stdout.strip()
        except OSError:
            return ""

    model = next((line.split(":", 1)[1].strip() for line in run("lscpu").splitlines() if "Model name" in line), "")
    return {
        "cpu": model or platform.processor(),
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": run("git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"),
        "dirty": bool(run("git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no")),
    }


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def table(rows: Sequence[Row]) -> str:
    """The results as a Markdown table (readable in a terminal too)."""
    header = ["scenario", "metric", "Meterstream", "baseline", "ratio", "target"]
    lines = [header]
    for row in rows:
        baseline = f"{_fmt(row.baseline)} ({row.baseline_name})" if row.baseline is not None else "-"
        ratio = f"{row.ratio:.1f}x" if row.ratio is not None else "-"
        target = row.target
        if row.met is not None:
            target = f"{target} {'met' if row.met else 'MISSED'}"
        lines.append([row.scenario, f"{row.metric} ({row.unit})", _fmt(row.meterstream), baseline, ratio, target])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        out.append("| " + " | ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)) + " |")
        if n == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def write_results(rows: Sequence[Row], meta: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS_DIR / f"bench-{stamp}.json"
    payload = {"meta": meta, "rows": [asdict(r) | {"ratio": r.ratio} for r in rows]}
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path


def log(message: str) -> None:
    """Progress on stderr-like stdout, timestamped (the table comes at the end)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)
