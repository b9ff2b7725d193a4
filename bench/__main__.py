"""``python -m bench [scenario ...] [--smoke] [options]``: run the benchmarks, print one table.

Scenarios: ingest, processing, freshness, limits, access, reservations, alerts, query, meters (the default set), and
soak (only when named). Raw results go to bench/results/bench-<time>.json. Benchmarks measure; they never fail
on a timing (a scenario that cannot run at all is an error).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from bench import scenarios, ui
from bench.common import ForeignLoad, Row, log, machine, table, write_results

SCENARIOS: dict[str, Callable[[scenarios.Sizes, Path], list[Row]]] = {
    "ingest": scenarios.ingest,
    "processing": scenarios.processing,
    "freshness": scenarios.freshness,
    "limits": scenarios.limits,
    "access": scenarios.access,
    "reservations": scenarios.reservations,
    "alerts": scenarios.alerts,
    "query": scenarios.query,
    "meters": scenarios.meters,
    "ui": ui.ui,
    "soak": scenarios.soak,
}
DEFAULT = ("ingest", "processing", "freshness", "limits", "access", "reservations", "alerts", "query", "meters", "ui")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("scenarios", nargs="*", help=f"{', '.join(SCENARIOS)} (default: {' '.join(DEFAULT)})")
    parser.add_argument("--smoke", action="store_true", help="every scenario at a tiny size (proves the harness)")
    parser.add_argument("--minutes", type=float, help="soak duration")
    parser.add_argument("--settle", type=float, help="soak: seconds before growth is judged (default: a third)")
    parser.add_argument("--processing-events", type=int, help="events pre-filled for the processing scenario")
    parser.add_argument("--query-events", type=int, help="events' worth of windows stored for the query scenario")
    parser.add_argument("--tutorial-query-events", type=int, help="rows loaded into SQLite/PostgreSQL for queries")
    parser.add_argument("--freshness-seconds", type=float, help="duration of the freshness run")
    parser.add_argument("--alerts-seconds", type=float, help="seconds of probe events of the alerts run")
    parser.add_argument("--rate", type=float, help="events/s of the steady load (freshness, limits, alerts, soak)")
    parser.add_argument("--no-baselines", action="store_true", help="Meterstream only (Quix Streams is skipped)")
    parser.add_argument("--profile", action="store_true", help="py-spy profiles of the measured processes")
    parser.add_argument("--work-dir", type=Path, help="where the stacks keep their data (default: a temp dir)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    unknown = [name for name in args.scenarios if name not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; choose from {list(SCENARIOS)}")
    names = args.scenarios or (list(DEFAULT) if not args.smoke else [*DEFAULT, "soak"])
    sizes = scenarios.SMOKE if args.smoke else scenarios.FULL
    overrides = {
        "soak_minutes": args.minutes,
        "soak_settle_s": args.settle,
        "processing_events": args.processing_events,
        "query_events": args.query_events,
        "tutorial_query_events": args.tutorial_query_events,
        "freshness_seconds": args.freshness_seconds,
        "alerts_seconds": args.alerts_seconds,
        "freshness_events_per_s": args.rate,
        "soak_events_per_s": args.rate,
        "profile": args.profile or None,
        "baselines": False if args.no_baselines else None,
    }
    sizes = dataclasses.replace(sizes, **{k: v for k, v in overrides.items() if v is not None})
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="meterstream-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    meta = {"machine": machine(), "command": " ".join(["python -m bench", *(argv or sys.argv[1:])]),
            "sizes": dataclasses.asdict(sizes), "scenarios": names, "work_dir": str(work)}  # fmt: skip
    log(f"scenarios {names} in {work} on {meta['machine']}")
    rows: list[Row] = []
    failures = []
    started = time.monotonic()
    for name in names:
        log(f"--- {name}")
        t0 = time.monotonic()
        foreign = ForeignLoad().start()
        try:
            rows.extend(SCENARIOS[name](sizes, work))
        except Exception as exc:
            traceback.print_exc()
            failures.append(f"{name}: {type(exc).__name__}: {exc}"[:2000])
        neighbours = foreign.stop()
        meta.setdefault("foreign_load", {})[name] = neighbours
        log(f"--- {name} took {time.monotonic() - t0:.0f}s; other processes on the machine used {neighbours}")
    meta["seconds"] = round(time.monotonic() - started)
    meta["failures"] = failures
    path = write_results(rows, meta)
    m = meta["machine"]
    print(f"\nMeterstream benchmarks at {m['commit']}{' (uncommitted changes)' if m['dirty'] else ''} on "
          f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Python {m['python']}; "
          f"ratio > 1: Meterstream is better\n")  # fmt: skip
    print(table(rows))
    busy = {name: load["mean_cores"] for name, load in meta["foreign_load"].items() if load["mean_cores"] > 0.05}
    if busy:
        print(f"\nnote: other processes on this machine used CPU meanwhile (mean cores by scenario): {busy}")
    print(f"\nraw results: {path}")
    for failure in failures:
        print(f"FAILED {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
