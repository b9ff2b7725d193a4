"""Machinery shared by the OpenAI and Anthropic instrumentation.

An SDK client is instrumented in place: the ``create`` (and ``parse`` / ``stream``) methods of its
resource objects are replaced by wrappers on the instance, so the client keeps its class, its other
methods and its streams' types. A wrapper resolves the subject, calls the original method, and then only
enqueues an event: the LLM call is not slowed down and never fails because of metering (the one exception
is a call with no subject at all, refused before anything is spent).

Streams are instrumented by replacing the SDK ``Stream`` object's item iterator with one that watches
the items go by (and hides the usage chunk the wrapper asked for), so the caller still holds the SDK's
own ``Stream`` / ``AsyncStream``.

In enforce mode (``enforce_limits=True``) a wrapper also reserves before calling the original method (a
denial raises before anything is sent) and settles the reservation after it: a commit of the usage it read
(instead of the event) or a release if the SDK raised; a stream settles when it ends or is closed.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any, Protocol

from meterstream_client._async_client import AsyncMeterstreamClient
from meterstream_client._base import BaseClient
from meterstream_client._client import MeterstreamClient
from meterstream_client._context import _SUBJECT, current_subject
from meterstream_client._events import build_event, check_subject
from meterstream_client._reservations import Reservation, prompt_request

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
    #: Reserve before each call, commit its usage after (instead of emitting it), release on failure.
    enforce: bool = False


@dataclass(slots=True)
class Call:
    """One instrumented LLM call: who it is for, when it was made, and whether its usage was recorded."""

    settings: Settings
    subject: str
    started: datetime
    api: str | None
    request_model: str | None
    recorded: bool = field(default=False)
    # Enforce mode (see "enforce mode" below): the reserve's ``request``, the hold, and what settles it.
    prompt: dict[str, Any] | None = None
    reservation: Reservation | None = None
    #: The usage to commit: the ``data`` the event would have carried.
    pending: dict[str, Any] | None = None
    #: A tracked stream commits or releases the hold when it ends, not the wrapper.
    deferred: bool = False
    settled: bool = False
    #: Stream items received, and those that carried output (for a stream closed before its usage).
    received: int = 0
    output_deltas: int = 0

    def record(
        self,
        model: object,
        usage: object,
        *,
        service_tier: object = None,
        extra_data: Mapping[str, Any] | None = None,
    ) -> None:
        """Enqueue the call's usage, once (in enforce mode: keep it for the commit). Never raises into the
        caller's LLM call."""
        if self.recorded:
            return
        self.recorded = True
        name = model if isinstance(model, str) and model else self.request_model or "unknown"
        if self.settings.enforce:
            try:
                # The same event data emit would send, so a commit records exactly what emit would have.
                self.pending = build_event(
                    subject=self.subject,
                    provider=self.settings.provider,
                    model=name,
                    usage=usage,
                    source=self.settings.meter.source,
                    time=self.started,
                    api=self.api,
                    service_tier=service_tier if isinstance(service_tier, str) and service_tier else None,
                    extra_data=extra_data,
                )["data"]
            except Exception:
                log.exception("meterstream: usage of a %s call for %r unreadable", self.settings.provider, self.subject)
            return
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
    call = Call(
        settings,
        resolve_subject(explicit, settings),
        datetime.now(UTC),
        api,
        model if isinstance(model, str) else None,
    )
    if settings.enforce:
        call.prompt = prompt_request(kwargs)
    return call


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
            if settings.enforce:
                await areserve(call)
                return await _enforced_async(call, original(*args, **kwargs), after)
            return after(await _run_active(original(*args, **kwargs)))

        wrapper: Any = async_wrapper
    else:
        # Also the async SDK methods: they are plain functions (argument checking decorators) returning a
        # coroutine, and stay so; the subject is resolved when they are called.

        lazy = _returns_coroutine(resource, original)

        @functools.wraps(original)
        def sync_wrapper(*args: Any, **kwargs: Any) -> Any:
            call = begin(kwargs, settings, api)
            if call is None:
                return original(*args, **kwargs)
            after = handler(call, kwargs)
            if settings.enforce:
                return _enforced_sync(call, lazy, lambda: original(*args, **kwargs), after)
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


# -- enforce mode: reserve before the call, commit (or release) after it --------------------------------------
#
# The hold is settled exactly once (Call.settled): committed with the usage the wrapper read from the result
# (what emit would have sent: the commit replaces the event), or released when the SDK raised. A stream
# settles when its usage is complete, or when it ends, is closed or is dropped; a stream closed before any
# usage arrived commits what is known of it (see _leftover), and one that received nothing is released.
# Failing to commit or release is logged, never raised into the caller's call: the hold then expires by
# itself after its TTL.


