"""What the sync and async clients share: configuration, ``emit`` and the buffer policy."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

import httpx

from meterstream_client._delivery import DeliveryStats, DroppedEvent, Item, Outbox, RetryPolicy, parse_retry_after
from meterstream_client._events import DEFAULT_EVENT_TYPE, build_event, check_text, default_source, encode_event
from meterstream_client._reservations import ApiCall, new_reservation_id, reserve_body, reserve_call

#: Meterstream's own request limits (413 above them).
SERVER_MAX_EVENTS = 1000
SERVER_MAX_BYTES = 1024 * 1024

#: Where the API key comes from when none is given.
API_KEY_ENV = "METERSTREAM_API_KEY"

FullPolicy = Literal["drop", "raise"]


def request_headers(api_key: str | None, headers: Mapping[str, str] | None) -> dict[str, str]:
    """The headers of every request: ``headers``, plus ``Authorization: Bearer <key>`` for ``api_key`` (or
    ``$METERSTREAM_API_KEY`` when it is None; an empty key sends none) unless ``headers`` has its own
    ``Authorization``, which wins."""
    out = dict(headers or {})
    key = os.environ.get(API_KEY_ENV) if api_key is None else api_key
    key = key.strip() if key else ""
    if key and not any(name.lower() == "authorization" for name in out):
        out["Authorization"] = f"Bearer {key}"
    return out


class BufferFullError(RuntimeError):
    """Raised by ``emit`` when the buffer is full and the client was created with ``on_full="raise"``."""


class BaseClient:
    """Configuration and the emitting side of a Meterstream client (see MeterstreamClient for the options)."""

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
    ) -> None:
        if not 1 <= max_batch_events <= SERVER_MAX_EVENTS:
            raise ValueError(f"max_batch_events must be from 1 to {SERVER_MAX_EVENTS}")
        if not 1024 <= max_batch_bytes <= SERVER_MAX_BYTES:
            raise ValueError(f"max_batch_bytes must be from 1024 to {SERVER_MAX_BYTES}")
        if on_full not in ("drop", "raise"):
            raise ValueError("on_full must be 'drop' or 'raise'")
        if isinstance(api_attempts, bool) or not isinstance(api_attempts, int) or api_attempts < 1:
            raise ValueError("api_attempts must be an integer of at least 1")
        if timeout <= 0 or flush_interval < 0 or full_timeout < 0 or exit_timeout < 0:
            raise ValueError("timeouts and intervals must not be negative")
        self.base_url = base_url.rstrip("/")
        self.source = check_text("source", source, 1024) if source is not None else default_source()
        self._headers = request_headers(api_key, headers)
        self._timeout = timeout
        self._max_batch_events = max_batch_events
        self._max_batch_bytes = max_batch_bytes
        self._flush_interval = flush_interval
        self._full_timeout = full_timeout
        self._on_full: FullPolicy = on_full
        self._retry = retry or RetryPolicy()
        self._on_drop = on_drop
        self._exit_timeout = exit_timeout
        self._event_type = check_text("event_type", event_type, 256)
        self._outbox = Outbox(max_buffer, on_drop)
        self._api_attempts = api_attempts

    def emit(
        self,
        subject: str,
        provider: str,
        model: str,
        usage: object = None,
        *,
        counts: Mapping[str, int] | None = None,
        api: str | None = None,
        service_tier: str | None = None,
        batch: bool | None = None,
        time: datetime | None = None,
        event_id: str | None = None,
        extra_data: Mapping[str, Any] | None = None,
    ) -> str | None:
        """Queue the usage of one LLM call for delivery; return its event id, or None if it was dropped.

        Never does network I/O: the event is validated, encoded and put in the buffer, and sent in the
        background (batched, retried until Meterstream acknowledges it).

        Args:
            subject: the end user the usage is attributed to (1-256 printable characters).
            provider: ``openai``, ``anthropic``, ``google``, ``aws``, ... (as Meterstream / genai-prices
                know them).
            model: the model as the provider's response names it.
            usage: the provider's usage object, verbatim (a dict or the SDK's pydantic model, e.g.
                ``response.usage``); Meterstream normalises it.
            counts: instead of ``usage``, canonical counts: ``input_tokens`` (including cache reads and
                writes), ``output_tokens`` (including reasoning), ``cache_read_tokens``,
                ``cache_write_tokens``, ``reasoning_tokens``.
            api: for OpenAI, ``chat`` or ``responses`` (detected from the usage shape when omitted).
            service_tier: the tier the provider reports (``flex``, ``priority``, ...): selects the price.
            batch: True for batch-API calls (batch prices).
            time: when the call was made (timezone-aware); now by default.
            event_id: the CloudEvent id; a new UUID4 by default. Reusing an id (with the same source) makes
                Meterstream count the event once.
            extra_data: further ``data`` fields (e.g. ``{"speed": "fast"}``).

        Raises:
            ValueError, TypeError: the event is invalid (Meterstream would reject it).
            BufferFullError: the buffer stayed full for ``full_timeout`` and ``on_full="raise"``.
            RuntimeError: the client is closed.
        """
        event = build_event(
            subject=subject,
            provider=provider,
            model=model,
            usage=usage,
            counts=counts,
            source=self.source,
            event_type=self._event_type,
            time=time,
            event_id=event_id,
            api=api,
            service_tier=service_tier,
            batch=batch,
            extra_data=extra_data,
        )
        body = encode_event(event)
        if len(body) + 2 > self._max_batch_bytes:
            raise ValueError(f"the event is {len(body)} bytes, more than max_batch_bytes ({self._max_batch_bytes})")
        item = Item(event["id"], body)
        self._before_offer()
        if self._outbox.offer(item, self._room_wait()):
            self._after_offer()
            return item.id
        if self._on_full == "raise":
            raise BufferFullError(f"the Meterstream buffer is full ({self._outbox.capacity} events)")
        self._outbox.drop_full(item)
        return None

    # -- reservations: requests built and answers read here, sent by the sync / async client ------------

    def _reserve_request(
        self,
        subject: str,
        *,
        provider: str | None,
        model: str | None,
        estimate: Mapping[str, int] | None,
        request: Mapping[str, Any] | None,
        amounts: Mapping[str, Decimal | int | float | str] | None,
        ttl_seconds: int | None,
        reservation_id: str | None,
    ) -> tuple[ApiCall, str]:
        rid = reservation_id if reservation_id is not None else new_reservation_id()
        body = reserve_body(
            reservation_id=rid,
            provider=provider,
            model=model,
            estimate=estimate,
            request=request,
            amounts=amounts,
            ttl_seconds=ttl_seconds,
        )
        return reserve_call(subject, body), rid

    def _retry_delay(self, call: ApiCall, attempt: int, response: httpx.Response | None) -> float | None:
        """Seconds to wait before sending ``call`` again after its ``attempt``-th failure (a transport
        error when ``response`` is None), or None when it must not be (or is no longer) retried."""
        if attempt + 1 >= self._api_attempts:
            return None
        retry_after = None
        if response is not None:
            if not call.retryable(response.status_code):
                return None
            retry_after = parse_retry_after(response.headers.get("retry-after"))
        # A caller is waiting: never longer than the backoff's ceiling, whatever Retry-After says.
        return min(self._retry.delay(attempt, retry_after), self._retry.max_delay)

    @property
    def stats(self) -> DeliveryStats:
        """Delivery counters: emitted, delivered, dropped, rejected, retries, pending."""
        return self._outbox.stats()

    # Hooks for the sync and async clients.

    def _before_offer(self) -> None:
        """Make sure a sender is running."""

    def _room_wait(self) -> float:
        """How long ``emit`` may wait for room in a full buffer."""
        return 0.0

    def _after_offer(self) -> None:
        """Wake the sender if it needs waking."""
