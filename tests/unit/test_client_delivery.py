"""The client's delivery decisions without I/O: answers, retry timing, batching, the buffer policy."""

from __future__ import annotations

import json
import random
import threading
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from meterstream_client._delivery import (
    Delivery,
    DroppedEvent,
    Item,
    Outbox,
    Outcome,
    RetryPolicy,
    classify,
    failure,
    parse_retry_after,
)


def items(n: int, size: int = 10) -> list[Item]:
    return [Item(f"e{i}", json.dumps({"id": f"e{i}", "pad": "x" * size}).encode()) for i in range(n)]


def problem(*errors: dict[str, object], detail: str = "invalid request") -> bytes:
    return json.dumps({"status": 400, "detail": detail, "errors": list(errors)}).encode()


# -- what an answer means ----------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 202, 204])
def test_2xx_delivers_all(status: int) -> None:
    batch = items(3)
    assert classify(batch, status, {}, b"").delivered == batch


@pytest.mark.parametrize("status", [500, 502, 503, 504, 429, 408, 401, 403, 404])
def test_retryable_statuses(status: int) -> None:
    outcome = classify(items(2), status, {"retry-after": "2"}, b"")
    assert outcome.retry and not outcome.delivered and not outcome.rejected
    assert outcome.retry_after == 2.0


def test_network_errors_are_retried() -> None:
    outcome = failure(ConnectionRefusedError("refused"))
    assert outcome.retry and "refused" in outcome.reason


def test_400_rejects_only_the_named_events_and_resends_the_rest() -> None:
    batch = items(5)
    body = problem(
        {"index": 1, "field": "data.usage", "message": "bad"},
        {"index": 3, "field": "subject", "message": "empty"},
        {"index": 3, "field": "time", "message": "future"},
        {"index": 99, "field": "x", "message": "out of range"},
    )
    outcome = classify(batch, 400, {}, body)
    assert [(i.id, why) for i, why in outcome.rejected] == [
        ("e1", "data.usage: bad"),
        ("e3", "subject: empty; time: future"),
    ]
    assert [[i.id for i in part] for part in outcome.resend] == [["e0", "e2", "e4"]]
    assert not outcome.retry


def test_400_without_indexes_bisects_then_rejects_single_events() -> None:
    outcome = classify(items(5), 400, {}, b"<html>bad request</html>")
    assert [[i.id for i in part] for part in outcome.resend] == [["e0", "e1"], ["e2", "e3", "e4"]]
    single = classify(items(1), 400, {}, problem(detail="the body is not valid JSON"))
    assert [(i.id, why) for i, why in single.rejected] == [("e0", "the body is not valid JSON")]


def test_413_splits_and_a_single_event_too_large_is_rejected() -> None:
    outcome = classify(items(4), 413, {}, problem(detail="too large"))
    assert [[i.id for i in part] for part in outcome.resend] == [["e0", "e1"], ["e2", "e3"]]
    single = classify(items(1), 413, {}, problem(detail="too large"))
    assert single.rejected and not single.resend


@pytest.mark.parametrize("status", [415, 422])
def test_permanent_statuses_reject(status: int) -> None:
    outcome = classify(items(2), status, {}, b"")
    assert len(outcome.rejected) == 2 and not outcome.retry


def test_retry_after_parsing() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 0.5 ") == 0.5
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    later = datetime.now(UTC) + timedelta(seconds=30)
    assert 25 <= (parse_retry_after(format_datetime(later, usegmt=True)) or 0) <= 30
    assert parse_retry_after(format_datetime(datetime(2000, 1, 1, tzinfo=UTC), usegmt=True)) == 0.0


# -- retry timing ------------------------------------------------------------------------------------