def _returns_coroutine(resource: Any, method: Callable[..., Any]) -> bool:
    """Whether a plain SDK method returns a coroutine (the async SDKs' decorated methods): it must not be
    started before the reservation is made, and the reserve can be awaited."""
    return inspect.iscoroutinefunction(inspect.unwrap(method)) or type(resource).__name__.startswith("Async")


def _sync_meter(call: Call) -> MeterstreamClient:
    meter = call.settings.meter
    if not isinstance(meter, MeterstreamClient):
        raise TypeError(
            f"enforce_limits on a synchronous SDK client needs a MeterstreamClient, not {type(meter).__name__}"
        )
    return meter


def _reserve_kwargs(call: Call) -> dict[str, Any]:
    return {
        "provider": call.settings.provider,
        "model": call.request_model,
        "request": call.prompt if call.prompt is not None else {},
    }


def reserve(call: Call) -> None:
    """Hold the call's budget; LimitExceededError (or any reserve failure) before the provider is called."""
    call.reservation = _sync_meter(call).reserve(call.subject, **_reserve_kwargs(call))


async def areserve(call: Call) -> None:
    meter = call.settings.meter
    if isinstance(meter, AsyncMeterstreamClient):
        call.reservation = await meter.reserve(call.subject, **_reserve_kwargs(call))
    elif isinstance(meter, MeterstreamClient):
        call.reservation = await asyncio.to_thread(meter.reserve, call.subject, **_reserve_kwargs(call))
    else:
        raise TypeError(f"enforce_limits needs a MeterstreamClient or an AsyncMeterstreamClient, not {type(meter)}")


def _leftover(call: Call) -> dict[str, Any] | None:
    """What to commit for a stream that ended before its usage was known; None: release instead.

    The provider bills a stream closed early for its whole prompt and for what it generated until then, so
    releasing its hold would make closing streams early a way around the limits. What is known is
    committed: the input tokens of the reservation's estimate (Meterstream's bound on this very prompt: an
    upper bound, the prompt's exact count never reached the client) and one output token per item that
    carried output (about what the caller received; the provider may have generated a few more). A stream
    that delivered nothing is released: the call never started.
    """
    if call.received == 0 or call.reservation is None:
        return None
    estimate = call.reservation.estimate
    return {
        "provider": call.settings.provider,
        "model": call.request_model or call.reservation.model or "unknown",
        "input_tokens": estimate.input_tokens if estimate is not None else 0,
        "output_tokens": call.output_deltas,
    }


def _settlement(call: Call, failed: bool) -> tuple[str, dict[str, Any] | None] | None:
    """("commit", usage) or ("release", None) for the first settle of a reserved call; None otherwise."""
    if call.settled or call.reservation is None:
        return None
    call.settled = True
    if failed:
        return ("release", None)
    usage = call.pending
    if usage is None:
        usage = _leftover(call)
        if usage is not None:
            log.info(
                "meterstream: a %s stream for %r ended before its usage; committing %d input tokens (estimated) "
                "and %d output tokens (received)",
                call.settings.provider,
                call.subject,
                usage["input_tokens"],
                usage["output_tokens"],
            )
    if usage is not None and call.reservation.model is not None:
        # Meterstream records a reservation's usage under the model it was reserved for (the features it
        # held on), and refuses a commit naming another one, such as the dated snapshot a response names.
        usage = {k: v for k, v in usage.items() if k != "model"}
    return ("commit", usage) if usage is not None else ("release", None)


def _settle_failed(call: Call, action: str) -> None:
    rid = call.reservation.id if call.reservation is not None else "?"
    log.exception(
        "meterstream: %s of reservation %s (a %s call for %r) failed; the hold expires by itself",
        action,
        rid,
        call.settings.provider,
        call.subject,
    )


def settle(call: Call, *, failed: bool = False) -> None:
    """Commit the call's usage, or release its hold (``failed``: the SDK raised). Once; never raises."""
    plan = _settlement(call, failed)
    if plan is None:
        return
    assert call.reservation is not None
    action, usage = plan
    try:
        meter = _sync_meter(call)
        if usage is not None:
            meter.commit(call.reservation.id, usage)
        else:
            meter.release(call.reservation.id)
    except Exception:
        _settle_failed(call, action)


