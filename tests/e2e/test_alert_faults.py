"""Alerts under failures, on the real stack: kill -9 of `meterstream up` while a webhook request is in
flight, kill -9 right after the 204 of the event that crosses a threshold (before it is stored or
evaluated), and kill -9 of PostgreSQL while deliveries are due. Every notification arrives, and the only
duplicates are retries with the same webhook-id."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_alerts import labels, new_subject, of, send
from tests.helpers.stack import LocalStack, MultiProcessStack
from tests.helpers.webhooks import Receiver, receiving

pytestmark = pytest.mark.e2e

ENV = {
    "METERSTREAM_LOCAL_ALERTS__ALLOW_PRIVATE_URLS": "true",
    "METERSTREAM_LOCAL_ALERTS__RETRY_INITIAL_S": "0.2",
    "METERSTREAM_LOCAL_ALERTS__RETRY_MAX_S": "0.5",
    "METERSTREAM_LOCAL_ALERTS__TIMEOUT_S": "1",
    "METERSTREAM_LOCAL_ALERTS__CONNECT_TIMEOUT_S": "1",
}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with receiving() as r:
        yield r


@pytest.fixture
def local(tmp_path: Path) -> Iterator[LocalStack]:
    stack = LocalStack(tmp_path / "data", env=ENV).start()
    yield stack
    stack.stop()


def setup(http: httpx.Client, receiver: Receiver) -> None:
    r = http.post("/api/v1/features", json={"key": "alert_tokens", "name": "Tokens", "meterSlug": "tokens_total"})
    assert r.status_code == 201, r.text
    r = http.post("/api/v1/notification/channels", json={"type": "WEBHOOK", "name": "c", "url": receiver.url})
    assert r.status_code == 201, r.text
    receiver.secret = r.json()["signingSecret"]
    rule = {
        "type": "entitlements.balance.threshold",
        "name": "budget",
        "channels": [r.json()["id"]],
        "thresholds": [
            {"type": "usage_percentage", "value": 50},
            {"type": "usage_percentage", "value": 80},
            {"type": "usage_percentage", "value": 100},
            {"type": "usage_value", "value": 300},
        ],
    }
    r = http.post("/api/v1/notification/rules", json=rule)
    assert r.status_code == 201, r.text


def only_same_id_duplicates(receiver: Receiver) -> None:
    with receiver.lock:
        bodies: dict[str, bytes] = {}
        for r in receiver.received:
            assert bodies.setdefault(r.webhook_id, r.body) == r.body, "a retry carries the same event"
    assert all(r.verified for r in receiver.received)


def test_kill_9_during_delivery_and_right_after_the_crossing_event(local: LocalStack, receiver: Receiver) -> None:
    with httpx.Client(base_url=local.url, timeout=30) as http:
        setup(http, receiver)
        subject = new_subject(http)
        # 1. A request in flight (the receiver hangs) when the process dies.
        receiver.mode, receiver.hang_s = "hang", 30.0
        send(http, subject, 350)  # crosses 300
        deadline = time.monotonic() + 30
        while not receiver.received:
            assert time.monotonic() < deadline, "nothing was sent"
            time.sleep(0.05)
        in_flight = receiver.received[0].webhook_id
    local.kill()
    receiver.mode = "ok"
    local.start()
    got = receiver.wait_for(lambda g: len(of(subject)(g)) == 1, timeout_s=60)
    assert of(subject)(got)[0].webhook_id == in_flight
    # 2. Killed right after the 204 of the event crossing 50 % and 80 %: nothing stored or evaluated yet.
    with httpx.Client(base_url=local.url, timeout=30) as http:
        send(http, subject, 500)
        local.kill()
    local.start()
    got = receiver.wait_for(lambda g: len(of(subject)(g)) == 3, timeout_s=60)
    assert labels(of(subject)(got)) == ["usage_value:300", "usage_percentage:50", "usage_percentage:80"]
    time.sleep(1.5)
    assert len(of(subject)(receiver.delivered())) == 3
    only_same_id_duplicates(receiver)


def test_postgres_killed_with_deliveries_due(local: LocalStack, receiver: Receiver) -> None:
    with httpx.Client(base_url=local.url, timeout=30) as http:
        setup(http, receiver)
        subject = new_subject(http)
        receiver.mode = "fail"
        send(http, subject, 600)  # 300 and 50 %
        deadline = time.monotonic() + 30
        while len({r.webhook_id for r in receiver.received}) < 2:
            assert time.monotonic() < deadline, "nothing was sent"
            time.sleep(0.05)
        local.kill_postgres()
        time.sleep(3)
        receiver.mode = "ok"
        send(http, subject, 300)  # 80 %: accepted while PostgreSQL is away (ingest does not need it)
        time.sleep(3)
        local.start_postgres()
        got = receiver.wait_for(lambda g: len(of(subject)(g)) == 3, timeout_s=60)
        assert labels(of(subject)(got)) == ["usage_value:300", "usage_percentage:50", "usage_percentage:80"]
    only_same_id_duplicates(receiver)


@pytest.fixture
def topology(tmp_path: Path) -> Iterator[MultiProcessStack]:
    env = {k.replace("METERSTREAM_LOCAL_", "METERSTREAM_SINK_"): v for k, v in ENV.items()}
    yield from MultiProcessStack(tmp_path / "stack", control=True, extra_env=env).running()


def test_each_process_killed_while_a_notification_is_on_its_way(
    topology: MultiProcessStack, receiver: Receiver
) -> None:
    """The production topology (ingest, processor, sink with the API as separate processes): the sink killed
    with a request in flight, the processor and ingest killed right after the 204 of a crossing event."""
    assert topology.sink is not None
    assert topology.ingest is not None
    with httpx.Client(base_url=topology.query_url, timeout=30) as api:
        setup(api, receiver)
        subjects = [new_subject(api) for _ in range(3)]
    with httpx.Client(base_url=topology.ingest_url, timeout=30) as ingest:
        receiver.mode, receiver.hang_s = "hang", 30.0
        send(ingest, subjects[0], 350)
        deadline = time.monotonic() + 30
        while not receiver.received:
            assert time.monotonic() < deadline, "nothing was sent"
            time.sleep(0.05)
        topology.sink.kill()
        receiver.mode = "ok"
        topology.restart(topology.sink)
        send(ingest, subjects[1], 350)
        topology.processors[0].kill()
        topology.restart(topology.processors[0])
        send(ingest, subjects[2], 350)
        topology.ingest.kill()
    topology.restart(topology.ingest)
    try:
        for subject in subjects:
            receiver.wait_for(lambda g, s=subject: len(of(s)(g)) == 1, timeout_s=60)  # type: ignore[misc]
    except AssertionError:
        print(topology.logs()[-5000:])
        raise
    time.sleep(1.5)
    for subject in subjects:
        assert labels(of(subject)(receiver.delivered())) == ["usage_value:300"]
    only_same_id_duplicates(receiver)
