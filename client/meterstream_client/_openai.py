"""Instrumentation of the OpenAI SDK (``openai.OpenAI`` / ``openai.AsyncOpenAI`` and compatible clients)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeVar

from meterstream_client._base import BaseClient
from meterstream_client._context import subject as subject_context
from meterstream_client._events import check_subject
from meterstream_client._instrument import (
    SUBJECT_KWARG,
    Call,
    Settings,
    bind_manager,
    forget_field,
    parsed_result,
    patch_copy,
    patch_method,
    raw_mode,
    resolve_subject,
    track_stream,
    warn_once,
)

ClientT = TypeVar("ClientT")

#: Responses stream events that carry the final response, usage included.
_TERMINAL_EVENTS: Final = frozenset({"response.completed", "response.incomplete", "response.failed"})


def instrument_openai(
    client: ClientT,
    meter: BaseClient,
    *,
    default_subject: str | None = None,
    provider: str = "openai",
    enforce_limits: bool = False,
) -> ClientT:
    """Meter every ``chat.completions`` and ``responses`` call of an OpenAI SDK client; returns the client.

    The client is instrumented in place and keeps behaving exactly as before: same class, same results,
    same streams (when a streamed chat completion did not ask for usage, the wrapper asks for it and
    hides the extra usage-only chunk). Each successful call enqueues one usage event on ``meter``
    (a MeterstreamClient or AsyncMeterstreamClient); a call that raises records nothing.

    Metered: ``chat.completions.create`` / ``parse`` / ``stream``, ``responses.create`` / ``parse`` /
    ``stream`` (sync and async, streaming or not, also through ``with_raw_response``), on this client and
    on the clients ``with_options()`` / ``copy()`` derive from it.

    The subject of a call is the ``meterstream_subject="..."`` keyword (removed before the SDK sees it),
    else the innermost ``with meterstream_client.subject(...)`` block, else ``default_subject``; a call
    with none raises MissingSubjectError before anything is sent to OpenAI.

    Args:
        client: an ``openai.OpenAI``, ``openai.AsyncOpenAI`` (or Azure / compatible) client.
        meter: where usage goes.
        default_subject: the subject of calls that name none.
        provider: the provider the usage is billed as (e.g. ``azure`` for an ``AzureOpenAI`` client).
        enforce_limits: enforce the subject's limits on every metered call (off by default): reserve
            before the call (a call that would exceed a limit raises LimitExceededError before anything is
            sent to OpenAI), commit the response's usage after it instead of emitting an event, release
            the hold if the SDK raises. See ``instrument_*`` in the README ("Reservations").
    """
    if default_subject is not None:
        check_subject(default_subject)
    settings = Settings(meter, provider, default_subject, enforce=enforce_limits)
    completions = getattr(getattr(client, "chat", None), "completions", None)
    responses = getattr(client, "responses", None)
    if completions is None and responses is None:
        raise TypeError(f"not an OpenAI client: {type(client).__name__} has no chat.completions nor responses")
    if completions is not None:
        patch_method(completions, "create", settings, "chat", _chat_create)
        patch_method(completions, "parse", settings, "chat", _non_streaming)
        _patch_stream_helper(completions, settings)
    if responses is not None:
        patch_method(responses, "create", settings, "responses", _responses_create)
        patch_method(responses, "parse", settings, "responses", _non_streaming)
        _patch_stream_helper(responses, settings)
    patch_copy(
        client,
        lambda copy: instrument_openai(
            copy, meter, default_subject=default_subject, provider=provider, enforce_limits=enforce_limits
        ),
    )
    return client


def _non_streaming(call: Call, kwargs: dict[str, Any]) -> Callable[[Any], Any]:
    def after(result: Any) -> Any:
        parsed = parsed_result(result, kwargs)
        if parsed is not None:
            usage = getattr(parsed, "usage", None)
            if usage is None:
                warn_once("openai-no-usage", "meterstream: an OpenAI response carried no usage; not metered")
            else:
                call.record(getattr(parsed, "model", None), usage, service_tier=getattr(parsed, "service_tier", None))
        return result

    return after


def _unmetered_stream(kwargs: Mapping[str, Any]) -> bool:
    if raw_mode(kwargs) is None:
        return False
    warn_once("openai-raw-stream", "meterstream: streamed calls through with_raw_response are not metered")
    return True


def _chat_create(call: Call, kwargs: dict[str, Any]) -> Callable[[Any], Any]:
    if not kwargs.get("stream"):
        return _non_streaming(call, kwargs)
    if _unmetered_stream(kwargs):
        return lambda result: result
    injected = _ask_for_usage(kwargs)

    def after(stream: Any) -> Any:
        track_stream(stream, _ChatTracker(call, injected), call)
        return stream

    return after


def _ask_for_usage(kwargs: dict[str, Any]) -> bool:
    """Make a streamed chat completion end with a usage chunk; True if the caller had not asked for it."""
    options = kwargs.get("stream_options")
    if isinstance(options, Mapping) and options.get("include_usage"):
        return False
    kwargs["stream_options"] = {**(options if isinstance(options, Mapping) else {}), "include_usage": True}
    return True


def _has_output(delta: Any) -> bool:
    """Whether a chat chunk's delta carries generated output (text, a refusal, tool-call arguments)."""
    return bool(
        getattr(delta, "content", None) or getattr(delta, "refusal", None) or getattr(delta, "tool_calls", None)
    )