async def asettle(call: Call, *, failed: bool = False) -> None:
    plan = _settlement(call, failed)
    if plan is None:
        return
    assert call.reservation is not None
    action, usage = plan
    rid = call.reservation.id
    meter = call.settings.meter
    try:
        if isinstance(meter, AsyncMeterstreamClient):
            await (meter.commit(rid, usage) if usage is not None else meter.release(rid))
        elif isinstance(meter, MeterstreamClient):
            await asyncio.to_thread(*((meter.commit, rid, usage) if usage is not None else (meter.release, rid)))
    except Exception:
        _settle_failed(call, action)


#: Settlements left to run after a cancellation (a strong reference until they finish).
_BACKGROUND: set[asyncio.Task[None]] = set()


def _settle_later(call: Call, *, failed: bool = False) -> None:
    """Settle from a task of its own: the caller's task was cancelled and must not wait for it."""
    if call.settled or call.reservation is None:
        return
    try:
        task = asyncio.get_running_loop().create_task(asettle(call, failed=failed))
    except RuntimeError:
        return
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


def _enforced_sync(call: Call, lazy: bool, start: Callable[[], Any], after: Callable[[Any], Any]) -> Any:
    if lazy:
        # An async SDK method: it only builds a coroutine here, started (after the reserve) when awaited.
        token = _ACTIVE.set(True)
        try:
            pending = start()
        finally:
            _ACTIVE.reset(token)
        if inspect.isawaitable(pending):
            return _reserve_then_await(call, pending, after)
        raise TypeError("meterstream: an SDK method expected to return a coroutine did not")  # pragma: no cover
    reserve(call)
    token = _ACTIVE.set(True)
    try:
        result = start()
    except BaseException:
        settle(call, failed=True)
        raise
    finally:
        _ACTIVE.reset(token)
    if inspect.isawaitable(result):
        return _enforced_async(call, result, after)
    try:
        out = after(result)
    except BaseException:
        settle(call, failed=True)
        raise
    if not call.deferred:
        settle(call)
    return out


async def _reserve_then_await(call: Call, pending: Awaitable[Any], after: Callable[[Any], Any]) -> Any:
    try:
        await areserve(call)
    except BaseException:
        close = getattr(pending, "close", None)
        if close is not None:
            close()  # never started: nothing was sent
        raise
    return await _enforced_async(call, pending, after)


async def _enforced_async(call: Call, pending: Awaitable[Any], after: Callable[[Any], Any]) -> Any:
    try:
        result = await _run_active(pending)
        out = after(result)
    except asyncio.CancelledError:
        _settle_later(call, failed=True)
        raise
    except BaseException:
        await asettle(call, failed=True)
        raise
    if not call.deferred:
        await asettle(call)
    return out


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


def track_stream(stream: Any, tracker: Tracker, call: Call | None = None) -> bool:
    """Make ``stream`` (an SDK Stream or AsyncStream) report its items to ``tracker``; False if this SDK's
    stream cannot be instrumented (the stream is then left untouched). In enforce mode (``call`` given,
    its settings enforcing), the stream also settles the call's reservation."""
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
    if call is not None and call.settings.enforce:
        _enforce_stream(stream, original, tracker, call)
    elif hasattr(original, "__anext__"):
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


@dataclass(slots=True)
class _StreamState:
    """Where an enforced stream's generator is: running its own code (``busy``), or done."""

    busy: bool = False
    done: bool = False


def _enforce_stream(stream: Any, original: Any, tracker: Tracker, call: Call) -> None:
    state = _StreamState()
    response = getattr(stream, "response", None)
    if hasattr(original, "__anext__"):
        agen = _enforced_items_async(original, tracker, call, state)
        stream._iterator = agen
        if response is not None and callable(getattr(response, "aclose", None)):
            response.aclose = _AsyncCloseHook(response, agen, call, state)
    else:
        gen = _enforced_items_sync(original, tracker, call, state)
        stream._iterator = gen
        if response is not None and callable(getattr(response, "close", None)):
            response.close = _CloseHook(response, gen, call, state)
    call.deferred = True


class _CloseHook:
    """Replaces ``close`` on a tracked stream's HTTP response, the one method every way of closing an SDK
    stream ends in (``stream.close()``, ``with stream:``, the helpers' ``close()`` / ``__exit__``): the
    stream's items end there, so the reservation is settled there, not when the stream is collected.
    Weak references only: the response must not keep the generator (nor itself) alive."""

    def __init__(self, response: Any, items: Iterator[Any], call: Call, state: _StreamState) -> None:
        self._response = weakref.ref(response)
        self._close = type(response).close
        self._items = weakref.ref(items)
        self._call = call
        self._state = state

    def __call__(self) -> None:
        # While the generator runs (the SDK closes the response when its items end), it settles itself.
        if not self._state.busy:
            items = self._items()
            if items is not None and not self._state.done:
                items.close()  # type: ignore[attr-defined]
            settle(self._call)  # closed before its first item: nothing received, released
        response = self._response()
        if response is not None:
            self._close(response)


