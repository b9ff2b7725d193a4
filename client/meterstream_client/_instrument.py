"""Machinery shared by the OpenAI and Anthropic instrumentation.

An SDK client is instrumented in place: the ``create`` (and ``parse`` / ``stream``) methods of its
resource objects are replaced by wrappers on the instance, so the client keeps its class, its other
methods and its streams' types. A wrapper resolves the subject, calls the original method, and then only
enqueues an event: the LLM call is not slowed down and never fails because of metering (the one exception
is a call with no subject at all, refused before anything is spent).

Streams are instrumented by replacing the SDK ``Stream`` object's item iterator with one that watches
the items go by (and hides the usage chunk the wrapper asked for), so the caller still holds the SDK's
own ``Stream`` / ``AsyncStream``.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any, Protocol

from meterstream_client._base import BaseClient
from meterstream_client._context import _SUBJECT, current_subject
from meterstream_client._events import check_subject

log = logging.getLogger("meterstream_client")

#: The per-call keyword naming the end user; removed before the SDK sees the call.
SUBJECT_KWARG = "meterstream_subject"

#: Header the SDKs add for ``with_raw_response`` ("true" or "raw") and ``with_streaming_response`` ("stream").
_RAW_HEADER = "x-stainless-raw-response"

#: Set while an instrumented call runs the original method: a nested instrumented call (an SDK helper
#: implemented on top of ``create``) is then passed through, so that a call is metered exactly once.
_ACTIVE: ContextVar[bool] = ContextVar("meterstream_active", default=False)

_warned: set[str] = set()


class MissingSubjectError(ValueError):
    """An instrumented LLM call had no subject: no ``meterstream_subject=`` keyword, no enclosing
    ``meterstream_client.subject(...)`` block and no ``default_subject``. Raised before the provider is
    called, so that no usage is ever spent without being attributed."""


def warn_once(key: str, message: str, *args: object) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message, *args)


@dataclass(frozen=True, slots=True)
class Settings:
    """How one SDK client is instrumented."""

    meter: BaseClient
    provider: str
    default_subject: str | None


@dataclass(slots=True)
class Call:
    """One instrumented LLM call: who it is for, when it was made, and whether its usage was recorded."""

    settings: Settings
    subject: str
    started: datetime
    api: str | None
    request_model: str | None
    recorded: bool = field(default=False)

    def record(
        self,
        model: object,
        usage: object,
        *,
        service_tier: object = None,
        extra_data: Mapping[str, Any] | None = None,
    ) -> None:
        """Enqueue the call's usage, once. Never raises into the caller's LLM call."""
        if self.recorded:
            return
        self.recorded = True
        name = model if isinstance(model, str) and model else self.request_model or "unknown"
        try:
            self.settings.meter.emit(
                self.subject,
                self.settings.provider,
                name,
                usage,
                api=self.api,
                service_tier=service_tier if isinstance(service_tier, str) and service_tier else None,
                time=self.started,
                extra_data=extra_data,
            )
        except Exception:
            # BufferFullError with on_full="raise", a closed client, ...: the caller's call succeeded and
            # its result must reach it; the failure is logged (and counted / handed to on_drop).
            log.exception("meterstream: usage of a %s call for %r not recorded", self.settings.provider, self.subject)


def begin(kwargs: dict[str, Any], settings: Settings, api: str | None) -> Call | None:
    """Pop the subject keyword and resolve the subject of a call; None when it must not be metered here
    (nested inside another instrumented call)."""
    explicit = kwargs.pop(SUBJECT_KWARG, None)
    if _ACTIVE.get():
        return None
    model = kwargs.get("model")
    return Call(
        settings,
        resolve_subject(explicit, settings),
        datetime.now(UTC),
        api,
        model if isinstance(model, str) else None,
    )


def resolve_subject(explicit: object, settings: Settings) -> str:
    """The per-call subject, else the context's, else the default; MissingSubjectError if none."""
    subject = explicit if explicit is not None else current_subject() or settings.default_subject
    if subject is None:
        raise MissingSubjectError(
            f"no subject for this {settings.provider} call: pass {SUBJECT_KWARG}=..., call it inside "
            "`with meterstream_client.subject(...)`, or instrument with default_subject=..."
        )
    return check_subject(subject)


