"""``python -m bench.instructions [--baseline REV] [--events N] [--stages S ...]``: instructions per event of
each stage's own Python work, this tree against another revision, counted by callgrind in the same run.

Why instructions: on a shared 2-core VM the CPU time of the same loop moves by a third from one run to the
next, which hides a 10 % change; callgrind counts the instructions executed, which do not move (the same
run twice differs by well under 1 %). This VM exposes no hardware counters (``perf stat`` has none), so
valgrind it is (``apt install valgrind``). What is counted, per stage, in one process and without I/O:

* ingest: ``IngestService.ingest`` on 1,000-event batch bodies (``bench.events``), with a producer that
  returns at once: parsing, checks, duplicate cache, partitioning, record encoding;
* processor: decoding an events record, ``process_record`` (pricing, windows, audit columns), encoding the
  windows record and the dead letters, the recent-keys cache;
* sink: decoding windows records, ``plan_batch``, the audit and window columns of the insert, and
  ``Sink._record`` (recent keys, Bloom filter); the ClickHouse insert itself (clickhouse-connect's encoding
  and the engine) is not in it.

Caches are warmed first; instrumentation is switched on (``callgrind_control -i on``) only around the
measured loop, so imports and set-up are not counted. The baseline runs from a temporary ``git worktree``
of ``REV`` with the same interpreter; the stage code below only uses interfaces both revisions have.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

#: This tree (the module is also run as a script, under callgrind, before ``bench`` can be imported).
ROOT = Path(__file__).resolve().parent.parent
STAGES = ("ingest", "processor", "sink")


def _toggle(state: str) -> None:
    subprocess.run(["callgrind_control", "-i", state, str(os.getpid())], stdout=subprocess.DEVNULL, check=False)


def _ingest(events: int) -> int:
    import asyncio
    import itertools

    from bench.events import body_templates
    from ingest.service import IngestService
    from meterstream.runtime import tune_gc
    from schemas.settings import IngestSettings

    class InstantProducer:
        def partitions(self) -> int:
            return 16

        async def send(self, records: list[tuple[int, bytes]], timestamp_ms: int) -> list[int]:
            return [0] * len(records)

    templates = body_templates(8, 1000, subjects=10_000, seed=1)
    service = IngestService(IngestSettings(), InstantProducer())  # type: ignore[arg-type]
    ids = itertools.count()

    def body(n: int) -> bytes:
        template = templates[n % len(templates)]
        return template.render([str(next(ids)).encode() for _ in range(template.events)])

    warm = [body(n) for n in range(8)]
    measured = [body(n) for n in range(max(1, events // 1000))]
    headers = {"content-type": templates[0].content_type}

    async def run() -> None:
        for value in warm:
            await service.ingest(headers, value)
        tune_gc()
        _toggle("on")
        for value in measured:
            await service.ingest(headers, value)
        _toggle("off")

    asyncio.run(run())
    return len(measured) * 1000


def _processor(events: int) -> int:
    from bench.events import events_records
    from meterstream.runtime import tune_gc
    from processors.pricing import Pricer
    from processors.windows import WindowPolicy, process_record
    from schemas.recent import RecentKeys
    from schemas.records import decode_events, encode

    records = list(events_records(events + 4000, partitions=4, subjects=10_000, per_request=1000, seed=1))
    pricer, policy = Pricer(), WindowPolicy(24 * 3600 * 10**6)

    def run(part: list[tuple[int, bytes, int]], recent: RecentKeys[tuple[str, str], None]) -> int:
        count = 0
        for offset, (partition, value, n) in enumerate(part):
            out = process_record(
                decode_events(value), topic_id="t", partition=partition, offset=offset, policy=policy,
                pricer=pricer, known=recent,
            )  # fmt: skip
            encode(out.windows)
            for letter in out.dead_letters:
                encode(letter)
            for key in out.keys:
                recent.add(key, None)
            count += n
        return count

    warm = [r for r in records if r[2]][:16]
    run(warm, RecentKeys(100_000))
    measured = records[16:]
    tune_gc()
    _toggle("on")
    count = run(measured, RecentKeys(100_000))
    _toggle("off")
    return count


def _sink(events: int) -> int:
    import time
    import types
    from datetime import UTC, datetime

    from rbloom import Bloom

    from bench.events import events_records
    from meterstream.runtime import tune_gc
    from processors.pricing import Pricer
    from processors.windows import WindowPolicy, process_record
    from schemas.recent import RecentKeys
    from schemas.records import decode_events, decode_windows, encode
    from sinks.apply import plan_batch
    from sinks.clickhouse.store import _event_columns, _window_columns
    from sinks.consumer import Sink

    pricer, policy = Pricer(), WindowPolicy(24 * 3600 * 10**6)
    values, offsets = [], {}
    for partition, value, _ in events_records(2 * events, partitions=4, subjects=10_000, per_request=1000, seed=1):
        offset = offsets[partition] = offsets.get(partition, -1) + 1
        out = process_record(
            decode_events(value), topic_id="t", partition=partition, offset=offset, policy=policy, pricer=pricer
        )
        values.append(encode(out.windows))
    # Sink._record on a stand-in holding only what it touches (the same in both revisions).
    sink = types.SimpleNamespace(
        _recent=RecentKeys(100_000), _stored=Bloom(4 * events + 1000, 0.01), _stored_count=0,
        _settings=types.SimpleNamespace(dedupe_capacity=10**9), last_write=0.0,
    )  # fmt: skip
    applied: dict[tuple[str, int], int] = {}

    def lookup(keys: list[tuple[str, str]]) -> dict[tuple[str, str], object]:
        return {key: None for key in keys if key in sink._stored}

    def run(part: list[bytes]) -> int:
        count = 0
        for start in range(0, len(part), 16):
            records = [decode_windows(value) for value in part[start : start + 16]]
            plan = plan_batch(records, applied, lookup)  # type: ignore[arg-type]
            if plan.gaps or plan.duplicates:
                raise AssertionError(f"unexpected gaps or duplicates: {plan.gaps} {plan.duplicates}")
            now = datetime.now(UTC)
            _event_columns(plan, now)
            _window_columns(plan)
            Sink._record(sink, plan, now, time.monotonic())  # type: ignore[arg-type]
            applied.update(plan.offsets)
            count += sum(len(r["events"]["id"]) for r in records)
        return count

    half = len(values) // 2
    run(values[:half])
    tune_gc()
    _toggle("on")
    count = run(values[half:])
    _toggle("off")
    return count


def _count(tree: Path, stage: str, events: int, out_dir: Path) -> float:
    """Instructions per event of ``stage`` run from ``tree``, under callgrind."""
    out = out_dir / f"{tree.name}-{stage}.callgrind"
    command = [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
        sys.executable, __file__, "--stage", stage, "--events", str(events),
    ]  # fmt: skip
    env = {**os.environ, "BENCH_TREE": str(tree)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tree, check=False)
    counted = re.search(r"^events (\d+)$", done.stdout, re.MULTILINE)
    totals = re.search(r"^totals: (\d+)$", out.read_text(), re.MULTILINE) if out.exists() else None
    if done.returncode != 0 or counted is None or totals is None:
        raise RuntimeError(f"{stage} from {tree} failed ({done.returncode}): {done.stderr[-2000:]}")
    return int(totals.group(1)) / int(counted.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="HEAD", help="revision to compare with (default: HEAD)")
    parser.add_argument("--events", type=int, default=8000, help="events measured per stage (default 8,000)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="stages to count")
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # the child run under callgrind
    args = parser.parse_args(argv)
    if args.stage:
        # The measured tree first, in place of this script's folder (whose bench/profile.py would shadow
        # the standard library's).
        sys.path[0] = os.environ.get("BENCH_TREE", str(ROOT))
        count = {"ingest": _ingest, "processor": _processor, "sink": _sink}[args.stage](args.events)
        print(f"events {count}")
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt install valgrind)", file=sys.stderr)
        return 2
    revision = subprocess.run(
        ["git", "rev-parse", "--short", args.baseline], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="meterstream-instructions-") as temp:
        base = Path(temp) / f"baseline-{revision}"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(base), revision], cwd=ROOT, check=True)
        try:
            print(f"instructions per event (callgrind), this tree against {revision}; ratio > 1: this tree is better")
            print("| stage | this tree | baseline | ratio |")
            print("|---|---|---|---|")
            for stage in args.stages:
                here = _count(ROOT, stage, args.events, Path(temp))
                there = _count(base, stage, args.events, Path(temp))
                print(f"| {stage} | {here:,.0f} | {there:,.0f} ({revision}) | {there / here:.2f}x |", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
