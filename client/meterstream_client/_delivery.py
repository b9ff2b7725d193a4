"""Delivery without I/O: the buffer, batching, what each server answer means, and retry timing.

The sync and async clients only add the waiting and the HTTP call; every decision lives here, where it can
be tested without a network. The rules:

* An event is encoded once and always resent with the same bytes, so the same ``(source, id)``:
  Meterstream counts it once however often it arrives. Retrying is therefore always safe.
* 2xx: delivered. 5xx, 429, 408, any other unexpected status and network errors: retried, after an
  exponential backoff with jitter, or after ``Retry-After`` when the server gives one, for as long as the
  client is open (memory is bounded by the buffer, not by giving up).
* 400 rejects the whole request, naming each invalid event's index: those are dropped (``rejected``), the
  others are resent at once. A 400 that names no index is bisected until the bad events are isolated.
* 413: the batch is split in halves and resent; a single event that is too large is rejected.
* 415 and 422: rejected (the request can never succeed as it is).
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Final, Literal

log = logging.getLogger("meterstream_client")

BATCH_CONTENT_TYPE: Final = "application/cloudevents-batch+json"
EVENTS_PATH: Final = "/api/v1/events"

#: Statuses that mean "this request, as it is, will never be accepted".
_PERMANENT: Final = frozenset({400, 413, 415, 422})

#: A server asking for more than this is probably misconfigured; we retry no later than this anyway.
_MAX_RETRY_AFTER_S: Final = 300.0

DropReason = Literal["buffer_full", "rejected", "shutdown"]


@dataclass(frozen=True, slots=True)
class Item:
    """One encoded event waiting to be delivered."""

    id: str
    body: bytes


@dataclass(frozen=True, slots=True)
class DroppedEvent:
    """An event that will not reach Meterstream, handed to the client's ``on_drop`` callback (for instance
    to write it somewhere durable and replay it later: resending the same event is always safe).

    ``reason``: ``buffer_full`` (dropped at emit time), ``rejected`` (Meterstream refused it as invalid;
    ``detail`` says why) or ``shutdown`` (still undelivered when the client closed).
    """

    event: dict[str, Any]
    reason: DropReason
    detail: str


@dataclass(frozen=True, slots=True)
class DeliveryStats:
    """Counters since the client was created (a snapshot)."""

    #: Events accepted into the buffer.
    emitted: int
    #: Events acknowledged by Meterstream.
    delivered: int
    #: Events not accepted because the buffer was full, or still undelivered when the client closed.
    dropped: int
    #: Events Meterstream refused as invalid (they would never count).
    rejected: int
    #: Requests that failed and were retried.
    retries: int
    #: Events in the buffer or in flight now.
    pending: int


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with jitter for retryable failures.

    The n-th consecutive failure waits a random time between half and all of
    ``min(max_delay, initial_delay * multiplier**n)`` seconds (jitter keeps many clients from retrying in
    lockstep after an outage; the lower half-bound keeps a down server from being hammered). A
    ``Retry-After`` from the server is honoured instead (at least ``initial_delay / 2``, at most 5 minutes).
    """

    initial_delay: float = 0.5
    max_delay: float = 30.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.initial_delay <= 0 or self.max_delay < self.initial_delay or self.multiplier < 1:
            raise ValueError("need 0 < initial_delay <= max_delay and multiplier >= 1")

    def delay(self, attempt: int, retry_after: float | None = None, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number ``attempt + 1`` (``attempt`` counts from 0)."""
        draw = (rng or random).random()
        if retry_after is not None:
            # Up to 10% on top of what the server asked for, so that clients do not all come back at once;
            # never less than half the initial delay, so that "Retry-After: 0" cannot make a busy loop.
            return max(min(retry_after, _MAX_RETRY_AFTER_S), self.initial_delay / 2) * (1 + 0.1 * draw)
        ceiling = min(self.max_delay, self.initial_delay * self.multiplier ** min(attempt, 64))
        return ceiling / 2 + draw * ceiling / 2


@dataclass(slots=True)
class Outcome:
    """What one request's result means for the events it carried."""

    delivered: Sequence[Item] = ()
    rejected: Sequence[tuple[Item, str]] = ()
    #: Sub-batches to send at once (the valid rest of a 400, the halves of a 413).
    resend: Sequence[Sequence[Item]] = ()
    #: Send the whole batch again after a backoff.
    retry: bool = False
    retry_after: float | None = None
    #: Why it failed (for logs).
    reason: str = ""


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def classify(batch: Sequence[Item], status: int, headers: Mapping[str, str], body: bytes) -> Outcome:
    """The meaning of Meterstream's answer ``status`` to a POST of ``batch`` (see the module docstring)."""
    if 200 <= status < 300:
        return Outcome(delivered=list(batch))
    detail = _problem_detail(body) or f"HTTP {status}"
    if status == 400:
        return _bad_request(batch, body, detail)
    if status == 413:
        if len(batch) == 1:
            return Outcome(rejected=[(batch[0], f"too large for the server: {detail}")])
        return Outcome(resend=_halves(batch), reason=detail)
    if status in _PERMANENT:
        return Outcome(rejected=[(item, detail) for item in batch])
    return Outcome(retry=True, retry_after=parse_retry_after(headers.get("retry-after")), reason=f"{status}: {detail}")


def failure(exc: BaseException) -> Outcome:
    """A request that got no answer (connection refused, timeout, ...): retried; the server may or may not
    have stored the events, and deduplication makes resending them safe either way."""
    return Outcome(retry=True, reason=f"{type(exc).__name__}: {exc}")


def _bad_request(batch: Sequence[Item], body: bytes, detail: str) -> Outcome:
    by_index: dict[int, list[str]] = {}
    for error in _problem_errors(body):
        index = error.get("index")
        if isinstance(index, int) and not isinstance(index, bool) and 0 <= index < len(batch):
            by_index.setdefault(index, []).append(f"{error.get('field', '?')}: {error.get('message', '?')}")
    if by_index:
        rejected = [(batch[i], "; ".join(by_index[i])) for i in sorted(by_index)]
        rest = [item for i, item in enumerate(batch) if i not in by_index]
        # Meterstream accepts or rejects a request whole: the valid events were not stored, send them again.
        return Outcome(rejected=rejected, resend=[rest] if rest else [], reason=detail)
    if len(batch) == 1:
        return Outcome(rejected=[(batch[0], detail)])
    # No index to go by (e.g. a proxy's 400): bisect until each bad event is alone.
    return Outcome(resend=_halves(batch), reason=detail)


def _halves(batch: Sequence[Item]) -> list[list[Item]]:
    middle = len(batch) // 2
    return [list(batch[:middle]), list(batch[middle:])]


def _problem(body: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _problem_detail(body: bytes) -> str:
    detail = _problem(body).get("detail")
    if isinstance(detail, str):
        return detail
    return body[:200].decode(errors="replace").strip()


def _problem_errors(body: bytes) -> list[dict[str, Any]]:
    errors = _problem(body).get("errors")
    return [e for e in errors if isinstance(e, dict)] if isinstance(errors, list) else []


class Delivery:
    """One batch, followed until each of its events is delivered or rejected."""

    def __init__(self, batch: Sequence[Item], policy: RetryPolicy) -> None:
        self._work: deque[list[Item]] = deque([list(batch)])
        self._policy = policy
        self._attempt = 0

    def next(self) -> list[Item] | None:
        """The events to send now, or None when the batch is settled."""
        return self._work[0] if self._work else None

    def record(self, outcome: Outcome) -> float | None:
        """Apply the outcome of sending ``next()``; the delay before the next send if it must be retried."""
        sent = self._work.popleft()
        self._work.extendleft(reversed([list(part) for part in outcome.resend if part]))
        if not outcome.retry:
            self._attempt = 0
            return None
        self._work.appendleft(sent)
        delay = self._policy.delay(self._attempt, outcome.retry_after)
        self._attempt += 1
        return delay

    def remaining(self) -> list[Item]:
        return [item for part in self._work for item in part]


@dataclass(slots=True)
class _Counters:
    emitted: int = 0
    delivered: int = 0
    dropped: int = 0
    rejected: int = 0
    retries: int = 0


@dataclass(slots=True)
class Outbox:
    """The bounded buffer between the emitting threads and the sender, thread-safe.

    Capacity counts queued and in-flight events together, so memory stays bounded whatever the server does.
    In-flight events are kept (by id) until settled, so that a sender that dies can hand them back.
    """

    capacity: int
    on_drop: Callable[[DroppedEvent], None] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    _queue: deque[Item] = field(default_factory=deque)
    _queued_bytes: int = 0
    _in_flight: dict[str, Item] = field(default_factory=dict)
    _counters: _Counters = field(default_factory=_Counters)
    #: Signalled when events arrive, leave or the state changes; all three share ``lock``.
    changed: threading.Condition = field(init=False)
    #: Flushes in progress: while any, the sender does not wait for a batch to fill.
    flushing: int = 0
    closed: bool = False
    #: While closing: monotonic time after which undelivered events are given up.
    deadline: float | None = None
    _last_full_warning: float = field(default=-1e9)

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError("max_buffer must be at least 1")
        self.changed = threading.Condition(self.lock)

    # -- emitting side -------------------------------------------------------------------------------

    def offer(self, item: Item, wait: float) -> bool:
        """Queue ``item``, waiting up to ``wait`` seconds for room; False (nothing queued) if still full."""
        with self.changed:
            if self.closed:
                raise RuntimeError("the Meterstream client is closed")
            if self._pending() >= self.capacity and wait > 0:
                self.changed.wait_for(lambda: self._pending() < self.capacity or self.closed, wait)
            if self.closed:
                raise RuntimeError("the Meterstream client is closed")
            if self._pending() >= self.capacity:
                return False
            self._queue.append(item)
            self._queued_bytes += len(item.body)
            self._counters.emitted += 1
            self.changed.notify_all()
            return True

    def drop_full(self, item: Item) -> None:
        """Account for an event refused because the buffer was full."""
        with self.lock:
            self._counters.dropped += 1
            now = time.monotonic()
            # One warning per 10 s: an outage must not also flood the logs.
            warn = now - self._last_full_warning >= 10
            if warn:
                self._last_full_warning = now
            dropped = self._counters.dropped
        if warn:
            log.warning(
                "meterstream: buffer full (%d events): usage event dropped (%d dropped so far); "
                "is Meterstream reachable?",
                self.capacity,
                dropped,
            )
        self._report([item], "buffer_full", "the buffer was full")

    # -- sending side --------------------------------------------------------------------------------

    def batch_ready(self, max_events: int, max_bytes: int) -> bool:
        return len(self._queue) >= max_events or self._queued_bytes >= max_bytes

    @property
    def queued(self) -> int:
        return len(self._queue)

    def take(self, max_events: int, max_bytes: int) -> list[Item]:
        """Up to ``max_events`` queued events, at most ``max_bytes`` of them (always at least one)."""
        with self.lock:
            batch: list[Item] = []
            size = 2  # the brackets
            while self._queue and len(batch) < max_events:
                item = self._queue[0]
                if batch and size + len(item.body) + 1 > max_bytes:
                    break
                self._queue.popleft()
                self._queued_bytes -= len(item.body)
                self._in_flight[item.id] = item
                batch.append(item)
                size += len(item.body) + 1
            return batch

    def settle(self, outcome: Outcome) -> None:
        """Account for the events an outcome settled (delivered or rejected)."""
        with self.changed:
            for item in outcome.delivered:
                self._in_flight.pop(item.id, None)
            for item, _ in outcome.rejected:
                self._in_flight.pop(item.id, None)
            self._counters.delivered += len(outcome.delivered)
            self._counters.rejected += len(outcome.rejected)
            if outcome.retry:
                self._counters.retries += 1
            self.changed.notify_all()
        for item, why in outcome.rejected:
            log.error("meterstream: event %s rejected by the server, it will not count: %s", item.id, why)
            self._report([item], "rejected", why)

    def abandon(self, items: Sequence[Item], detail: str) -> None:
        """Give up on in-flight ``items`` (the client is closing and its deadline has passed)."""
        if not items:
            return
        with self.changed:
            for item in items:
                self._in_flight.pop(item.id, None)
            self._counters.dropped += len(items)
            self.changed.notify_all()
        log.error("meterstream: %d usage events could not be delivered before shutdown: %s", len(items), detail)
        self._report(items, "shutdown", detail)

    def drain_queue(self) -> list[Item]:
        """Remove and return everything queued (not in flight)."""
        with self.changed:
            items = list(self._queue)
            self._queue.clear()
            self._queued_bytes = 0
            for item in items:
                self._in_flight[item.id] = item
            self.changed.notify_all()
            return items

    def pop_all(self) -> list[Item]:
        """Remove and return every pending event (in flight first), without accounting for them."""
        with self.changed:
            items = [*self._in_flight.values(), *self._queue]
            self._in_flight.clear()
            self._queue.clear()
            self._queued_bytes = 0
            self.changed.notify_all()
            return items

    def reclaim(self) -> None:
        """Put in-flight events back at the head of the queue (their sender is gone)."""
        with self.changed:
            items = list(self._in_flight.values())
            self._in_flight.clear()
            self._queue.extendleft(reversed(items))
            self._queued_bytes += sum(len(i.body) for i in items)
            self.changed.notify_all()

    # -- both ----------------------------------------------------------------------------------------

    def _pending(self) -> int:
        return len(self._queue) + len(self._in_flight)

    def pending(self) -> int:
        with self.lock:
            return self._pending()

    def stats(self) -> DeliveryStats:
        with self.lock:
            c = self._counters
            return DeliveryStats(c.emitted, c.delivered, c.dropped, c.rejected, c.retries, self._pending())

    def _report(self, items: Sequence[Item], reason: DropReason, detail: str) -> None:
        if self.on_drop is None:
            return
        for item in items:
            try:
                self.on_drop(DroppedEvent(json.loads(item.body), reason, detail))
            except Exception:
                log.exception("meterstream: the on_drop callback failed")