def raw_mode(kwargs: Mapping[str, Any]) -> str | None:
    """``"true"`` / ``"raw"`` for ``with_raw_response``, ``"stream"`` for ``with_streaming_response``."""
    headers = kwargs.get("extra_headers")
    if not isinstance(headers, Mapping):
        return None
    for key, value in headers.items():
        if isinstance(key, str) and key.lower() == _RAW_HEADER:
            return str(value)
    return None


def parsed_result(result: Any, kwargs: Mapping[str, Any]) -> Any:
    """What to read the usage of a non-streaming call from: the result itself, or for ``with_raw_response``
    the JSON body (already read; parsing it ourselves leaves the caller's ``parse()`` untouched). None
    for ``with_streaming_response``, whose body is not read yet and is the caller's to read."""
    mode = raw_mode(kwargs)
    if mode is None:
        return result
    if mode != "stream":
        try:
            body = json.loads(result.http_response.content)
        except Exception:
            body = None
        if isinstance(body, dict):
            return SimpleNamespace(
                usage=body.get("usage"), model=body.get("model"), service_tier=body.get("service_tier")
            )
    warn_once("streaming-response", "meterstream: calls through with_streaming_response are not metered")
    return None


Handler = Callable[[Call, dict[str, Any]], Callable[[Any], Any]]
"""Prepares the call's keywords (before the SDK sees them) and returns what to do with the result."""


def patch_method(resource: Any, name: str, settings: Settings, api: str | None, handler: Handler) -> None:
    """Replace ``resource.name`` (sync or async) by a metering wrapper, on the instance."""
    current = getattr(resource, name, None)
    if current is None:
        return
    original = getattr(current, "__meterstream_original__", current)

    if inspect.iscoroutinefunction(original):

        @functools.wraps(original)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            call = begin(kwargs, settings, api)
            if call is None:
                return await original(*args, **kwargs)
            after = handler(call, kwargs)
            return after(await _run_active(original(*args, **kwargs)))

        wrapper: Any = async_wrapper
    else:
        # Also the async SDK methods: they are plain functions (argument checking decorators) returning a
        # coroutine, and stay so; the subject is resolved when they are called.

        @functools.wraps(original)
        def sync_wrapper(*args: Any, **kwargs: Any) -> Any:
            call = begin(kwargs, settings, api)
            if call is None:
                return original(*args, **kwargs)
            after = handler(call, kwargs)
            token = _ACTIVE.set(True)
            try:
                result = original(*args, **kwargs)
            finally:
                _ACTIVE.reset(token)
            if inspect.isawaitable(result):
                return _finish_async(result, after)
            return after(result)

        wrapper = sync_wrapper
    wrapper.__meterstream_original__ = original
    setattr(resource, name, wrapper)
    # with_raw_response / with_streaming_response capture `create` when first used: make them capture ours.
    for cached in ("with_raw_response", "with_streaming_response"):
        vars(resource).pop(cached, None)


async def _run_active(pending: Awaitable[Any]) -> Any:
    token = _ACTIVE.set(True)
    try:
        return await pending
    finally:
        _ACTIVE.reset(token)


async def _finish_async(pending: Awaitable[Any], after: Callable[[Any], Any]) -> Any:
    return after(await _run_active(pending))


def patch_copy(client: Any, instrument: Callable[[Any], Any]) -> None:
    """``client.copy()`` / ``client.with_options()`` return new clients: instrument those too."""
    for name in ("copy", "with_options"):
        current = getattr(client, name, None)
        if current is None:
            continue
        setattr(client, name, _instrumenting(getattr(current, "__meterstream_original__", current), instrument))