class _ChatTracker:
    """Usage of a streamed chat completion: the final chunk (empty ``choices``) carries it."""

    def __init__(self, call: Call, injected: bool) -> None:
        self._call = call
        self._injected = injected
        self._last: Any = None

    def observe(self, chunk: Any) -> bool:
        if any(_has_output(getattr(choice, "delta", None)) for choice in getattr(chunk, "choices", None) or ()):
            self._call.output_deltas += 1
        usage = getattr(chunk, "usage", None)
        if usage is None:
            if self._injected:
                # With include_usage the API sends "usage": null on every chunk; without, no such field.
                forget_field(chunk, "usage")
            return False
        self._last = chunk
        final = not getattr(chunk, "choices", None)
        if final:
            self._record()
        # Hide the usage-only chunk only if we asked for it (and it carries nothing else).
        return self._injected and final

    def finish(self, complete: bool) -> None:
        if self._last is not None:
            self._record()
        elif not self._call.recorded and not self._call.settings.enforce:  # enforced: see _instrument._leftover
            warn_once(
                f"openai-chat-no-usage-{complete}",
                "meterstream: a streamed chat completion %s without usage; not metered",
                "ended" if complete else "was closed before its end, so",
            )

    def _record(self) -> None:
        chunk = self._last
        self._call.record(chunk.model, chunk.usage, service_tier=getattr(chunk, "service_tier", None))


def _responses_create(call: Call, kwargs: dict[str, Any]) -> Callable[[Any], Any]:
    if not kwargs.get("stream"):
        return _non_streaming(call, kwargs)
    if _unmetered_stream(kwargs):
        return lambda result: result

    def after(stream: Any) -> Any:
        track_stream(stream, _ResponsesTracker(call), call)
        return stream

    return after


class _ResponsesTracker:
    """Usage of a streamed response: the terminal event (``response.completed``, ...) carries it."""

    def __init__(self, call: Call) -> None:
        self._call = call

    def observe(self, event: Any) -> bool:
        kind = getattr(event, "type", None)
        if isinstance(kind, str) and kind.endswith(".delta"):
            self._call.output_deltas += 1
        if kind in _TERMINAL_EVENTS:
            response = getattr(event, "response", None)
            usage = getattr(response, "usage", None)
            if usage is not None:
                self._call.record(
                    getattr(response, "model", None), usage, service_tier=getattr(response, "service_tier", None)
                )
        return False

    def finish(self, complete: bool) -> None:
        if not self._call.recorded and not self._call.settings.enforce:  # enforced: see _instrument._leftover
            warn_once(
                f"openai-responses-no-usage-{complete}",
                "meterstream: a streamed response %s without usage; not metered",
                "ended" if complete else "was closed before its end, so",
            )


def _patch_stream_helper(resource: Any, settings: Settings) -> None:
    """``.stream()`` helpers call ``create`` (metered) later, when entered: bind the subject now."""
    current = getattr(resource, "stream", None)
    if current is None:
        return
    original = getattr(current, "__meterstream_original__", current)

    @functools.wraps(original)
    def stream(*args: Any, **kwargs: Any) -> Any:
        subject = resolve_subject(kwargs.pop(SUBJECT_KWARG, None), settings)
        # The async helpers call create() now (and await it later), the sync ones call it when entered.
        with subject_context(subject):
            manager = original(*args, **kwargs)
        bind_manager(manager, None, subject)
        return manager

    stream.__meterstream_original__ = original  # type: ignore[attr-defined]
    resource.stream = stream