class _AsyncCloseHook:
    """``aclose`` of an async stream's HTTP response; see _CloseHook."""

    def __init__(self, response: Any, items: AsyncIterator[Any], call: Call, state: _StreamState) -> None:
        self._response = weakref.ref(response)
        self._close = type(response).aclose
        self._items = weakref.ref(items)
        self._call = call
        self._state = state

    async def __call__(self) -> None:
        if not self._state.busy:
            items = self._items()
            if items is not None and not self._state.done:
                await items.aclose()  # type: ignore[attr-defined]
            await asettle(self._call)
        response = self._response()
        if response is not None:
            await self._close(response)


def _enforced_items_sync(items: Iterator[Any], tracker: Tracker, call: Call, state: _StreamState) -> Iterator[Any]:
    """The items of an enforced stream: usage watched as usual, and the hold settled when the usage is
    complete (before the item that completes it is handed on), or when the stream ends or is closed;
    released if the SDK raises."""
    state.busy = True
    try:
        for item in items:
            call.received += 1
            hidden = tracker.observe(item)
            if call.pending is not None:
                settle(call)
            if not hidden:
                state.busy = False
                yield item
                state.busy = True
    except GeneratorExit:
        state.busy = True
        tracker.finish(False)
        settle(call)
        raise
    except Exception:
        state.busy = True
        settle(call, failed=True)
        raise
    except BaseException:  # KeyboardInterrupt: the caller stopped reading
        state.busy = True
        tracker.finish(False)
        settle(call)
        raise
    else:
        tracker.finish(True)
        settle(call)
    finally:
        state.busy = True
        close = getattr(items, "close", None)
        if close is not None:
            close()
        state.done = True


async def _enforced_items_async(
    items: AsyncIterator[Any], tracker: Tracker, call: Call, state: _StreamState
) -> AsyncIterator[Any]:
    state.busy = True
    try:
        async for item in items:
            call.received += 1
            hidden = tracker.observe(item)
            if call.pending is not None:
                await asettle(call)
            if not hidden:
                state.busy = False
                yield item
                state.busy = True
    except GeneratorExit:
        state.busy = True
        tracker.finish(False)
        await asettle(call)
        raise
    except asyncio.CancelledError:
        # The caller's task was cancelled while the stream was read: like closing it early, but the
        # cancellation must not wait for the commit.
        state.busy = True
        tracker.finish(False)
        _settle_later(call)
        raise
    except Exception:
        state.busy = True
        await asettle(call, failed=True)
        raise
    except BaseException:
        state.busy = True
        tracker.finish(False)
        _settle_later(call)
        raise
    else:
        tracker.finish(True)
        await asettle(call)
    finally:
        state.busy = True
        aclose = getattr(items, "aclose", None)
        if aclose is not None:
            await aclose()
        state.done = True


def bind_manager(
    manager: Any, on_request: Callable[[Any], Any] | None, subject: str, enforced: Call | None = None
) -> bool:
    """Make a stream helper's manager (``messages.stream()``, ``chat.completions.stream()``, ...) run its
    deferred request with ``subject`` as the current subject, and pass the resulting raw stream to
    ``on_request``. With ``enforced`` (a call in enforce mode), the request is preceded by its reserve
    and a failed request releases the hold. False if this SDK's manager cannot be bound."""
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
            if enforced is not None:
                try:
                    await areserve(enforced)
                except BaseException:
                    close = getattr(request, "close", None)
                    if close is not None:
                        close()  # never started: nothing was sent
                    raise
            token = _SUBJECT.set(subject)
            try:
                stream = await request
            except BaseException:
                if enforced is not None:
                    await asettle(enforced, failed=True)
                raise
            finally:
                _SUBJECT.reset(token)
            return on_request(stream) if on_request is not None else stream

        setattr(manager, attribute, bound_async())
        return True

    def bound() -> Any:
        if enforced is not None:
            reserve(enforced)
        token = _SUBJECT.set(subject)
        try:
            stream = request()
        except BaseException:
            if enforced is not None:
                settle(enforced, failed=True)
            raise
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
