"""User-defined meters (issue 18): OpenMeter's model, created through OpenMeter's official client and the
meters file, every aggregation answered against a ground truth computed here, independently: duplicates,
events sent late and out of order, a DST change in the query's time zone, missing and non-numeric values."""

from __future__ import annotations

import datetime as dt
import json
import random
from collections import defaultdict
from collections.abc import Iterator
from decimal import ROUND_DOWN, Decimal, localcontext
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from corehttp.exceptions import HttpResponseError
from openmeter import Client
from openmeter.models import Event

from tests.helpers.events import post_batch
from tests.helpers.stack import LocalStack

pytestmark = pytest.mark.e2e

UTC = dt.UTC
ZONE = "Europe/Budapest"  # leaves DST on 2025-10-26 at 01:00Z: that local day has 25 hours
START = dt.datetime(2025, 10, 25, 12, 0, tzinfo=UTC)
SPAN = dt.timedelta(hours=40)
AGGREGATIONS = ("SUM", "COUNT", "UNIQUE_COUNT", "AVG", "MIN", "MAX", "LATEST")
METERS_FILE = """
meters:
  - slug: api_latency_max
    event_type: api_calls
    aggregation: MAX
    value_property: $.duration_ms
    group_by:
      method: $.method
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    base = tmp_path_factory.mktemp("user-meters")
    meters_file = base / "meters.yaml"
    meters_file.write_text(METERS_FILE)
    env = {
        "METERSTREAM_PROCESSOR_ALLOWED_LATENESS_S": str(3 * 365 * 86400),
        "METERSTREAM_LOCAL_METERS_FILE": str(meters_file),
    }
    stack = LocalStack(base / "data", env=env).start()
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def client(stack: LocalStack) -> Client:
    return Client(endpoint=stack.url, retry_total=0)


def iso(t: dt.datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def api_calls(n: int, seed: int) -> list[dict[str, Any]]:
    """Events of type api_calls: a duration (a number, a numeric string, missing, or not a number), a method,
    a user agent; spread over SPAN around the DST change, shuffled (so sent out of order, some hours late)."""
    rng = random.Random(seed)
    events = []
    for i in range(n):
        t = START + dt.timedelta(microseconds=rng.randrange(int(SPAN.total_seconds() * 1e6)))
        data: dict[str, Any] = {"method": rng.choice(["GET", "POST", "PUT"]), "agent": f"agent-{rng.randrange(25)}"}
        kind = rng.random()
        if kind < 0.70:
            data["duration_ms"] = rng.randrange(1, 5000)
        elif kind < 0.85:
            data["duration_ms"] = f"{rng.randrange(1, 500_000) / 100:.2f}"  # numeric strings count too
        elif kind < 0.93:
            pass  # missing: left out of SUM/AVG/MIN/MAX/LATEST, never taken as 0
        else:
            data["duration_ms"] = "n/a"  # not a number: likewise
        events.append(
            {
                "specversion": "1.0",
                "id": f"call-{seed}-{i}",
                "source": "api-gateway",
                "type": "api_calls",
                "subject": f"customer-{rng.randrange(4)}",
                "time": iso(t),
                "data": data,
            }
        )
    rng.shuffle(events)
    return events


def value_of(event: dict[str, Any]) -> Decimal | None:
    raw = event["data"].get("duration_ms")
    if raw is None:
        return None
    try:
        return Decimal(str(raw))
    except ArithmeticError:
        return None


def window(t: dt.datetime, size: str) -> tuple[dt.datetime, dt.datetime]:
    local = t.astimezone(ZoneInfo(ZONE))
    if size == "HOUR":
        start = local.replace(minute=0, second=0, microsecond=0)
        return start.astimezone(UTC), start.astimezone(UTC) + dt.timedelta(hours=1)
    day = local.date()
    start = dt.datetime.combine(day, dt.time(), ZoneInfo(ZONE))
    end = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), ZoneInfo(ZONE))
    return start.astimezone(UTC), end.astimezone(UTC)


def truth(events: list[dict[str, Any]], aggregation: str, size: str) -> dict[tuple[Any, ...], Decimal]:
    """The answer, computed from the events sent (each (source, id) once), per window, subject and method."""
    unique = {(e["source"], e["id"]): e for e in events}.values()
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for e in unique:
        t = dt.datetime.fromisoformat(e["time"])
        groups[(*window(t, size), e["subject"], e["data"]["method"])].append(e)
    out: dict[tuple[Any, ...], Decimal] = {}
    for key, members in groups.items():
        valued = [(value_of(e), e) for e in members]
        values = [v for v, _ in valued if v is not None]
        if aggregation == "COUNT":
            out[key] = Decimal(len(members))
        elif aggregation == "UNIQUE_COUNT":
            out[key] = Decimal(len({e["data"]["agent"] for e in members}))
        elif not values:
            continue  # nothing to aggregate: no row (never a silent 0)
        elif aggregation == "SUM":
            out[key] = sum(values, Decimal(0))
        elif aggregation == "AVG":
            out[key] = (sum(values, Decimal(0)) / len(values)).quantize(Decimal("1e-18"), rounding=ROUND_DOWN)
        elif aggregation == "MIN":
            out[key] = min(values)
        elif aggregation == "MAX":
            out[key] = max(values)
        else:  # LATEST: by event time, ties by id
            latest = max(((v, e) for v, e in valued if v is not None), key=lambda ve: (ve[1]["time"], ve[1]["id"]))
            out[key] = latest[0]
    return out


def answer(stack: LocalStack, slug: str, size: str) -> dict[tuple[Any, ...], Decimal]:
    params: list[tuple[str, str | int | float | bool | None]] = [
        ("windowSize", size),
        ("windowTimeZone", ZONE),
        ("groupBy", "subject"),
        ("groupBy", "method"),
        ("from", iso(START - dt.timedelta(days=1))),
        ("to", iso(START + SPAN + dt.timedelta(days=1))),
    ]
    r = httpx.get(f"{stack.url}/api/v1/meters/{slug}/query", params=params, timeout=30)
    assert r.status_code == 200, r.text
    rows = json.loads(r.text, parse_float=Decimal, parse_int=Decimal)["data"]
    return {
        (
            dt.datetime.fromisoformat(row["windowStart"]).astimezone(UTC),
            dt.datetime.fromisoformat(row["windowEnd"]).astimezone(UTC),
            row["subject"],
            row["groupBy"]["method"],
        ): row["value"]
        for row in rows
    }


def ingest(stack: LocalStack, events: list[dict[str, Any]]) -> None:
    post_batch(stack.url, events)


def stored(stack: LocalStack, slug: str, count: int) -> None:
    """Wait for ``count`` events in meter ``slug``, and for every user meter's states to be ready (backfilled,
    then kept by the sink), so the answers compared come from them, not from the audit log."""
    import time

    deadline = time.monotonic() + 90
    got = None
    while time.monotonic() < deadline:
        r = httpx.get(f"{stack.url}/api/v1/meters/{slug}/query", timeout=30)
        rows = r.json()["data"] if r.status_code == 200 else []
        got = rows[0]["value"] if rows else 0
        if got == count:
            break
        time.sleep(0.3)
    else:
        raise AssertionError(f"{got} of {count} events stored")
    user_meters = [m["slug"] for m in httpx.get(f"{stack.url}/api/v1/meters", timeout=30).json() if "annotations" in m]
    for user_meter in user_meters:
        while True:
            state = httpx.get(f"{stack.url}/api/v1/meters/{user_meter}", timeout=30).json()["annotations"]
            if state.get("meterstream.states") == "ready":
                break
            assert time.monotonic() < deadline, (user_meter, state)
            time.sleep(0.3)


def test_the_openmeter_article_example_through_its_client(client: Client, stack: LocalStack) -> None:
    # OpenMeter's "metering OpenAI usage" article, verbatim: meter m1 sums $.tokens by $.model.
    meter = client.meters.create(
        {
            "slug": "m1",
            "eventType": "openai",
            "aggregation": "SUM",
            "valueProperty": "$.tokens",
            "groupBy": {"model": "$.model"},
        }
    )
    assert (meter.slug, meter.aggregation, meter.event_type) == ("m1", "SUM", "openai")
    hour = dt.datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - dt.timedelta(hours=2)
    sent = []
    for i in range(30):
        model = ["gpt-3.5-turbo", "gpt-4o"][i % 2]
        t = hour + dt.timedelta(minutes=4 * i)
        sent.append((t, model, 21 + i))
        event = Event(
            specversion="1.0",
            id=f"article-{i}",
            source="my-app",
            type="openai",
            subject="1",
            time=t,
            data={"tokens": 21 + i, "model": model},
        )
        client.events.ingest_event(event)
    client.events.ingest_event(event)  # resent: counted once
    import time

    expected: dict[tuple[dt.datetime, str], Decimal] = defaultdict(Decimal)
    for t, model, tokens in sent:
        expected[(t.replace(minute=0), model)] += tokens
    deadline = time.monotonic() + 60
    while True:
        result = client.meters.query_json("m1", window_size="HOUR", group_by=["model"])
        got = {(r.window_start.astimezone(UTC), r.group_by["model"]): Decimal(str(r.value)) for r in result.data}
        if got == expected or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert got == expected
    assert client.meters.query_json("requests").data == []  # not llm.usage events: in no LLM meter
    assert [m for m in client.meters.list() if m.slug == "m1"]
    assert client.meters.list_subjects("m1") == ["1"]
    assert client.meters.list_group_by_values("m1", "model") == ["gpt-3.5-turbo", "gpt-4o"]
    # What would change the meaning of its numbers cannot be edited in place: 409 saying what to do.
    r = httpx.put(f"{stack.url}/api/v1/meters/m1", json={"aggregation": "MAX"}, timeout=10)
    assert r.status_code == 409 and "Create a meter with another slug" in r.json()["detail"], r.text
    updated = client.meters.update("m1", {"name": "Tokens", "groupBy": {"model": "$.model", "team": "$.team"}})
    assert updated.name == "Tokens"
    assert set(updated.group_by or {}) == {"model", "team"}
    client.meters.delete("m1")
    with pytest.raises(HttpResponseError) as missing:
        client.meters.get("m1")
    assert missing.value.status_code == 404


def test_every_aggregation_equals_the_ground_truth(stack: LocalStack) -> None:
    events = api_calls(3000, seed=7)
    early = {"slug": "api_sum_early", "eventType": "api_calls", "aggregation": "SUM", "valueProperty": "$.duration_ms"}
    r = httpx.post(f"{stack.url}/api/v1/meters", json=early | {"groupBy": {"method": "$.method"}}, timeout=10)
    assert r.status_code == 201, r.text
    # Half the events are stored before the other meters exist: a meter made later covers them.
    ingest(stack, events[:1500])
    for aggregation in AGGREGATIONS:
        body: dict[str, Any] = {
            "slug": f"api_{aggregation.lower()}",
            "eventType": "api_calls",
            "aggregation": aggregation,
            "groupBy": {"method": "$.method"},
        }
        if aggregation != "COUNT":
            body["valueProperty"] = "$.agent" if aggregation == "UNIQUE_COUNT" else "$.duration_ms"
        r = httpx.post(f"{stack.url}/api/v1/meters", json=body, timeout=10)
        assert r.status_code == 201, r.text
    ingest(stack, events[1500:])
    ingest(stack, events[:300])  # resent: duplicates count once
    stored(stack, "api_count", 3000)
    for aggregation in AGGREGATIONS:
        for size in ("HOUR", "DAY"):
            assert answer(stack, f"api_{aggregation.lower()}", size) == truth(events, aggregation, size), (
                aggregation,
                size,
            )
    # The meter that existed from the start and the one made half-way answer the same.
    assert answer(stack, "api_sum_early", "HOUR") == answer(stack, "api_sum", "HOUR")
    # The meters file's meter answers the same as the API's MAX.
    assert answer(stack, "api_latency_max", "DAY") == truth(events, "MAX", "DAY")
    r = httpx.delete(f"{stack.url}/api/v1/meters/api_latency_max", timeout=10)
    assert r.status_code == 409 and "meters file" in r.json()["detail"]


def test_large_and_precise_values_are_exact(stack: LocalStack) -> None:
    """Sums past Decimal(38, 18) (1.7e20) do not wrap around, values up to 1e40 count, a numeric string keeps
    18 decimal places; a JSON number with a fraction is read as the engine reads JSON numbers (a double: 17
    significant digits), while the audit log keeps it as it was written; a value of 1e40 or more is left out
    like one that is not a number."""
    raw = ["18446744073709551615"] * 10 + ['"99999999999999999999"', "1e+30", '"-1e39"', '"1234567890.123456789"']
    raw += ['"0.1234567890123456789012"', "1e40", "2E-5", "1234567890.123456789"]

    def read(text: str) -> Decimal:
        if text.startswith('"'):
            return Decimal(text.strip('"'))
        return Decimal(text) if text.isdigit() else Decimal(repr(float(text)))

    for aggregation in ("SUM", "AVG", "MIN", "MAX", "COUNT"):
        body: dict[str, Any] = {"slug": f"big_{aggregation.lower()}", "eventType": "big", "aggregation": aggregation}
        if aggregation != "COUNT":
            body["valueProperty"] = "$.v"
        r = httpx.post(f"{stack.url}/api/v1/meters", json=body, timeout=10)
        assert r.status_code == 201, r.text
    at = iso(dt.datetime.now(UTC) - dt.timedelta(minutes=5))
    head = '{"specversion":"1.0","source":"big","type":"big","subject":"s","time":"%s"' % at  # noqa: UP031
    batch = ",".join(f'{head},"id":"big-{i}","data":{{"v":{text}}}}}' for i, text in enumerate(raw))
    r = httpx.post(
        f"{stack.url}/api/v1/events",
        content=f"[{batch}]",
        headers={"Content-Type": "application/cloudevents-batch+json"},
        timeout=30,
    )
    assert r.status_code == 204, r.text
    stored(stack, "big_count", len(raw))
    with localcontext() as wide:
        wide.prec = 100  # the default 28 digits cannot hold 1e39 to 18 decimal places
        counted = [
            read(t).quantize(Decimal("1e-18"), rounding=ROUND_DOWN) for t in raw if abs(read(t)) < Decimal("1e40")
        ]
        total = sum(counted, Decimal(0))
        expected = {
            "sum": total,
            "avg": (total / len(counted)).quantize(Decimal("1e-18"), rounding=ROUND_DOWN),
            "min": min(counted),
            "max": max(counted),
        }
        for name, want in expected.items():
            r = httpx.get(f"{stack.url}/api/v1/meters/big_{name}/query", timeout=30)
            assert r.status_code == 200, r.text
            (row,) = json.loads(r.text, parse_float=Decimal, parse_int=Decimal)["data"]
            assert row["value"] == want, name
    # The audit log keeps the numbers as they were written.
    r = httpx.get(f"{stack.url}/api/v1/events", params={"subject": "s", "limit": 100}, timeout=30)
    stored_values = {e["event"]["id"]: e["event"]["data"]["v"] for e in json.loads(r.text, parse_float=Decimal)}
    assert stored_values["big-17"] == Decimal("1234567890.123456789")
    assert stored_values["big-16"] == Decimal("2E-5")


@pytest.mark.parametrize("zone", ["Australia/Lord_Howe", "Asia/Kathmandu"])
def test_hours_in_zones_with_half_hour_changes_and_offsets(stack: LocalStack, zone: str) -> None:
    """Local hours start at the local hour, the day after Lord Howe's 30-minute DST change too (2026-04-04
    15:00Z), and in a +05:45 zone."""
    slug = f"hours_{zone.split('/')[1].lower()}"
    body = {"slug": slug, "eventType": slug, "aggregation": "COUNT"}
    assert httpx.post(f"{stack.url}/api/v1/meters", json=body, timeout=10).status_code == 201
    first = dt.datetime(2026, 4, 5, 11, 0, tzinfo=UTC)
    times = [first + dt.timedelta(minutes=10 * i) for i in range(24)]
    events = [
        {"specversion": "1.0", "id": f"{slug}-{i}", "source": "t", "type": slug, "subject": "s", "time": iso(t)}
        for i, t in enumerate(times)
    ]
    ingest(stack, events)
    stored(stack, slug, len(events))
    expected: dict[tuple[dt.datetime, dt.datetime], Decimal] = defaultdict(Decimal)
    for t in times:
        start = t.astimezone(ZoneInfo(zone)).replace(minute=0).astimezone(UTC)
        expected[(start, start + dt.timedelta(hours=1))] += 1
    params = {"windowSize": "HOUR", "windowTimeZone": zone, "from": iso(first - dt.timedelta(hours=1))}
    r = httpx.get(f"{stack.url}/api/v1/meters/{slug}/query", params=params, timeout=30)
    assert r.status_code == 200, r.text
    got = {
        (
            dt.datetime.fromisoformat(row["windowStart"]).astimezone(UTC),
            dt.datetime.fromisoformat(row["windowEnd"]).astimezone(UTC),
        ): Decimal(str(row["value"]))
        for row in r.json()["data"]
    }
    assert got == expected


def test_bad_definitions_name_the_field(stack: LocalStack) -> None:
    cases = [
        ({"slug": "Bad Slug", "eventType": "x", "aggregation": "SUM", "valueProperty": "$.v"}, "slug"),
        ({"slug": "tokens_total", "eventType": "x", "aggregation": "SUM", "valueProperty": "$.v"}, "slug"),
        ({"slug": "ok", "eventType": "x", "aggregation": "MEDIAN", "valueProperty": "$.v"}, "aggregation"),
        ({"slug": "ok", "eventType": "x", "aggregation": "SUM"}, "valueProperty"),
        ({"slug": "ok", "eventType": "x", "aggregation": "SUM", "valueProperty": "$..v"}, "valueProperty"),
        ({"slug": "ok", "eventType": "x", "aggregation": "COUNT", "groupBy": {"subject": "$.s"}}, "groupBy"),
    ]
    for body, field in cases:
        r = httpx.post(f"{stack.url}/api/v1/meters", json=body, timeout=10)
        assert r.status_code == 400, (body, r.text)
        assert r.headers["Content-Type"] == "application/problem+json"
        assert r.json()["detail"].startswith(field), r.text
    r = httpx.post(f"{stack.url}/api/v1/meters", json={"slug": "dup", "eventType": "x", "aggregation": "COUNT"})
    assert r.status_code == 201
    r = httpx.post(f"{stack.url}/api/v1/meters", json={"slug": "dup", "eventType": "x", "aggregation": "COUNT"})
    assert r.status_code == 409, r.text
    r = httpx.get(f"{stack.url}/api/v1/meters/dup/query", params={"groupBy": "model"})
    assert r.status_code == 400 and "groupBy" in r.text


def test_a_missing_value_is_counted_as_such(stack: LocalStack) -> None:
    """An event without a number where a meter needs one is left out of it, never counted as 0: the event list
    says which meters leave it out, and /metrics counts such events per meter."""
    for slug, aggregation, path in (("gaps_sum", "SUM", "$.n"), ("gaps_workers", "UNIQUE_COUNT", "$.who")):
        body = {"slug": slug, "eventType": "gaps", "aggregation": aggregation, "valueProperty": path}
        r = httpx.post(f"{stack.url}/api/v1/meters", json=body, timeout=10)
        assert r.status_code == 201, r.text
    at = iso(dt.datetime.now(UTC) - dt.timedelta(minutes=3))
    values: list[Any] = [5, "7.5", None, "n/a", {"nested": 1}, -2, "", True]
    events = []
    for i, value in enumerate(values):
        data: dict[str, Any] = {"who": f"w{i % 3}"} if i % 4 else {}
        if value is not None:
            data["n"] = value
        events.append(
            {
                "specversion": "1.0",
                "id": f"gap-{i}",
                "source": "gaps",
                "type": "gaps",
                "subject": "s",
                "time": at,
                "data": data,
            }
        )
    ingest(stack, events)
    stored(stack, "gaps_sum", 5 + 7.5 - 2)
    lacking_n = {
        f"gap-{i}" for i, v in enumerate(values) if v is None or isinstance(v, bool | dict) or v in ("n/a", "")
    }
    lacking_who = {f"gap-{i}" for i in range(len(values)) if not i % 4}
    listed = httpx.get(f"{stack.url}/api/v1/events", params={"id": "gap-", "limit": 100}, timeout=10).json()
    assert len(listed) == len(values)
    for e in listed:
        event_id = e["event"]["id"]
        wanted = [
            slug for slug, lacking in (("gaps_sum", lacking_n), ("gaps_workers", lacking_who)) if event_id in lacking
        ]
        assert e["meterstream"].get("valueMissing", []) == wanted, e
        assert ("validationError" in e) == bool(wanted), e
    metrics = httpx.get(f"{stack.url}/metrics", timeout=10).text
    assert f'meterstream_meter_values_missing{{meter="gaps_sum"}} {float(len(lacking_n))}' in metrics
    assert f'meterstream_meter_values_missing{{meter="gaps_workers"}} {float(len(lacking_who))}' in metrics


def test_user_meters_answer_while_postgres_is_away(stack: LocalStack) -> None:
    r = httpx.post(
        f"{stack.url}/api/v1/meters", json={"slug": "away", "eventType": "api_calls", "aggregation": "COUNT"}
    )
    assert r.status_code == 201, r.text
    before = httpx.get(f"{stack.url}/api/v1/meters/away/query", timeout=30)
    assert before.status_code == 200
    stack.kill_postgres()
    try:
        import time

        time.sleep(1.5)  # past the meters' cache: this process reads them again, and cannot
        during = httpx.get(f"{stack.url}/api/v1/meters/away/query", timeout=30)
        assert during.status_code == 200, during.text  # the meters as last read
        assert during.json()["data"] == before.json()["data"]
        create = httpx.post(
            f"{stack.url}/api/v1/meters", json={"slug": "later", "eventType": "x", "aggregation": "COUNT"}
        )
        assert create.status_code == 503 and create.headers["Retry-After"], create.text
    finally:
        stack.start_postgres()
