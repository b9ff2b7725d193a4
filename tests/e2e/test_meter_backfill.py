"""A user meter made after its events were stored is backfilled from the audit log in the background, its
progress shown, and then kept from the stream: equal to a meter that existed from the start and to a ground
truth computed here, though the sink and the processor are killed with SIGKILL during the backfill while
events keep coming (duplicates among them)."""

from __future__ import annotations

import datetime as dt
import json
import random
import threading
import time
from collections import defaultdict
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers.events import post_batch
from tests.helpers.stack import MultiProcessStack

pytestmark = pytest.mark.e2e

UTC = dt.UTC
NOW = dt.datetime.now(UTC).replace(second=0, microsecond=0)
DEFINITIONS: dict[str, dict[str, Any]] = {
    "seconds": {"aggregation": "SUM", "valueProperty": "$.seconds"},
    "jobs": {"aggregation": "COUNT"},
    "workers": {"aggregation": "UNIQUE_COUNT", "valueProperty": "$.worker"},
    "last": {"aggregation": "LATEST", "valueProperty": "$.seconds"},
}


def jobs(n: int) -> list[dict[str, Any]]:
    rng = random.Random(21)
    events = []
    for i in range(n):
        data: dict[str, Any] = {"queue": rng.choice(["fast", "slow"]), "worker": f"w{rng.randrange(40)}"}
        kind = rng.random()
        if kind < 0.8:
            data["seconds"] = rng.randrange(1, 900)
        elif kind < 0.9:
            data["seconds"] = f"{rng.randrange(1, 90000) / 100:.2f}"
        t = NOW - dt.timedelta(microseconds=rng.randrange(int(5 * 3600 * 1e6)))
        events.append(
            {
                "specversion": "1.0",
                "id": f"job-{i}",
                "source": "scheduler",
                "type": "job_done",
                "subject": f"team-{rng.randrange(5)}",
                "time": t.isoformat().replace("+00:00", "Z"),
                "data": data,
            }
        )
    return events


def truth(events: list[dict[str, Any]], aggregation: str) -> dict[tuple[Any, ...], Decimal]:
    by: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        t = dt.datetime.fromisoformat(e["time"])
        by[(t.replace(minute=0, second=0, microsecond=0), e["subject"], e["data"]["queue"])].append(e)
    out: dict[tuple[Any, ...], Decimal] = {}
    for key, members in by.items():
        valued = [(Decimal(str(e["data"]["seconds"])), e) for e in members if "seconds" in e["data"]]
        if aggregation == "COUNT":
            out[key] = Decimal(len(members))
        elif aggregation == "UNIQUE_COUNT":
            out[key] = Decimal(len({e["data"]["worker"] for e in members}))
        elif valued and aggregation == "SUM":
            out[key] = sum((v for v, _ in valued), Decimal(0))
        elif valued:  # LATEST: by event time, ties by id
            out[key] = max(valued, key=lambda ve: (ve[1]["time"], ve[1]["id"]))[0]
    return out


def create(url: str, slug: str, definition: dict[str, Any]) -> None:
    body = {"slug": slug, "eventType": "job_done", "groupBy": {"queue": "$.queue"}} | definition
    r = httpx.post(f"{url}/api/v1/meters", json=body, timeout=10)
    assert r.status_code == 201, r.text


def ingest(url: str, events: list[dict[str, Any]], pause_s: float = 0.0) -> None:
    for i in range(0, len(events), 250):
        post_batch(url, events[i : i + 250])
        time.sleep(pause_s)


def answer(url: str, slug: str) -> dict[tuple[Any, ...], Decimal]:
    params = [
        ("windowSize", "HOUR"),
        ("groupBy", "subject"),
        ("groupBy", "queue"),
        ("from", (NOW - dt.timedelta(hours=6)).isoformat()),
        ("to", (NOW + dt.timedelta(hours=1)).isoformat()),
    ]
    r = httpx.get(f"{url}/api/v1/meters/{slug}/query", params=params, timeout=30)
    assert r.status_code == 200, r.text
    rows = json.loads(r.text, parse_float=Decimal, parse_int=Decimal)["data"]
    return {
        (dt.datetime.fromisoformat(row["windowStart"]).astimezone(UTC), row["subject"], row["groupBy"]["queue"]): row[
            "value"
        ]
        for row in rows
    }