def test_backoff_is_exponential_jittered_and_capped() -> None:
    policy = RetryPolicy(initial_delay=0.5, max_delay=8.0)
    rng = random.Random(1)
    for attempt, ceiling in enumerate([0.5, 1, 2, 4, 8, 8, 8]):
        delays = [policy.delay(attempt, rng=rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert max(delays) - min(delays) > ceiling / 4, "jittered"
    assert policy.delay(10_000, rng=rng) <= 8.0


def test_retry_after_is_honoured() -> None:
    policy = RetryPolicy(initial_delay=0.1, max_delay=1.0)
    assert all(2.0 <= policy.delay(0, retry_after=2.0) <= 2.2 for _ in range(100))
    assert policy.delay(0, retry_after=10_000) <= 330
    assert policy.delay(0, retry_after=0) >= 0.05, "Retry-After: 0 is no busy loop"
    with pytest.raises(ValueError, match="initial_delay"):
        RetryPolicy(initial_delay=0)


def test_delivery_retries_the_same_batch_then_resends_parts() -> None:
    batch = items(4)
    delivery = Delivery(batch, RetryPolicy(initial_delay=1, max_delay=1))
    assert delivery.next() == batch
    assert delivery.record(Outcome(retry=True)) is not None
    assert delivery.next() == batch, "a retry resends exactly the same events (same ids)"
    assert delivery.record(Outcome(resend=[batch[:2], batch[2:]])) is None
    assert delivery.next() == batch[:2]
    delivery.record(Outcome(delivered=batch[:2]))
    assert delivery.next() == batch[2:]
    assert delivery.remaining() == batch[2:]
    delivery.record(Outcome(delivered=batch[2:]))
    assert delivery.next() is None


def test_delivery_backoff_grows_with_each_failure() -> None:
    delivery = Delivery(items(1), RetryPolicy(initial_delay=1, max_delay=100))
    delays = [delivery.record(Outcome(retry=True)) for _ in range(4)]
    assert [d is not None and 2 ** (i - 1) <= d <= 2**i for i, d in enumerate(delays)] == [True] * 4


# -- the buffer --------------------------------------------------------------------------------------


def test_take_respects_event_and_byte_limits() -> None:
    outbox = Outbox(100)
    for item in items(10, size=100):
        assert outbox.offer(item, 0)
    assert [i.id for i in outbox.take(3, 10_000)] == ["e0", "e1", "e2"]
    size = len(items(1, size=100)[0].body)
    assert len(outbox.take(100, 2 + 2 * (size + 1))) == 2
    assert len(outbox.take(100, 10)) == 1, "always at least one event"
    assert outbox.pending() == 10, "in-flight events count until settled"
    assert outbox.stats().emitted == 10


def test_full_buffer_refuses_new_events_and_counts_drops() -> None:
    dropped: list[DroppedEvent] = []
    outbox = Outbox(2, on_drop=dropped.append)
    first, second, third = items(3)
    assert outbox.offer(first, 0) and outbox.offer(second, 0)
    started = time.monotonic()
    assert not outbox.offer(third, 0.2)
    assert time.monotonic() - started >= 0.19, "waited for room"
    outbox.drop_full(third)
    assert outbox.stats().dropped == 1
    assert [(d.event["id"], d.reason) for d in dropped] == [("e2", "buffer_full")]
    assert [i.id for i in outbox.take(10, 10_000)] == ["e0", "e1"], "the accepted events are kept"


def test_emit_waits_for_room_made_by_delivery() -> None:
    outbox = Outbox(1)
    first, second = items(2)
    outbox.offer(first, 0)
    batch = outbox.take(10, 10_000)
    threading.Timer(0.05, outbox.settle, [Outcome(delivered=batch)]).start()
    assert outbox.offer(second, 2.0)
    assert outbox.stats().delivered == 1


def test_settle_and_abandon_account_and_report() -> None:
    dropped: list[DroppedEvent] = []
    outbox = Outbox(10, on_drop=dropped.append)
    for item in items(4):
        outbox.offer(item, 0)
    batch = outbox.take(10, 10_000)
    outbox.settle(Outcome(delivered=batch[:1], rejected=[(batch[1], "subject: empty")]))
    outbox.abandon(batch[2:], "shutdown")
    stats = outbox.stats()
    assert (stats.delivered, stats.rejected, stats.dropped, stats.pending) == (1, 1, 2, 0)
    assert [(d.event["id"], d.reason, d.detail) for d in dropped] == [
        ("e1", "rejected", "subject: empty"),
        ("e2", "shutdown", "shutdown"),
        ("e3", "shutdown", "shutdown"),
    ]


def test_reclaim_puts_in_flight_events_back_first() -> None:
    outbox = Outbox(10)
    for item in items(4):
        outbox.offer(item, 0)
    outbox.take(2, 10_000)
    outbox.reclaim()
    assert [i.id for i in outbox.take(10, 10_000)] == ["e0", "e1", "e2", "e3"]


def test_a_failing_on_drop_callback_is_contained() -> None:
    def explode(_: DroppedEvent) -> None:
        raise RuntimeError("boom")

    outbox = Outbox(1, on_drop=explode)
    outbox.drop_full(items(1)[0])
    assert outbox.stats().dropped == 1


def test_closed_outbox_refuses() -> None:
    outbox = Outbox(1)
    outbox.closed = True
    with pytest.raises(RuntimeError, match="closed"):
        outbox.offer(items(1)[0], 0)
