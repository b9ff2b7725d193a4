"""Baseline: the tutorial approach to metering LLM usage, as a plain script.

Every event is parsed, priced with genai-prices (``calc_price``, as the tutorials call it) and written with
one INSERT and one COMMIT into a table ``events(subject, provider, model, time, input_tokens,
output_tokens, tokens, cost)``; queries are GROUP BYs over that table (indexed on subject, time). Runs on
SQLite (standard library) or PostgreSQL (psycopg), with their default durability: a COMMIT is on disk.

Standalone on purpose (no Meterstream imports): it runs in Meterstream's venv for SQLite and in the
baselines' venv (which has psycopg) for PostgreSQL. Every command prints one JSON object.

    tutorial.py ingest --db sqlite --target /tmp/t.db --events events.jsonl --seconds 10
    tutorial.py load   --db postgres --target "host=... user=..." --rows 10000000 --subjects 10000 --days 30
    tutorial.py query  --db sqlite --target /tmp/t.db --runs 50 --subjects 10000 --days 30 --end 1700000000
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

#: USD per million input and output tokens by model, for synthesising stored rows (not for ingest,
#: which prices with genai-prices).
_MODELS = (
    ("openai", "gpt-4o-mini", 0.15, 0.6),
    ("openai", "gpt-4o", 2.5, 10.0),
    ("anthropic", "claude-sonnet-4-20250514", 3.0, 15.0),
    ("anthropic", "claude-3-5-haiku-20241022", 0.8, 4.0),
    ("google", "gemini-2.0-flash", 0.1, 0.4),
)


def connect(db: str, target: str) -> Any:
    if db == "sqlite":
        import sqlite3

        return sqlite3.connect(target)
    import psycopg

    return psycopg.connect(target)


def sql(db: str, text: str) -> str:
    return text if db == "sqlite" else text.replace("?", "%s")


def create_table(db: str, conn: Any) -> None:
    time_type = "TEXT" if db == "sqlite" else "TIMESTAMPTZ"
    cost_type = "REAL" if db == "sqlite" else "NUMERIC"
    conn.execute("DROP TABLE IF EXISTS events")
    conn.execute(
        f"CREATE TABLE events (subject TEXT, provider TEXT, model TEXT, time {time_type}, "
        f"input_tokens INTEGER, output_tokens INTEGER, tokens INTEGER, cost {cost_type})"
    )
    conn.execute("CREATE INDEX events_subject_time ON events (subject, time)")
    conn.commit()


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))]


def ingest(args: argparse.Namespace) -> dict[str, Any]:
    """One event at a time, as a request handler would: parse, price, INSERT, COMMIT."""
    from genai_prices import Usage, calc_price

    conn = connect(args.db, args.target)
    create_table(args.db, conn)
    insert = sql(args.db, "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
    with open(args.events, "rb") as f:
        lines = f.readlines()
    latencies: list[float] = []
    started = time.perf_counter()
    cpu_start = cpu_s()
    deadline = started + args.seconds
    for line in lines:
        t0 = time.perf_counter()
        if t0 >= deadline:
            break
        event = json.loads(line)
        data = event["data"]
        usage = Usage(
            input_tokens=data["input_tokens"],
            cache_read_tokens=data.get("cache_read_tokens", 0),
            output_tokens=data["output_tokens"],
        )
        price = calc_price(usage, model_ref=data["model"], provider_id=data["provider"])
        tokens = data["input_tokens"] + data["output_tokens"]
        cost = float(price.total_price) if args.db == "sqlite" else price.total_price
        when = event["time"]
        conn.execute(
            insert,
            (event["subject"], data["provider"], data["model"], when, data["input_tokens"], data["output_tokens"],
             tokens, cost),
        )  # fmt: skip
        conn.commit()
        latencies.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - started
    conn.close()
    return {
        "events": len(latencies),
        "seconds": elapsed,
        "events_per_s": len(latencies) / elapsed,
        "p50_ms": (pct(latencies, 50) or 0) * 1000,
        "p99_ms": (pct(latencies, 99) or 0) * 1000,
        "cpu_cores": (cpu_s() - cpu_start) / elapsed,
    }


def load(args: argparse.Namespace) -> dict[str, Any]:
    """``rows`` stored events over ``days`` days before ``end``, generated inside the database."""
    conn = connect(args.db, args.target)
    create_table(args.db, conn)
    conn.execute("DROP INDEX events_subject_time")
    start = args.end - args.days * 86400
    span = args.days * 86400
    started = time.perf_counter()
    case_provider = " ".join(f"WHEN {i} THEN '{p}'" for i, (p, _, _, _) in enumerate(_MODELS))
    case_model = " ".join(f"WHEN {i} THEN '{m}'" for i, (_, m, _, _) in enumerate(_MODELS))
    case_in = " ".join(f"WHEN {i} THEN {pi}" for i, (_, _, pi, _) in enumerate(_MODELS))
    case_out = " ".join(f"WHEN {i} THEN {po}" for i, (_, _, _, po) in enumerate(_MODELS))
    if args.db == "sqlite":
        conn.execute(
            f"""
            INSERT INTO events
            WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < {args.rows - 1})
            SELECT printf('user-%05d', i % {args.subjects}),
                   CASE m {case_provider} END, CASE m {case_model} END,
                   datetime({start} + t, 'unixepoch'), inp, outp, inp + outp,
                   (inp * (CASE m {case_in} END) + outp * (CASE m {case_out} END)) / 1e6
            FROM (SELECT i, abs(random()) % 5 AS m, abs(random()) % {span} AS t,
                         50 + abs(random()) % 20000 AS inp, 1 + abs(random()) % 4000 AS outp FROM n)
            """
        )
    else:
        conn.execute(
            f"""
            INSERT INTO events
            SELECT 'user-' || lpad((i % {args.subjects})::text, 5, '0'),
                   CASE m {case_provider} END, CASE m {case_model} END,
                   to_timestamp({start} + t), inp, outp, inp + outp,
                   (inp * (CASE m {case_in} END) + outp * (CASE m {case_out} END))::numeric / 1000000
            FROM (SELECT i, floor(random() * 5)::int AS m, floor(random() * {span})::int AS t,
                         50 + floor(random() * 20000)::int AS inp, 1 + floor(random() * 4000)::int AS outp
                  FROM generate_series(0, {args.rows - 1}) AS i) AS g
            """
        )
    conn.execute("CREATE INDEX events_subject_time ON events (subject, time)")
    conn.commit()
    if args.db == "postgres":
        conn.execute("ANALYZE events")
        conn.commit()
    else:
        conn.execute("ANALYZE")
        conn.commit()
    conn.close()
    return {"rows": args.rows, "seconds": time.perf_counter() - started}


def query(args: argparse.Namespace) -> dict[str, Any]:
    """p50/p95 of the per-subject HOUR and DAY queries grouped by model, and of the top-100 subjects."""
    conn = connect(args.db, args.target)
    start, end = args.end - args.days * 86400, args.end
    if args.db == "sqlite":
        lo = datetime.fromtimestamp(start, UTC).strftime("%Y-%m-%d %H:%M:%S")
        hi = datetime.fromtimestamp(end, UTC).strftime("%Y-%m-%d %H:%M:%S")
        bucket = {"hour": "strftime('%Y-%m-%d %H:00:00', time)", "day": "strftime('%Y-%m-%d', time)"}
    else:
        lo, hi = datetime.fromtimestamp(start, UTC), datetime.fromtimestamp(end, UTC)  # type: ignore[assignment]
        bucket = {"hour": "date_trunc('hour', time)", "day": "date_trunc('day', time)"}
    rng = random.Random(5)
    results: dict[str, Any] = {}

    def measure(name: str, runs: int, run: Callable[[], int]) -> None:
        run()  # warm
        times, rows = [], 0
        for _ in range(runs):
            t0 = time.perf_counter()
            rows = run()
            times.append(time.perf_counter() - t0)
        results[name] = {"p50_ms": pct(times, 50) * 1000, "p95_ms": pct(times, 95) * 1000, "runs": runs, "rows": rows}  # type: ignore[operator]

    for size in ("hour", "day"):
        text = sql(
            args.db,
            f"SELECT {bucket[size]} AS w, model, SUM(cost) FROM events "
            "WHERE subject = ? AND time >= ? AND time < ? GROUP BY w, model",
        )
        measure(
            f"subject_{size}",
            args.runs,
            lambda text=text: len(conn.execute(text, (f"user-{rng.randrange(args.subjects):05d}", lo, hi)).fetchall()),
        )
    top = sql(
        args.db,
        "SELECT subject, SUM(cost) AS c FROM events WHERE time >= ? AND time < ? GROUP BY subject "
        "ORDER BY c DESC LIMIT 100",
    )
    measure("top100", args.top_runs, lambda: len(conn.execute(top, (lo, hi)).fetchall()))
    conn.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["ingest", "load", "query"])
    parser.add_argument("--db", choices=["sqlite", "postgres"], required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--events")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--subjects", type=int, default=10_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--end", type=int, default=0)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--top-runs", type=int, default=10)
    args = parser.parse_args()
    result = {"ingest": ingest, "load": load, "query": query}[args.command](args)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