def annotations(url: str, slug: str) -> dict[str, str]:
    for _ in range(100):  # the sink may be restarting
        try:
            r = httpx.get(f"{url}/api/v1/meters/{slug}", timeout=10)
            if r.status_code == 200:
                return dict(r.json()["annotations"])
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"meter {slug} cannot be read")


def total(url: str, slug: str) -> Decimal:
    r = httpx.get(f"{url}/api/v1/meters/{slug}/query", timeout=30)
    assert r.status_code == 200, r.text
    return sum((Decimal(str(row["value"])) for row in r.json()["data"]), Decimal(0))


def wait_backfilling(url: str, slug: str, timeout_s: float = 60) -> str:
    """Wait until ``slug``'s backfill has begun (some events in its states, not all), and return its progress."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = annotations(url, slug)
        done, _, of = state.get("meterstream.backfill", "0/0").partition("/")
        if state.get("meterstream.states") == "backfilling" and 0 < int(done) < int(of):
            return state["meterstream.backfill"]
        time.sleep(0.05)
    raise AssertionError(f"no backfill of {slug} seen: {annotations(url, slug)}")


@pytest.mark.slow
def test_a_meter_made_later_survives_kills_during_its_backfill(tmp_path: Path) -> None:
    env = {
        "METERSTREAM_PROCESSOR_ALLOWED_LATENESS_S": str(86400),
        "METERSTREAM_SINK_BACKFILL_CHUNK_ROWS": "400",  # many small chunks: the kills land inside the backfill
    }
    stack = MultiProcessStack(tmp_path / "stack", control=True, extra_env=env).start()
    try:
        assert stack.sink is not None
        url, events = stack.query_url, jobs(10_000)
        for name, definition in DEFINITIONS.items():
            create(url, f"early_{name}", definition)
        ingest(stack.ingest_url, events[:5000])
        deadline = time.monotonic() + 120
        while total(url, "early_jobs") < 5000:
            assert time.monotonic() < deadline, total(url, "early_jobs")
            time.sleep(0.3)
        for name, definition in DEFINITIONS.items():
            create(url, f"later_{name}", definition)

        # The other half arrives during the backfill, 1,000 of the first half again among it.
        rest = events[5000:] + events[:1000]
        random.Random(5).shuffle(rest)
        sender = threading.Thread(target=ingest, args=(stack.ingest_url, rest, 0.4))
        sender.start()
        progress = [wait_backfilling(url, "later_seconds")]
        stack.sink.kill()
        stack.restart(stack.sink)
        stack.processors[0].kill()
        stack.restart(stack.processors[0])
        progress.append(wait_backfilling(url, "later_workers"))
        stack.sink.kill()
        stack.restart(stack.sink)
        sender.join()

        deadline = time.monotonic() + 180
        while total(url, "early_jobs") < 10_000 or total(url, "later_jobs") < 10_000:
            assert time.monotonic() < deadline, (total(url, "early_jobs"), total(url, "later_jobs"))
            time.sleep(0.5)
        for name in DEFINITIONS:
            for prefix in ("early", "later"):
                while annotations(url, f"{prefix}_{name}").get("meterstream.states") != "ready":
                    assert time.monotonic() < deadline, annotations(url, f"{prefix}_{name}")
                    time.sleep(0.3)
        for name, definition in DEFINITIONS.items():
            expected = truth(events, definition["aggregation"])
            assert answer(url, f"later_{name}") == expected, name
            assert answer(url, f"early_{name}") == expected, name
        assert "meterstream.backfill" not in annotations(url, "later_seconds"), progress  # shown while it runs
    except BaseException:
        print(stack.logs()[-20000:])
        raise
    finally:
        stack.stop()
