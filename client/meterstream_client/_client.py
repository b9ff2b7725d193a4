"""The synchronous client: ``emit`` enqueues, a daemon thread batches and delivers."""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from types import TracebackType
from typing import Any, Self

import httpx

from meterstream_client._base import BaseClient, FullPolicy
from meterstream_client._delivery import (
    BATCH_CONTENT_TYPE,
    EVENTS_PATH,
    Delivery,
    DroppedEvent,
    Item,
    Outbox,
    Outcome,
    RetryPolicy,
    classify,
    failure,
)
from meterstream_client._events import DEFAULT_EVENT_TYPE
from meterstream_client._query import METERS, UsageWindow, WindowSize, merge, parse_rows, query_params
from meterstream_client._reservations import (
    ApiCall,
    Estimate,
    Reservation,
    check_ok,
    commit_body,
    estimate_call,
    parse_estimate,
    parse_reservation,
    reservation_call,
)

log = logging.getLogger("meterstream_client")

#: Open clients, flushed at interpreter exit and reset in a forked child.
_LIVE: weakref.WeakSet[MeterstreamClient] = weakref.WeakSet()


class MeterstreamClient(BaseClient):
    """Sends LLM usage to Meterstream from any thread, without blocking the caller on the network.

    ``emit`` validates the event and puts it in a bounded in-memory buffer; a daemon thread sends the
    buffer in batches (up to ``max_batch_events`` events / ``max_batch_bytes``, or whatever arrived within
    ``flush_interval`` seconds of the first event) and retries failures until Meterstream acknowledges
    them (same event ids, so a retry is never counted twice). ``flush()`` waits for delivery; ``close()``
    (also run at interpreter exit, up to ``exit_timeout``) flushes and stops the thread.

    Buffer policy: the buffer holds up to ``max_buffer`` events (queued and in flight). When it is full,
    ``emit`` waits up to ``full_timeout`` seconds for room, then drops the *new* event (counted in
    ``stats.dropped``, logged, handed to ``on_drop``), or raises BufferFullError with ``on_full="raise"``.
    Events already accepted are never dropped while the client is open.

    Args:
        base_url: Meterstream's URL, e.g. ``http://127.0.0.1:8888``.
        source: the CloudEvents ``source`` of every event (the deduplication key is ``(source, id)``);
            ``meterstream-client/<hostname>`` by default.
        api_key: a Meterstream API key (``ms_ingest_...`` to send events, a ``read`` or ``admin`` key for
            ``query_usage`` too), sent as ``Authorization: Bearer <key>`` on every request; the
            ``METERSTREAM_API_KEY`` environment variable when None (``""``: send no key).
        headers: extra HTTP headers. An ``Authorization`` header here is sent as it is and wins over
            ``api_key`` (e.g. for a gateway in front of Meterstream that takes its own credentials).
        timeout: seconds per HTTP request.
        max_batch_events, max_batch_bytes: batch limits (Meterstream accepts up to 1000 events / 1 MiB).
        flush_interval: seconds to wait for a batch to fill before sending what is there.
        max_buffer: events held at most (about 0.5 KB each).
        full_timeout: seconds ``emit`` may wait for room in a full buffer.
        on_full: ``"drop"`` (default) or ``"raise"``, when the buffer is still full after ``full_timeout``.
        retry: backoff of retries (exponential with jitter by default; ``Retry-After`` is honoured).
        on_drop: called with each event that will not be delivered (buffer full, rejected as invalid,
            undelivered at shutdown), e.g. to persist it for a later replay.
        exit_timeout: seconds ``close()`` (and the exit hook) keeps trying to deliver what is buffered.
        event_type: the CloudEvents ``type`` (Meterstream's meters count ``llm.usage``).
        api_attempts: how many times a reservation request (``reserve``, ``commit``, ``release``,
            ``get_reservation``, ``estimate``) is sent at most when it fails with a network error or a 5xx
            (they are idempotent; waits follow ``retry``, capped at its ``max_delay``).
        transport: an httpx transport (tests, proxies).
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8888",
        *,
        source: str | None = None,
        api_key: str | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
        max_batch_events: int = 250,
        max_batch_bytes: int = 512 * 1024,
        flush_interval: float = 0.5,
        max_buffer: int = 50_000,
        full_timeout: float = 0.1,
        on_full: FullPolicy = "drop",
        retry: RetryPolicy | None = None,
        on_drop: Callable[[DroppedEvent], None] | None = None,
        exit_timeout: float = 10.0,
        event_type: str = DEFAULT_EVENT_TYPE,
        api_attempts: int = 5,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(
            base_url,
            source=source,
            api_key=api_key,
            headers=headers,
            timeout=timeout,
            max_batch_events=max_batch_events,
            max_batch_bytes=max_batch_bytes,
            flush_interval=flush_interval,
            max_buffer=max_buffer,
            full_timeout=full_timeout,
            on_full=on_full,
            retry=retry,
            on_drop=on_drop,
            exit_timeout=exit_timeout,
            event_type=event_type,
            api_attempts=api_attempts,
        )
        self._transport = transport
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._query_http: httpx.Client | None = None
        self._failing = False
        _LIVE.add(self)

    # -- public API ----------------------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Send everything buffered now; wait until Meterstream acknowledged it (or rejected it as invalid).

        Returns True when nothing is pending, False if ``timeout`` seconds passed first (the events stay
        buffered and keep being retried).
        """
        outbox = self._outbox
        if outbox.pending() and not self._closed:
            self._before_offer()
        with outbox.changed:
            outbox.flushing += 1
            outbox.changed.notify_all()
            try:
                return outbox.changed.wait_for(lambda: outbox._pending() == 0, timeout)
            finally:
                outbox.flushing -= 1

    def close(self, timeout: float | None = None) -> None:
        """Deliver what is buffered (trying for up to ``timeout`` seconds, ``exit_timeout`` by default),
        then stop. Events still undelivered are dropped: logged and handed to ``on_drop``."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        _LIVE.discard(self)
        wait = self._exit_timeout if timeout is None else timeout
        outbox = self._outbox
        with outbox.changed:
            outbox.closed = True
            outbox.deadline = time.monotonic() + wait
            outbox.changed.notify_all()
        if thread is not None and thread.is_alive():
            if thread is not threading.current_thread():
                # A request in flight at the deadline is itself cut at the deadline (its timeout is capped).
                thread.join(wait + 2)
                if thread.is_alive():
                    log.error("meterstream: the sender did not stop within %.1f s", wait)
        elif outbox.pending():
            # No sender (none started, or it died): deliver here. No new thread: at interpreter exit
            # Python may refuse to start one.
            outbox.reclaim()
            self._run(outbox)
        if self._query_http is not None:
            self._query_http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def query_usage(
        self,
        subject: str,
        *,
        window: WindowSize | None = "DAY",
        start: datetime | None = None,
        end: datetime | None = None,
        time_zone: str = "UTC",
        by_model: bool = False,
    ) -> list[UsageWindow]:
        """A subject's tokens and cost per window (``DAY``, ``MONTH``, ``HOUR``, ``MINUTE``, or None for one
        total), optionally per model, from ``start`` (inclusive) to ``end`` (exclusive); windows are
        calendar days / months in ``time_zone``. Values are exact (cost as Decimal).

        Raises:
            httpx.HTTPStatusError: Meterstream answered with an error.
        """
        params = query_params(subject, window=window, start=start, end=end, time_zone=time_zone, by_model=by_model)
        http = self._query_client()
        rows = {}
        for meter in METERS:
            response = http.get(f"/api/v1/meters/{meter}/query", params=params)
            response.raise_for_status()
            rows[meter] = parse_rows(response.content)
        return merge(subject, rows)

    # -- reservations --------------------------------------------------------------------------------

    def reserve(
        self,
        subject: str,
        *,
        provider: str | None = None,
        model: str | None = None,
        estimate: Mapping[str, int] | None = None,
        request: Mapping[str, Any] | None = None,
        amounts: Mapping[str, Decimal | int | float | str] | None = None,
        ttl_seconds: int | None = None,
        reservation_id: str | None = None,
    ) -> Reservation:
        """Hold part of ``subject``'s remaining budget for one LLM call, before making it.

        Give exactly one of:

        * ``request``: the call's request body (``messages``, ``system``, ``tools``, ``max_tokens``, ...,
          as sent to the provider; large inline media is replaced by a placeholder before sending), which
          Meterstream bounds for ``provider`` / ``model``;
        * ``estimate``: canonical upper bounds, e.g. ``{"input_tokens": 1200, "output_tokens": 500}``;
        * ``amounts``: exactly what to hold per feature, e.g. ``{"tokens": 1700}``.

        The hold lasts ``ttl_seconds`` (1-3600, Meterstream's default 60), until :meth:`commit` or
        :meth:`release`. ``reservation_id`` (1-128 of ``A-Za-z0-9._:-``) makes the request idempotent:
        the same id for the same subject gets the same answer; a ULID is made when none is given, so a
        reserve is always retried safely (on network errors and 5xx, up to ``api_attempts`` times).

        Raises:
            LimitExceededError: the call does not fit (HTTP 429): ``features`` with their balances,
                ``retry_after``, ``fit`` (the largest ``max_tokens`` that would fit).
            MeterstreamAPIError: any other error answer (e.g. a 400 naming a request that cannot be
                bounded); an ``httpx.HTTPStatusError``.
            httpx.TransportError: Meterstream stayed unreachable.
        """
        call, rid = self._reserve_request(
            subject,
            provider=provider,
            model=model,
            estimate=estimate,
            request=request,
            amounts=amounts,
            ttl_seconds=ttl_seconds,
            reservation_id=reservation_id,
        )
        return parse_reservation(check_ok(self._api(call), subject=subject, reservation_id=rid))

    def commit(
        self, reservation_id: str, usage: Mapping[str, Any], *, provider: str | None = None, model: str | None = None
    ) -> Reservation:
        """Replace a hold by what the call used; the usage is recorded as one ``llm.usage`` event (whose
        id is the reservation's).

        ``usage``: canonical counts (``{"input_tokens": 812, "output_tokens": 230}``) or the provider's
        usage object under ``"usage"`` (``{"usage": response.usage}``; a dict or the SDK's pydantic
        model), optionally with ``provider`` / ``model`` (also accepted as keywords): required when the
        reservation named none, else they must be the reservation's (the event is recorded under them).
        Idempotent and retried: a repeated commit counts once. A commit after the hold expired still
        records the usage.

        Raises:
            MeterstreamAPIError: e.g. 409 after a release, 404 for an unknown id.
        """
        call = reservation_call(reservation_id, "commit", commit_body(usage, provider=provider, model=model))
        return parse_reservation(check_ok(self._api(call)))

    def release(self, reservation_id: str) -> Reservation:
        """Free a hold (the call was not made, or failed). Idempotent and retried.

        Raises:
            MeterstreamAPIError: e.g. 409 after a commit, 404 for an unknown id.
        """
        return parse_reservation(check_ok(self._api(reservation_call(reservation_id, "release"))))

    def get_reservation(self, reservation_id: str) -> Reservation:
        """A reservation's state: ``held``, ``committed``, ``released`` or ``expired``, and per feature the
        amount held and (once committed) ``actual``."""
        return parse_reservation(check_ok(self._api(reservation_call(reservation_id))))

    def estimate(self, provider: str, model: str, request: Mapping[str, Any]) -> Estimate:
        """Meterstream's bound on a call (input tokens, maximum output tokens, cost), without holding
        anything. A request that cannot be bounded (no ``max_tokens`` and no known maximum for the
        model, ...) raises MeterstreamAPIError (400, naming the field)."""
        return parse_estimate(check_ok(self._api(estimate_call(provider, model, request))))

    def _api(self, call: ApiCall) -> httpx.Response:
        """Send ``call``, again after a network error or a retryable status while attempts remain."""
        http = self._query_client()
        headers = {"Content-Type": "application/json"} if call.body is not None else None
        attempt = 0
        while True:
            try:
                response = http.request(call.method, call.path, content=call.body, headers=headers)
            except httpx.TransportError as exc:
                delay = self._retry_delay(call, attempt, None)
                if delay is None:
                    raise
                reason = f"{type(exc).__name__}: {exc}"
            else:
                delay = self._retry_delay(call, attempt, response)
                if delay is None:
                    return response
                reason = f"HTTP {response.status_code}"
            log.warning("meterstream: %s %s failed (%s); retrying in %.2f s", call.method, call.path, reason, delay)
            time.sleep(delay)
            attempt += 1

    # -- the sender ----------------------------------------------------------------------------------

    def _before_offer(self) -> None:
        thread = self._thread
        if thread is not None and thread.is_alive():
            return
        with self._lock:
            if self._closed or (self._thread is not None and self._thread.is_alive()):
                return
            if self._thread is not None:
                # The sender died (it logs why); what it held goes back to the queue for the next one.
                self._outbox.reclaim()
            self._thread = threading.Thread(
                target=self._run, args=(self._outbox,), name="meterstream-sender", daemon=True
            )
            self._thread.start()

    def _room_wait(self) -> float:
        # The sender itself (an on_drop callback that emits) must not wait for room only it can make.
        return 0.0 if threading.current_thread() is self._thread else self._full_timeout

    def _run(self, outbox: Outbox) -> None:
        http = httpx.Client(
            base_url=self.base_url, headers=self._headers, timeout=self._timeout, transport=self._transport
        )
        try:
            while (batch := self._next_batch(outbox)) is not None:
                self._deliver(http, outbox, batch)
        except Exception:
            log.exception("meterstream: the sender failed; restarting at the next emit or flush")
            outbox.reclaim()
        finally:
            http.close()

    def _next_batch(self, outbox: Outbox) -> list[Item] | None:
        """Wait for events; then up to ``flush_interval`` more for a full batch (not when flushing or
        closing). None once closed and empty."""
        with outbox.changed:
            while outbox.queued == 0:
                if outbox.closed:
                    return None
                outbox.changed.wait()
            end = time.monotonic() + self._flush_interval
            while not (
                outbox.closed or outbox.flushing or outbox.batch_ready(self._max_batch_events, self._max_batch_bytes)
            ):
                remaining = end - time.monotonic()
                if remaining <= 0:
                    break
                outbox.changed.wait(remaining)
            past_deadline = outbox.deadline is not None and time.monotonic() >= outbox.deadline
        if past_deadline:
            outbox.abandon(outbox.drain_queue(), "Meterstream did not accept them before the close timeout")
            return None
        return outbox.take(self._max_batch_events, self._max_batch_bytes)

    def _deliver(self, http: httpx.Client, outbox: Outbox, batch: Sequence[Item]) -> None:
        delivery = Delivery(batch, self._retry)
        while (items := delivery.next()) is not None:
            outcome = self._post(http, outbox, items)
            outbox.settle(outcome)
            delay = delivery.record(outcome)
            if delay is None:
                self._healthy()
                continue
            self._failed(outcome, delay, outbox)
            if not self._pause(outbox, delay):
                why = f"Meterstream unreachable until the close timeout: {outcome.reason}"
                outbox.abandon(delivery.remaining(), why)
                outbox.abandon(outbox.drain_queue(), why)
                return

    def _post(self, http: httpx.Client, outbox: Outbox, items: Sequence[Item]) -> Outcome:
        timeout = self._timeout
        if outbox.deadline is not None:
            timeout = max(0.1, min(timeout, outbox.deadline - time.monotonic()))
        try:
            response = http.post(
                EVENTS_PATH,
                content=b"[" + b",".join(item.body for item in items) + b"]",
                headers={"Content-Type": BATCH_CONTENT_TYPE},
                timeout=timeout,
            )
        except httpx.HTTPError as exc:
            return failure(exc)
        return classify(items, response.status_code, response.headers, response.content)

    def _pause(self, outbox: Outbox, delay: float) -> bool:
        """Sleep ``delay`` seconds before a retry; False if the client is closing and its deadline passed."""
        end = time.monotonic() + delay
        with outbox.changed:
            while True:
                now = time.monotonic()
                if outbox.deadline is not None:
                    if now >= outbox.deadline:
                        return False
                    # Closing: retry sooner, so that several attempts fit before the deadline.
                    end = min(end, now + max(0.05, (outbox.deadline - now) / 2))
                if now >= end:
                    return True
                outbox.changed.wait(end - now)

    def _failed(self, outcome: Outcome, delay: float, outbox: Outbox) -> None:
        # One warning per outage, not one per retry.
        level = logging.DEBUG if self._failing else logging.WARNING
        self._failing = True
        log.log(
            level,
            "meterstream: delivery failed (%s); retrying in %.1f s, %d events pending",
            outcome.reason,
            delay,
            outbox.pending(),
        )

    def _healthy(self) -> None:
        if self._failing:
            self._failing = False
            log.info("meterstream: delivery recovered")

    def _query_client(self) -> httpx.Client:
        with self._lock:
            if self._query_http is None:
                self._query_http = httpx.Client(
                    base_url=self.base_url, headers=self._headers, timeout=self._timeout, transport=self._transport
                )
            return self._query_http

    def _adopt(self, items: Sequence[Item]) -> None:
        """Take over already-encoded events (another client's buffer)."""
        for item in items:
            if not self._outbox.offer(item, 0):
                self._outbox.drop_full(item)

    def _reset_after_fork(self) -> None:
        """In a forked child: the parent delivers what was buffered before the fork; the child starts empty
        (and with fresh locks: the parent's may have been held mid-fork)."""
        self._lock = threading.Lock()
        self._thread = None
        self._query_http = None
        self._failing = False
        self._outbox = Outbox(self._outbox.capacity, self._on_drop)


def _close_all() -> None:
    for client in list(_LIVE):
        try:
            client.close()
        except Exception:
            log.exception("meterstream: closing a client at exit failed")


def _after_fork_in_child() -> None:
    for client in list(_LIVE):
        client._reset_after_fork()


atexit.register(_close_all)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
