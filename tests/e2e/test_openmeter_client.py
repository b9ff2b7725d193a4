"""OpenMeter's official Python client (openmeter 1.0.0b236), pointed at Meterstream unchanged: it ingests
(single, batch, application/json), lists and gets meters, queries (GET and POST, JSON and CSV, filters) and
lists events; every answer equals the ground truth."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from decimal import Decimal

import pytest
from corehttp.exceptions import HttpResponseError, ResourceNotFoundError
from openmeter import Client
from openmeter.models import Event, MeterQueryRequest

from tests.helpers.events import generate
from tests.helpers.stack import LocalStack
from tests.helpers.truth import Sent, expected, parse_csv

pytestmark = pytest.mark.e2e

UTC = dt.UTC
# Whole seconds: the client sends query-string times with millisecond precision.
START = dt.datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - dt.timedelta(hours=5)
END = START + dt.timedelta(hours=5)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    stack = LocalStack(tmp_path_factory.mktemp("openmeter") / "data").start()
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def client(stack: LocalStack) -> Client:
    return Client(endpoint=stack.url, retry_total=0)


@pytest.fixture(scope="module")
def ingested(client: Client, stack: LocalStack) -> list[Sent]:
    generated = list(generate(600, start=START, span=END - START, subjects=8, seed=3, source="openmeter-client"))
    models = [Event(**g.event) for g in generated[:100]]
    for event in models[:20]:
        client.events.ingest_event(event)  # application/cloudevents+json
    client.events.ingest_events(models[20:])  # application/cloudevents-batch+json
    client.events.ingest_events([g.event for g in generated[100:400]])  # dicts work too
    client.events.ingest_events_json([Event(**g.event) for g in generated[400:]])  # application/json
    client.events.ingest_events(models[:50])  # resent: counted once
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        result = client.meters.query_json("requests")
        if result.data and result.data[0].value == len(generated):
            break
        time.sleep(0.3)
    return [g.sent for g in generated]


def rows(result: object) -> dict[tuple[dt.datetime, dt.datetime, str | None, tuple[tuple[str, str], ...]], Decimal]:
    # The client parses values as floats; compare at their precision.
    return {
        (
            r.window_start.astimezone(UTC),
            r.window_end.astimezone(UTC),
            r.subject,
            tuple(sorted((r.group_by or {}).items())),
        ): Decimal(str(r.value))
        for r in result.data  # type: ignore[attr-defined]
    }


def as_float(values: dict[object, Decimal]) -> dict[object, Decimal]:
    return {k: Decimal(str(float(v))) for k, v in values.items()}


def test_meters(client: Client) -> None:
    slugs = {m.slug for m in client.meters.list()}
    assert {"tokens_total", "cost_usd", "requests"} <= slugs
    meter = client.meters.get("cost_usd")
    assert meter.slug == "cost_usd" and meter.event_type == "llm.usage"
    assert client.meters.get(meter.id).slug == "cost_usd"
    with pytest.raises(ResourceNotFoundError):
        client.meters.get("cost_eur")


def test_query_json_get(client: Client, ingested: list[Sent]) -> None:
    result = client.meters.query_json(
        "tokens_total",
        from_parameter=START,
        to=END,
        window_size="HOUR",
        window_time_zone="Asia/Kolkata",
        subject=["user-001", "user-002"],
        group_by=["model"],
    )
    truth = expected(
        ingested,
        "tokens_total",
        start=START,
        end=END,
        window="HOUR",
        zone="Asia/Kolkata",
        group_by=["model"],
        subjects=["user-001", "user-002"],
    )
    assert rows(result) == truth
    assert result.window_size == "HOUR"


def test_query_json_with_the_clients_filter_group_by(client: Client, ingested: list[Sent]) -> None:
    result = client.meters.query_json("cost_usd", group_by=["subject"], filter_group_by={"model": "gpt-4o"})
    truth = expected(ingested, "cost_usd", group_by=["subject"], include={"model": ["gpt-4o"]})
    assert rows(result) == as_float(truth)


def test_query_post(client: Client, ingested: list[Sent]) -> None:
    result = client.meters.query(
        "requests",
        MeterQueryRequest(
            from_property=START,
            to=END,
            window_size="DAY",
            window_time_zone="America/New_York",
            group_by=["provider"],
            filter_group_by={"model": ["gpt-4o-mini", "claude-sonnet-4-20250514"]},
        ),
    )
    truth = expected(
        ingested,
        "requests",
        start=START,
        end=END,
        window="DAY",
        zone="America/New_York",
        group_by=["provider"],
        include={"model": ["gpt-4o-mini", "claude-sonnet-4-20250514"]},
    )
    assert rows(result) == truth


def test_query_csv(client: Client, ingested: list[Sent]) -> None:
    text = client.meters.query_csv("input_tokens", from_parameter=START, to=END, window_size="HOUR", group_by=["model"])
    truth = expected(ingested, "input_tokens", start=START, end=END, window="HOUR", group_by=["model"])
    assert parse_csv(text, ["model"]) == truth


def test_events_list(client: Client, ingested: list[Sent]) -> None:
    events = client.events.list(from_parameter=START, to=END, subject="user-003", limit=100)
    want = sorted((e for e in ingested if e.subject == "user-003"), key=lambda e: e.time, reverse=True)[:100]
    assert [e.event.id for e in events] == [e.id for e in want]
    assert all(e.ingested_at <= e.stored_at for e in events)


def test_invalid_input_is_an_http_error(client: Client) -> None:
    with pytest.raises(HttpResponseError) as info:
        client.events.ingest_event({"id": "x", "source": "s", "specversion": "1.0", "type": "llm.usage"})
    assert info.value.status_code == 400
