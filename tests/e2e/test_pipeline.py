"""The whole stack, started as a user starts it (``meterstream up``), against a ground truth computed
independently from the events sent: duplicates, out-of-order and hours-late events, three days across a
DST change, every window size, three time zones, grouping, subject filters, CSV."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import orjson
import pytest

from tests.helpers.events import Generated, generate, iso
from tests.helpers.stack import LocalStack
from tests.helpers.truth import Sent, expected, parse_csv, parse_json

pytestmark = pytest.mark.e2e

START = datetime(2025, 11, 1, 0, 0, tzinfo=UTC)  # America/New_York leaves DST on 2025-11-02 at 06:00Z
SPAN = timedelta(days=3)
N_EVENTS = 10_000
N_SUBJECTS = 60


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    data_dir = tmp_path_factory.mktemp("e2e") / "data"
    # A year-old test window must still count: allow that much lateness (the default is 7 days).
    env = {"METERSTREAM_PROCESSOR_ALLOWED_LATENESS_S": str(3 * 365 * 86400)}
    stack = LocalStack(data_dir, env).start()
    yield stack
    assert stack.stop() == 0, stack.service.log()[-3000:] if stack.service else ""


def post_batch(client: httpx.Client, events: list[dict[str, object]], content_type: str) -> None:
    response = client.post("/api/v1/events", content=orjson.dumps(events), headers={"Content-Type": content_type})
    assert response.status_code == 204, response.text


def wait_for_total(client: httpx.Client, expected_requests: int, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    got = None
    while time.monotonic() < deadline:
        rows = client.get("/api/v1/meters/requests/query").json()["data"]
        got = int(rows[0]["value"]) if rows else 0
        if got >= expected_requests:
            return
        time.sleep(0.5)
    raise AssertionError(f"only {got} of {expected_requests} requests stored after {timeout_s}s")


@pytest.fixture(scope="module")
def ingested(stack: LocalStack) -> list[Sent]:
    generated: list[Generated] = list(generate(N_EVENTS, start=START, span=SPAN, subjects=N_SUBJECTS))
    rng = random.Random(11)
    duplicates = rng.sample(generated, N_EVENTS // 20)
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        # Mostly batches, in random order (so times arrive out of order and hours late); a few single
        # events, structured and binary; then 5% exact duplicates, resent in other requests.
        order = list(generated)
        rng.shuffle(order)
        singles, rest = order[:40], order[40:]
        for i in range(0, len(rest), 250):
            kind = "application/cloudevents-batch+json" if i % 500 == 0 else "application/json; charset=utf-8"
            post_batch(client, [g.event for g in rest[i : i + 250]], kind)
        for g in singles[:20]:
            response = client.post(
                "/api/v1/events",
                content=orjson.dumps(g.event),
                headers={"Content-Type": "application/cloudevents+json"},
            )
            assert response.status_code == 204, response.text
        for g in singles[20:]:
            headers = {f"ce-{k}": str(v) for k, v in g.event.items() if k != "data"}
            headers["Content-Type"] = "application/json"
            response = client.post("/api/v1/events", content=orjson.dumps(g.event["data"]), headers=headers)
            assert response.status_code == 204, response.text
        for i in range(0, len(duplicates), 100):
            post_batch(client, [g.event for g in duplicates[i : i + 100]], "application/cloudevents-batch+json")
        wait_for_total(client, N_EVENTS)
        time.sleep(2)  # anything still in flight (there must be none) would show up as a mismatch below
    return [g.sent for g in generated]


def query(stack: LocalStack, meter: str, params: list[tuple[str, str]], accept: str = "application/json") -> str:
    response = httpx.get(
        f"{stack.url}/api/v1/meters/{meter}/query", params=params, headers={"Accept": accept}, timeout=30
    )
    assert response.status_code == 200, response.text
    return response.text


CASES = [
    # (meter, window, zone, group_by, subjects, from, to)
    ("requests", None, "UTC", (), (), None, None),
    ("tokens_total", None, "UTC", ("model",), (), None, None),
    ("cost_usd", None, "UTC", ("model", "provider"), (), None, None),
    ("cost_usd", "DAY", "America/New_York", ("model",), (), START, START + SPAN),
    ("tokens_total", "DAY", "America/New_York", ("subject",), (), START - timedelta(days=1), START + SPAN),
    (
        "input_tokens",
        "HOUR",
        "America/New_York",
        (),
        (),
        START + timedelta(hours=30),
        START + timedelta(hours=34),
    ),
    ("output_tokens", "HOUR", "Asia/Kolkata", ("model",), (), START, START + SPAN),
    ("cost_usd", "DAY", "Asia/Kolkata", (), ("user-001", "user-002"), START, START + SPAN),
    ("cache_read_tokens", "MONTH", "UTC", ("subject",), (), None, None),
    ("reasoning_tokens", "MONTH", "America/New_York", ("model",), (), START, START + SPAN),
    ("requests", "MINUTE", "UTC", ("model",), (), START + timedelta(hours=5), START + timedelta(hours=7)),
    ("cost_usd", "HOUR", "UTC", ("subject", "model"), ("user-007",), START, START + SPAN),
    ("unpriced_requests", None, "UTC", ("model",), (), None, None),
    # Unaligned bounds: the partial minutes at the edges come from the audit log.
    (
        "tokens_total",
        "HOUR",
        "UTC",
        ("model",),
        (),
        START + timedelta(hours=3, seconds=17, microseconds=123456),
        START + timedelta(hours=9, minutes=41, seconds=59, microseconds=1),
    ),
    (
        "cost_usd",
        None,
        "UTC",
        ("subject",),
        (),
        START + timedelta(seconds=30.5),
        START + timedelta(minutes=20, seconds=10),
    ),
    (
        "requests",
        "MINUTE",
        "UTC",
        (),
        (),
        START + timedelta(minutes=3, seconds=1),
        START + timedelta(minutes=3, seconds=59),
    ),
]


@pytest.mark.parametrize(("meter", "window", "zone", "group_by", "subjects", "start", "end"), CASES)
def test_query_equals_ground_truth(
    stack: LocalStack,
    ingested: list[Sent],
    meter: str,
    window: str | None,
    zone: str,
    group_by: tuple[str, ...],
    subjects: tuple[str, ...],
    start: datetime | None,
    end: datetime | None,
) -> None:
    params: list[tuple[str, str]] = [("windowTimeZone", zone)]
    if window:
        params.append(("windowSize", window))
    if start:
        params.append(("from", iso(start)))
    if end:
        params.append(("to", iso(end)))
    params += [("groupBy", g) for g in group_by] + [("subject", s) for s in subjects]
    truth = expected(
        ingested, meter, start=start, end=end, window=window, zone=zone, group_by=group_by, subjects=subjects
    )
    assert truth, "the case must select some events"
    got = parse_json(query(stack, meter, params))
    assert got == truth
    csv_got = parse_csv(query(stack, meter, params, accept="text/csv"), [*group_by, *(["subject"] if subjects else [])])
    assert csv_got == truth


def test_post_query_and_filter(stack: LocalStack, ingested: list[Sent]) -> None:
    body = {
        "from": iso(START),
        "to": iso(START + SPAN),
        "windowSize": "DAY",
        "windowTimeZone": "America/New_York",
        "groupBy": ["subject"],
        "filterGroupBy": {"model": ["gpt-4o", "claude-sonnet-4-20250514"]},
    }
    response = httpx.post(f"{stack.url}/api/v1/meters/cost_usd/query", json=body, timeout=30)
    assert response.status_code == 200, response.text
    truth = expected(
        ingested,
        "cost_usd",
        start=START,
        end=START + SPAN,
        window="DAY",
        zone="America/New_York",
        group_by=["subject"],
        include={"model": ["gpt-4o", "claude-sonnet-4-20250514"]},
    )
    assert parse_json(response.text) == truth


def test_dst_day_is_25_hours(stack: LocalStack, ingested: list[Sent]) -> None:
    rows = orjson.loads(
        query(
            stack,
            "requests",
            [
                ("windowSize", "DAY"),
                ("windowTimeZone", "America/New_York"),
                ("from", "2025-11-02T04:00:00Z"),
                ("to", "2025-11-03T05:00:00Z"),
            ],
        )
    )["data"]
    assert [(r["windowStart"], r["windowEnd"]) for r in rows] == [
        ("2025-11-02T00:00:00-04:00", "2025-11-03T00:00:00-05:00")
    ]


def test_duplicates_never_counted_twice(stack: LocalStack, ingested: list[Sent]) -> None:
    total = orjson.loads(query(stack, "requests", []))["data"][0]["value"]
    assert total == N_EVENTS
    metrics = httpx.get(f"{stack.url}/metrics").text
    dropped = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith(
            (
                "meterstream_ingest_duplicates_total",
                "meterstream_processor_duplicates_total",
                "meterstream_sink_duplicates_total",
            )
        )
    )
    assert dropped == N_EVENTS // 20


def test_reconciliation_finds_no_difference(stack: LocalStack, ingested: list[Sent]) -> None:
    response = httpx.get(
        f"{stack.url}/api/v1/admin/reconcile",
        params={"from": iso(START - timedelta(days=1)), "to": iso(START + SPAN + timedelta(days=1))},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert response.json()["differences"] == []


def test_cost_is_never_silently_zero(stack: LocalStack, ingested: list[Sent]) -> None:
    assert all(e.cost is not None and e.cost > 0 for e in ingested)
    (total,) = parse_json(query(stack, "cost_usd", [])).values()
    assert total == sum((e.cost for e in ingested if e.cost is not None), Decimal(0))


def test_data_survives_a_restart(stack: LocalStack, ingested: list[Sent], tmp_path: Path) -> None:
    before = query(stack, "cost_usd", [("groupBy", "subject")])
    assert stack.stop() == 0
    stack.start()
    assert query(stack, "cost_usd", [("groupBy", "subject")]) == before


def test_engine_memory_on_metrics(stack: LocalStack, ingested: list[Sent]) -> None:
    """The embedded engine's own memory accounting is scraped with the rest (most of the sink's RSS)."""
    samples = {
        line.split('metric="', 1)[1].split('"', 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in httpx.get(f"{stack.url}/metrics").text.splitlines()
        if line.startswith("meterstream_clickhouse_memory_bytes{")
    }
    assert samples["MemoryTracking"] > 0  # the engine has stored and answered queries by now
    assert {"MarkCacheBytes", "MergesMutationsMemoryTracking", "QueryConditionCacheBytes"} <= samples.keys()