def _instrumenting(original: Callable[..., Any], instrument: Callable[[Any], Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def copied(*args: Any, **kwargs: Any) -> Any:
        return instrument(original(*args, **kwargs))

    copied.__meterstream_original__ = original  # type: ignore[attr-defined]
    return copied


class Tracker(Protocol):
    """Watches a stream's items for usage."""

    def observe(self, item: Any) -> bool:
        """Look at one item; True to hide it from the caller."""
        ...

    def finish(self, complete: bool) -> None:
        """The stream ended (``complete``) or was closed early."""
        ...


def track_stream(stream: Any, tracker: Tracker) -> bool:
    """Make ``stream`` (an SDK Stream or AsyncStream) report its items to ``tracker``; False if this SDK's
    stream cannot be instrumented (the stream is then left untouched)."""
    if getattr(stream, "_meterstream_tracked", False):
        return True
    try:
        original = stream._iterator
    except AttributeError:
        warn_once(
            f"stream-{type(stream).__name__}",
            "meterstream: %s has no _iterator; streamed usage of this SDK version is not metered",
            type(stream).__qualname__,
        )
        return False
    # The wrapper must not refer to the stream itself: a cycle would leave closing a dropped stream to
    # the garbage collector.
    if hasattr(original, "__anext__"):
        stream._iterator = _track_async(original, tracker)
    else:
        stream._iterator = _track_sync(original, tracker)
    stream._meterstream_tracked = True
    return True


def _track_sync(items: Iterator[Any], tracker: Tracker) -> Iterator[Any]:
    try:
        for item in items:
            if not tracker.observe(item):
                yield item
    except GeneratorExit:
        tracker.finish(False)
        raise
    else:
        tracker.finish(True)
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            close()


async def _track_async(items: AsyncIterator[Any], tracker: Tracker) -> AsyncIterator[Any]:
    try:
        async for item in items:
            if not tracker.observe(item):
                yield item
    except GeneratorExit:
        tracker.finish(False)
        raise
    else:
        tracker.finish(True)
    finally:
        aclose = getattr(items, "aclose", None)
        if aclose is not None:
            await aclose()


def bind_manager(manager: Any, on_request: Callable[[Any], Any] | None, subject: str) -> bool:
    """Make a stream helper's manager (``messages.stream()``, ``chat.completions.stream()``, ...) run its
    deferred request with ``subject`` as the current subject, and pass the resulting raw stream to
    ``on_request``. False if this SDK's manager cannot be bound."""
    attribute = next((name for name in vars(manager) if name.endswith("__api_request")), None)
    if attribute is None:
        warn_once(
            f"manager-{type(manager).__name__}",
            "meterstream: cannot bind %s; its calls are metered only through meterstream_client.subject()",
            type(manager).__qualname__,
        )
        return False
    request = getattr(manager, attribute)

    if inspect.isawaitable(request):

        async def bound_async() -> Any:
            token = _SUBJECT.set(subject)
            try:
                stream = await request
            finally:
                _SUBJECT.reset(token)
            return on_request(stream) if on_request is not None else stream

        setattr(manager, attribute, bound_async())
        return True

    def bound() -> Any:
        token = _SUBJECT.set(subject)
        try:
            stream = request()
        finally:
            _SUBJECT.reset(token)
        return on_request(stream) if on_request is not None else stream

    setattr(manager, attribute, bound)
    return True


def forget_field(model: Any, name: str) -> None:
    """Mark a pydantic field as not sent (so ``to_dict()`` / ``model_dump(exclude_unset=True)`` omit it),
    as it would be had the wrapper not changed the request."""
    fields_set = getattr(model, "__pydantic_fields_set__", None)
    if isinstance(fields_set, set):
        fields_set.discard(name)
