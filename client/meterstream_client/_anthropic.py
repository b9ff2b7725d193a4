"""Instrumentation of the Anthropic SDK (``anthropic.Anthropic`` / ``anthropic.AsyncAnthropic``)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from meterstream_client._base import BaseClient
from meterstream_client._events import as_usage_dict, check_subject
from meterstream_client._instrument import (
    Call,
    Settings,
    begin,
    bind_manager,
    parsed_result,
    patch_copy,
    patch_method,
    raw_mode,
    track_stream,
    warn_once,
)

ClientT = TypeVar("ClientT")


def instrument_anthropic(
    client: ClientT,
    meter: BaseClient,
    *,
    default_subject: str | None = None,
    provider: str = "anthropic",
    enforce_limits: bool = False,
) -> ClientT:
    """Meter every ``messages`` call of an Anthropic SDK client; returns the client.

    The client is instrumented in place and keeps behaving exactly as before (same class, results and
    streams). Each successful call enqueues one usage event on ``meter``; a call that raises records
    nothing.

    Metered: ``messages.create`` (streaming or not), ``messages.parse`` and the ``messages.stream()``
    helper, sync and async, also through ``with_raw_response`` (non-streaming), on this client and on
    the clients ``with_options()`` / ``copy()`` derive from it. A stream's usage is the input side from
    ``message_start`` updated with the cumulative counts of ``message_delta``; a stream closed before
    its end is metered with the usage received so far.

    The subject of a call is the ``meterstream_subject="..."`` keyword (removed before the SDK sees it),
    else the innermost ``with meterstream_client.subject(...)`` block, else ``default_subject``; a call
    with none raises MissingSubjectError before anything is sent to Anthropic.

    ``enforce_limits=True`` (off by default) enforces the subject's limits on every metered call: a
    reserve before it (a call that would exceed raises LimitExceededError before anything is sent to
    Anthropic), a commit of the response's usage after it instead of an emitted event, a release if the
    SDK raises. See the README ("Reservations").
    """
    if default_subject is not None:
        check_subject(default_subject)
    settings = Settings(meter, provider, default_subject, enforce=enforce_limits)
    messages = getattr(client, "messages", None)
    if messages is None:
        raise TypeError(f"not an Anthropic client: {type(client).__name__} has no messages")
    patch_method(messages, "create", settings, None, _messages_create)
    patch_method(messages, "parse", settings, None, _non_streaming)
    _patch_stream_helper(messages, settings)
    patch_copy(
        client,
        lambda copy: instrument_anthropic(
            copy, meter, default_subject=default_subject, provider=provider, enforce_limits=enforce_limits
        ),
    )
    return client


def _speed(usage: dict[str, Any]) -> dict[str, Any] | None:
    # Anthropic reports fast mode inside usage; Meterstream prices it from data.speed.
    speed = usage.get("speed")
    return {"speed": speed} if isinstance(speed, str) and speed and speed != "standard" else None


def _non_streaming(call: Call, kwargs: dict[str, Any]) -> Callable[[Any], Any]:
    def after(result: Any) -> Any:
        parsed = parsed_result(result, kwargs)
        if parsed is not None:
            usage = getattr(parsed, "usage", None)
            if usage is None:
                warn_once("anthropic-no-usage", "meterstream: an Anthropic response carried no usage; not metered")
            else:
                dumped = as_usage_dict(usage)
                call.record(getattr(parsed, "model", None), dumped, extra_data=_speed(dumped))
        return result

    return after


def _messages_create(call: Call, kwargs: dict[str, Any]) -> Callable[[Any], Any]:
    if not kwargs.get("stream"):
        return _non_streaming(call, kwargs)
    if raw_mode(kwargs) is not None:
        warn_once("anthropic-raw-stream", "meterstream: streamed calls through with_raw_response are not metered")
        return lambda result: result

    def after(stream: Any) -> Any:
        track_stream(stream, _MessagesTracker(call), call)
        return stream

    return after


class _MessagesTracker:
    """Usage of a message stream: ``message_start`` (input side), then ``message_delta`` (cumulative)."""

    def __init__(self, call: Call) -> None:
        self._call = call
        self._model: Any = None
        self._usage: dict[str, Any] | None = None

    def observe(self, event: Any) -> bool:
        kind = getattr(event, "type", None)
        if kind == "message_start":
            message = getattr(event, "message", None)
            self._model = getattr(message, "model", None)
            usage = getattr(message, "usage", None)
            self._usage = as_usage_dict(usage) if usage is not None else None
        elif kind == "message_delta":
            usage = getattr(event, "usage", None)
            if usage is not None:
                update = {k: v for k, v in as_usage_dict(usage).items() if v is not None}
                self._usage = {**(self._usage or {}), **update}
        elif kind == "message_stop":
            self._record()
        return False

    def finish(self, complete: bool) -> None:
        if self._usage is not None:
            self._record()
        elif not self._call.recorded:
            warn_once(
                f"anthropic-no-usage-{complete}",
                "meterstream: a message stream %s without usage; not metered",
                "ended" if complete else "was closed before its start, so",
            )

    def _record(self) -> None:
        if self._usage is not None:
            self._call.record(self._model, self._usage, extra_data=_speed(self._usage))


def _patch_stream_helper(messages: Any, settings: Settings) -> None:
    """``messages.stream()`` sends its request when entered, not through ``create``: meter that request."""
    current = getattr(messages, "stream", None)
    if current is None:
        return
    original = getattr(current, "__meterstream_original__", current)

    @functools.wraps(original)
    def stream(*args: Any, **kwargs: Any) -> Any:
        call = begin(kwargs, settings, None)
        manager = original(*args, **kwargs)
        if call is None:
            return manager
        tracker = _MessagesTracker(call)

        def on_request(raw_stream: Any) -> Any:
            track_stream(raw_stream, tracker, call)
            return raw_stream

        bind_manager(manager, on_request, call.subject, call if settings.enforce else None)
        return manager

    stream.__meterstream_original__ = original  # type: ignore[attr-defined]
    messages.stream = stream
