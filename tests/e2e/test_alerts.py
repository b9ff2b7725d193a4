"""Budget alerts end to end on the real stack (`meterstream up`: broker, processor, sink, ClickHouse and
PostgreSQL), with a real HTTP receiver that verifies every signature with the ``standardwebhooks`` library.
Channels, rules and events go through OpenMeter's official Python client (openmeter 1.0.0b236).

Every threshold crossed fires once per period, in the order crossed, several at once when one event
crosses several; a grant that lifts the balance resolves them and a later crossing fires again; a reset
(a new period) fires them again; a reservation's commit fires before its usage is stored; retries keep the
webhook-id; rule tests and resends deliver.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest
from corehttp.exceptions import HttpResponseError
from openmeter import Client

from tests.helpers.events import iso
from tests.helpers.stack import LocalStack
from tests.helpers.webhooks import Received, Receiver, receiving

pytestmark = pytest.mark.e2e

GRANT = 1000


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    env = {
        "METERSTREAM_LOCAL_ALERTS__ALLOW_PRIVATE_URLS": "true",  # the receiver is on 127.0.0.1
        "METERSTREAM_LOCAL_ALERTS__RETRY_INITIAL_S": "0.2",
        "METERSTREAM_LOCAL_ALERTS__RETRY_MAX_S": "0.5",
        "METERSTREAM_LOCAL_ALERTS__TIMEOUT_S": "1.5",
        "METERSTREAM_LOCAL_ALERTS__CONNECT_TIMEOUT_S": "1",
    }
    s = LocalStack(tmp_path_factory.mktemp("alerts") / "data", env=env).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(stack: LocalStack) -> Client:
    return Client(endpoint=stack.url, retry_total=0)


@pytest.fixture(scope="module")
def http(stack: LocalStack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def feature(http: httpx.Client) -> str:
    r = http.post("/api/v1/features", json={"key": "alert_tokens", "name": "Tokens", "meterSlug": "tokens_total"})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with receiving() as r:
        yield r


@pytest.fixture(scope="module")
def channel(client: Client, receiver: Receiver) -> dict[str, Any]:
    ch = client.notification_channels.create({"type": "WEBHOOK", "name": "budget hook", "url": receiver.url})
    assert ch["signingSecret"].startswith("whsec_")
    assert len(ch["signingSecret"]) == len("whsec_") + 44
    receiver.secret = ch["signingSecret"]
    return dict(ch)


@pytest.fixture(scope="module")
def rule(client: Client, channel: dict[str, Any], feature: str) -> dict[str, Any]:
    r = client.notification_rules.create(
        {
            "type": "entitlements.balance.threshold",
            "name": "budget",
            "channels": [channel["id"]],
            "features": ["alert_tokens"],
            "thresholds": [
                {"type": "usage_percentage", "value": 50},
                {"type": "PERCENT", "value": 80},  # OpenMeter's legacy name, echoed back as given
                {"type": "usage_percentage", "value": 100},
                {"type": "usage_value", "value": 300},
            ],
        }
    )
    assert [t["type"] for t in r["thresholds"]] == ["usage_percentage", "PERCENT", "usage_percentage", "usage_value"]
    assert r["features"] == [{"id": feature, "key": "alert_tokens"}]
    return dict(r)


def minute(ago: dt.timedelta = dt.timedelta(0)) -> dt.datetime:
    return (dt.datetime.now(dt.UTC) - ago).replace(second=0, microsecond=0)


START = dt.timedelta(minutes=10)


def new_subject(http: httpx.Client, amount: int = GRANT, every_period: bool = False) -> str:
    """A subject whose monthly period and usage began ten minutes ago, with a grant of ``amount`` (for
    this period, or ``every_period``: issued again in full after each reset)."""
    subject = f"alert-{uuid.uuid4().hex[:10]}"
    since = iso(minute(START))
    body: dict[str, Any] = {
        "type": "metered",
        "featureKey": "alert_tokens",
        "usagePeriod": {"interval": "MONTH", "anchor": since},
        "measureUsageFrom": since,
    }
    if every_period:
        body["issueAfterReset"] = amount
    r = http.post(f"/api/v1/subjects/{subject}/entitlements", json=body)
    assert r.status_code == 201, r.text
    if not every_period:
        grant(http, subject, amount)
    return subject


def grant(http: httpx.Client, subject: str, amount: int) -> None:
    r = http.post(
        f"/api/v1/subjects/{subject}/entitlements/alert_tokens/grants",
        json={"amount": amount, "effectiveAt": iso(minute(START)), "expiration": {"duration": "YEAR", "count": 1}},
    )
    assert r.status_code == 201, r.text


def usage(http: httpx.Client, subject: str) -> Decimal:
    r = http.get(f"/api/v1/subjects/{subject}/entitlements/alert_tokens/value")
    assert r.status_code == 200, r.text
    return Decimal(str(r.json()["usage"]))


def send(http: httpx.Client, subject: str, tokens: int, ago: dt.timedelta = dt.timedelta(0)) -> float:
    """One usage event of ``tokens`` tokens (``ago`` in the past); returns when its 204 came."""
    event = {
        "specversion": "1.0",
        "id": uuid.uuid4().hex,
        "source": "alerts-test",
        "type": "llm.usage",
        "subject": subject,
        "time": iso(dt.datetime.now(dt.UTC) - ago),
        "data": {
            "provider": "openai",
            "model": "gpt-4o-mini",
            "input_tokens": tokens // 2,
            "output_tokens": tokens - tokens // 2,
        },
    }
    r = http.post("/api/v1/events", json=event, headers={"content-type": "application/cloudevents+json"})
    assert r.status_code == 204, r.text
    return time.time()


def wait_usage(http: httpx.Client, subject: str, expected: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while usage(http, subject) != expected:
        assert time.monotonic() < deadline, f"usage of {subject} never reached {expected}"
        time.sleep(0.05)


def of(subject: str, kind: str = "entitlements.balance.threshold") -> Any:
    def pick(got: list[Received]) -> list[Received]:
        """The subject's notifications of ``kind`` in the order they were made (their ``timestamp``; several
        made at once may arrive in any order: they are sent in parallel)."""
        mine = [r for r in got if r.payload["data"]["subject"]["key"] == subject and r.payload["type"] == kind]
        return sorted(mine, key=lambda r: dt.datetime.fromisoformat(r.payload["timestamp"]))

    return pick


def labels(got: list[Received]) -> list[str]:
    return [f"{r.payload['data']['threshold']['type']}:{r.payload['data']['threshold']['value']}" for r in got]


def test_small_steps_fire_each_threshold_once_in_order(
    http: httpx.Client, client: Client, receiver: Receiver, rule: dict[str, Any]
) -> None:
    subject = new_subject(http)
    pick = of(subject)
    crossing_at: dict[str, float] = {}
    expected = {5: "usage_value:300", 9: "usage_percentage:50", 14: "PERCENT:80", 17: "usage_percentage:100"}
    for step in range(1, 21):
        sent_at = send(http, subject, 60)
        wait_usage(http, subject, 60 * step)
        if step in expected:
            got = receiver.wait_for(lambda g: len(pick(g)) == len(crossing_at) + 1)
            crossing_at[expected[step]] = got[-1].at - sent_at if pick(got) else 0
    time.sleep(1.0)  # nothing else arrives
    got = pick(receiver.delivered())
    assert labels(got) == list(expected.values())
    assert len({r.webhook_id for r in got}) == 4
    assert all(r.verified for r in got), "every signature verifies with the standardwebhooks library"
    last = got[-1].payload
    assert last["data"]["subject"]["key"] == subject
    assert last["data"]["feature"]["key"] == "alert_tokens"
    assert Decimal(str(last["data"]["value"]["usage"])) == 1020
    assert Decimal(str(last["data"]["value"]["balance"])) == 0
    assert Decimal(str(last["data"]["value"]["totalAvailableGrantAmount"])) == GRANT
    assert "from" in last["data"]["entitlement"]["currentUsagePeriod"]
    assert last["id"] == got[-1].webhook_id
    # The events API (official client): every event SUCCESS, with its attempt's status and duration.
    page = client.notification_events.list(rule=[rule["id"]], subject=[subject])
    items = page["items"]
    assert page.total_count == 4
    assert [e["id"] for e in items] == [r.webhook_id for r in reversed(got)]  # newest first
    for e in items:
        (status,) = e["deliveryStatus"]
        assert status["state"] == "SUCCESS"
        assert status["attempts"][0]["response"]["statusCode"] == 204
        assert status["attempts"][0]["response"]["durationMs"] >= 0
        assert e["rule"]["id"] == rule["id"]
    assert max(crossing_at.values()) < 5.0, crossing_at


def test_one_event_crossing_two_fires_both_and_a_grant_resolves_them(
    http: httpx.Client, receiver: Receiver, rule: dict[str, Any]
) -> None:
    subject = new_subject(http)
    pick = of(subject)
    send(http, subject, 850)
    got = receiver.wait_for(lambda g: len(pick(g)) == 3)
    assert labels(pick(got)) == ["usage_value:300", "usage_percentage:50", "PERCENT:80"]
    # More grants: 850 of 2000 is 42.5%: 50% and 80% are no longer crossed (the absolute 300 still is).
    grant(http, subject, GRANT)
    resolved = of(subject, "entitlements.balance.threshold.resolved")
    got = receiver.wait_for(lambda g: len(resolved(g)) == 2)
    assert sorted(labels(resolved(got))) == ["PERCENT:80", "usage_percentage:50"]
    crossed_ids = {r.webhook_id for r in pick(got)}
    assert {r.payload["data"]["crossedEventId"] for r in resolved(got)} <= crossed_ids
    # Crossed again: 1050 of 2000 is 52.5%: 50% fires again (and only it).
    send(http, subject, 200)
    got = receiver.wait_for(lambda g: len(pick(g)) == 4)
    assert labels(pick(got))[-1] == "usage_percentage:50"
    time.sleep(1.0)
    assert len(pick(receiver.delivered())) == 4
    assert len(resolved(receiver.delivered())) == 2


def test_a_reset_starts_a_new_period_and_fires_again(
    http: httpx.Client, client: Client, receiver: Receiver, rule: dict[str, Any], channel: dict[str, Any]
) -> None:
    reset_rule = client.notification_rules.create(
        {"type": "entitlements.reset", "name": "resets", "channels": [channel["id"]], "features": ["alert_tokens"]}
    )
    subject = new_subject(http, every_period=True)
    pick = of(subject)
    send(http, subject, 600, ago=dt.timedelta(minutes=3))  # before the minute the reset is at
    receiver.wait_for(lambda g: len(pick(g)) == 2)  # 300, 50%
    r = http.post(f"/api/v1/subjects/{subject}/entitlements/alert_tokens/reset", json={})
    assert r.status_code == 204, r.text
    resets = of(subject, "entitlements.reset")
    got = receiver.wait_for(lambda g: len(resets(g)) == 1)
    assert resets(got)[0].verified
    send(http, subject, 600)
    got = receiver.wait_for(lambda g: len(pick(g)) == 4)
    assert labels(pick(got)) == ["usage_value:300", "usage_percentage:50"] * 2
    periods = {r.payload["data"]["periodStart"] for r in pick(got)}
    assert len(periods) == 2
    client.notification_rules.delete(reset_rule["id"])


def test_a_reservation_commit_fires(http: httpx.Client, receiver: Receiver, rule: dict[str, Any]) -> None:
    subject = new_subject(http)
    pick = of(subject)
    r = http.post(
        f"/api/v1/subjects/{subject}/reservations",
        json={"provider": "openai", "model": "gpt-4o-mini", "estimate": {"input_tokens": 400, "output_tokens": 400}},
    )
    assert r.status_code == 201, r.text
    # A hold is not usage: nothing fires for it.
    time.sleep(1.0)
    assert pick(receiver.delivered()) == []
    r = http.post(
        f"/api/v1/reservations/{r.json()['id']}/commit", json={"usage": {"input_tokens": 300, "output_tokens": 300}}
    )
    assert r.status_code == 200, r.text
    got = receiver.wait_for(lambda g: len(pick(g)) == 2)
    assert labels(pick(got)) == ["usage_value:300", "usage_percentage:50"]


def test_retries_keep_the_webhook_id_until_the_receiver_recovers(
    http: httpx.Client, client: Client, receiver: Receiver, rule: dict[str, Any]
) -> None:
    subject = new_subject(http)
    receiver.mode = "fail"
    try:
        send(http, subject, 350)
        deadline = time.monotonic() + 20
        while not any(r.payload["data"]["subject"]["key"] == subject and r.answered == 500 for r in receiver.received):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(1.5)
        receiver.hang_s = 2.0
        receiver.mode = "hang"
        time.sleep(3.0)
    finally:
        receiver.mode = "ok"
    got = receiver.wait_for(lambda g: len(of(subject)(g)) == 1)
    (delivered,) = of(subject)(got)
    tries = [r for r in receiver.received if r.webhook_id == delivered.webhook_id]
    assert len(tries) >= 3
    assert {r.answered for r in tries} >= {500, None, 204}
    assert all(r.verified for r in tries), "each retry is signed afresh"
    assert len({r.headers["webhook-timestamp"] for r in tries}) >= 2
    (e,) = client.notification_events.list(subject=[subject])["items"]
    (status,) = e["deliveryStatus"]
    assert status["state"] == "SUCCESS"
    codes = [a["response"].get("statusCode") for a in status["attempts"]]
    assert codes[0] == 204  # newest first
    assert 500 in codes
    assert None in codes  # the timeouts


def test_rule_test_and_resend(client: Client, receiver: Receiver, rule: dict[str, Any]) -> None:
    event = client.notification_rules.test(rule["id"])
    assert event["annotations"]["notification.rule.test"] is True
    got = receiver.wait_for(lambda g: any(r.webhook_id == event["id"] for r in g))
    first = next(r for r in got if r.webhook_id == event["id"])
    assert first.verified
    before = len([r for r in receiver.received if r.webhook_id == event["id"]])
    client.notification_events.resend(event["id"], {})
    deadline = time.monotonic() + 10
    while len([r for r in receiver.received if r.webhook_id == event["id"]]) == before:
        assert time.monotonic() < deadline, "the resend never arrived"
        time.sleep(0.05)
    time.sleep(0.5)
    again = client.notification_events.get(event["id"])
    assert len(again["deliveryStatus"][0]["attempts"]) == 2


def test_channel_and_rule_api(
    client: Client, http: httpx.Client, channel: dict[str, Any], rule: dict[str, Any]
) -> None:
    assert client.notification_channels.get(channel["id"])["url"] == channel["url"]
    updated = client.notification_channels.update(
        channel["id"], {"type": "WEBHOOK", "name": "renamed", "url": channel["url"], "customHeaders": {"x-team": "a"}}
    )
    assert updated["name"] == "renamed"
    assert updated["signingSecret"] == channel["signingSecret"], "kept when not given"
    listed = client.notification_channels.list()
    assert channel["id"] in [c["id"] for c in listed["items"]]
    assert client.notification_rules.get(rule["id"])["name"] == "budget"
    assert rule["id"] in [r["id"] for r in client.notification_rules.list(feature=["alert_tokens"])["items"]]
    # A channel a rule uses cannot be deleted; bad inputs are 400 problem+json.
    with pytest.raises(HttpResponseError) as err:
        client.notification_channels.delete(channel["id"])
    assert err.value.status_code == 400
    for body in (
        {"type": "WEBHOOK", "name": "x", "url": "ftp://example.com"},
        {"type": "WEBHOOK", "name": "x", "url": "https://example.com", "signingSecret": "short"},
        {"type": "WEBHOOK", "name": "x", "url": "https://example.com", "customHeaders": {"webhook-id": "x"}},
    ):
        r = http.post("/api/v1/notification/channels", json=body)
        assert r.status_code == 400, (body, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
    for thresholds in ([], [{"type": "usage_value", "value": 0}], [{"type": "usage_value", "value": 1}] * 11):
        r = http.post(
            "/api/v1/notification/rules",
            json={
                "type": "entitlements.balance.threshold",
                "name": "x",
                "channels": [channel["id"]],
                "thresholds": thresholds,
            },
        )
        assert r.status_code == 400, (thresholds, r.text)
    r = http.post(
        "/api/v1/notification/rules",
        json={
            "type": "entitlements.balance.threshold",
            "name": "x",
            "channels": [channel["id"]],
            "features": ["nope"],
            "thresholds": [{"type": "usage_value", "value": 1}],
        },
    )
    assert r.status_code == 400
    assert "nope" in r.text
    assert http.get("/api/v1/notification/rules/not-a-ulid").status_code == 400
    assert http.get(f"/api/v1/notification/events/{'0' * 26}").status_code == 404


def test_metrics(http: httpx.Client) -> None:
    """After the deliveries above: delivered, attempts (the failures of the retry test among them), latency,
    and the pending gauge are on /metrics."""
    text = http.get("/metrics").text
    values = {}
    for line in text.splitlines():
        if line.startswith("meterstream_notification"):
            name, _, number = line.rpartition(" ")
            values[name] = float(number)
    assert values["meterstream_notifications_delivered_total"] >= 10
    assert values['meterstream_notification_attempts_total{outcome="error"}'] >= 2
    assert (
        values["meterstream_notification_delivery_seconds_count"] == values["meterstream_notifications_delivered_total"]
    )
    assert "meterstream_notifications_pending" in values
