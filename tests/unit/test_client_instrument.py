"""The SDK instrumentation's logic, on stand-in SDK clients whose items are the real SDK model types:
subject resolution, exactly one event per successful call, nothing for a failed one, and streams the
caller sees unchanged."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import meterstream_client as mc
import pytest
from anthropic.types import Message, RawMessageStreamEvent
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from tests.helpers.stub_providers import StubProviders

STUB = StubProviders()  # its response builders only: no server is started


def payloads(stream: Iterator[bytes] | None) -> list[dict[str, Any]]:
    assert stream is not None
    out = []
    for event in stream:
        data = event.decode().split("data: ", 1)[1].strip()
        if data != "[DONE]":
            out.append(json.loads(data))
    return out


def chat_body(model: str = "gpt-4o", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


class Recorder:
    """Stands in for a MeterstreamClient: records what would be emitted."""

    def __init__(self, fail: bool = False) -> None:
        self.events: list[dict[str, Any]] = []
        self.fail = fail

    def emit(self, subject: str, provider: str, model: str, usage: object = None, **kwargs: Any) -> str:
        if self.fail:
            raise mc.BufferFullError("full")
        usage = usage if isinstance(usage, dict) else usage.model_dump(exclude_unset=True)  # type: ignore[union-attr]
        self.events.append({"subject": subject, "provider": provider, "model": model, "usage": usage, **kwargs})
        return "id"


class FakeStream:
    """The SDK Stream's shape: items come from ``_iterator``."""

    def __init__(self, items: list[Any], fail_at: int | None = None) -> None:
        self._iterator = self._items(items, fail_at)

    @staticmethod
    def _items(items: list[Any], fail_at: int | None) -> Iterator[Any]:
        for i, item in enumerate(items):
            if i == fail_at:
                raise RuntimeError("stream broke")
            yield item

    def __iter__(self) -> Iterator[Any]:
        yield from self._iterator

    def __next__(self) -> Any:
        return next(self._iterator)

    def close(self) -> None:
        self._iterator.close()  # type: ignore[attr-defined]


class FakeAsyncStream:
    def __init__(self, items: list[Any]) -> None:
        self._iterator = self._items(items)

    @staticmethod
    async def _items(items: list[Any]) -> AsyncIterator[Any]:
        for item in items:
            yield item

    async def __aiter__(self) -> AsyncIterator[Any]:
        async for item in self._iterator:
            yield item


class Resource:
    """A resource whose ``create`` answers from ``answer`` (and records what the SDK would have sent)."""

    def __init__(self, answer: Callable[[dict[str, Any]], Any]) -> None:
        self.answer = answer
        self.sent: list[dict[str, Any]] = []

    def create(self, **kwargs: Any) -> Any:
        self.sent.append(kwargs)
        return self.answer(kwargs)

    def parse(self, **kwargs: Any) -> Any:
        return self.create(**kwargs)  # an SDK helper built on create: must be metered once


class FakeOpenAI:
    def __init__(self, chat: Resource, responses: Resource) -> None:
        self.chat = type("Chat", (), {})()
        self.chat.completions = chat
        self.responses = responses

    def copy(self, **_: Any) -> FakeOpenAI:
        return FakeOpenAI(self.chat.completions, self.responses)

    with_options = copy


class FakeAnthropic:
    def __init__(self, messages: Any) -> None:
        self.messages = messages


def openai_answer(body: dict[str, Any]) -> Any:
    if body.get("model") == "error-400":
        raise ValueError("bad request")
    document, stream = STUB.chat(body)
    if stream is None:
        return ChatCompletion.model_validate(document)
    return FakeStream([ChatCompletionChunk.model_validate(p) for p in payloads(stream)], body.get("fail_at"))


def responses_answer(body: dict[str, Any]) -> Any:
    document, stream = STUB.responses(body)
    if stream is None:
        return Response.model_validate(document)
    adapter: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
    return FakeStream([adapter.validate_python(p) for p in payloads(stream)])


def messages_answer(body: dict[str, Any]) -> Any:
    document, stream = STUB.messages(body)
    if stream is None:
        return Message.model_validate(document)
    adapter: TypeAdapter[Any] = TypeAdapter(RawMessageStreamEvent)
    return FakeStream([adapter.validate_python(p) for p in payloads(stream) if p["type"] != "ping"])


@pytest.fixture
def meter() -> Recorder:
    return Recorder()


@pytest.fixture
def oai(meter: Recorder) -> FakeOpenAI:
    return mc.instrument_openai(FakeOpenAI(Resource(openai_answer), Resource(responses_answer)), meter)  # type: ignore[arg-type]


def test_subject_from_keyword_then_context_then_default(meter: Recorder) -> None:
    chat = Resource(openai_answer)
    client = mc.instrument_openai(FakeOpenAI(chat, Resource(responses_answer)), meter, default_subject="anon")  # type: ignore[arg-type]
    with mc.subject("ctx"):
        client.chat.completions.create(**chat_body(), meterstream_subject="kw")
        client.chat.completions.create(**chat_body())
        with mc.subject("inner"):
            client.chat.completions.create(**chat_body())
    client.chat.completions.create(**chat_body())
    assert [e["subject"] for e in meter.events] == ["kw", "ctx", "inner", "anon"]
    assert all(mc.SUBJECT_KWARG not in sent for sent in chat.sent), "the keyword never reaches the SDK"
    assert mc.current_subject() is None


def test_no_subject_refuses_the_call_before_it_is_made(meter: Recorder) -> None:
    chat = Resource(openai_answer)
    client = mc.instrument_openai(FakeOpenAI(chat, Resource(responses_answer)), meter)  # type: ignore[arg-type]
    with pytest.raises(mc.MissingSubjectError):
        client.chat.completions.create(**chat_body())
    with pytest.raises(ValueError, match="control characters"):
        client.chat.completions.create(**chat_body(), meterstream_subject="bad\nsubject")
    assert chat.sent == [] and meter.events == []


def test_non_streaming_call_records_the_response_usage(oai: FakeOpenAI, meter: Recorder) -> None:
    started = datetime.now(UTC)
    result = oai.chat.completions.create(**chat_body("gpt-4o-mini"), meterstream_subject="a")
    assert isinstance(result, ChatCompletion)
    (event,) = meter.events
    assert event["model"] == "gpt-4o-mini-2024-07-18" and event["provider"] == "openai"
    assert event["usage"] == result.usage.model_dump(exclude_unset=True)  # type: ignore[union-attr]
    assert event["api"] == "chat" and event["service_tier"] == "default"
    assert started <= event["time"] <= datetime.now(UTC)


def test_a_failing_call_records_nothing(oai: FakeOpenAI, meter: Recorder) -> None:
    with pytest.raises(ValueError, match="bad request"):
        oai.chat.completions.create(**chat_body("error-400"), meterstream_subject="a")
    stream = oai.chat.completions.create(**chat_body(), stream=True, fail_at=3, meterstream_subject="a")
    with pytest.raises(RuntimeError, match="stream broke"):
        list(stream)
    assert meter.events == []


def test_helpers_built_on_create_are_metered_once(oai: FakeOpenAI, meter: Recorder) -> None:
    oai.chat.completions.parse(**chat_body(), meterstream_subject="a")
    assert len(meter.events) == 1


def test_stream_without_usage_requested_hides_the_usage_chunk(oai: FakeOpenAI, meter: Recorder) -> None:
    stream = oai.chat.completions.create(
        **chat_body(), stream=True, stream_options={"include_obfuscation": False}, meterstream_subject="a"
    )
    assert isinstance(stream, FakeStream), "the caller keeps the SDK's stream object"
    sent = oai.chat.completions.sent[-1]  # type: ignore[attr-defined]
    assert sent["stream_options"] == {"include_obfuscation": False, "include_usage": True}
    chunks = list(stream)
    assert chunks and all(c.choices and c.usage is None and "usage" not in c.to_dict() for c in chunks)
    (event,) = meter.events
    document, _ = STUB.chat(chat_body())
    assert document is not None and event["usage"] == document["usage"]


def test_stream_with_usage_requested_is_untouched(oai: FakeOpenAI, meter: Recorder) -> None:
    options = {"include_usage": True}
    chunks = list(
        oai.chat.completions.create(**chat_body(), stream=True, stream_options=options, meterstream_subject="a")
    )
    assert oai.chat.completions.sent[-1]["stream_options"] is options  # type: ignore[attr-defined]
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert all("usage" in c.to_dict() for c in chunks), "the API's usage: null fields stay"
    assert len(meter.events) == 1 and meter.events[0]["usage"] == chunks[-1].usage.model_dump(exclude_unset=True)


def test_a_stream_closed_before_its_usage_records_nothing(
    oai: FakeOpenAI, meter: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    stream = oai.chat.completions.create(**chat_body(), stream=True, meterstream_subject="a")
    next(iter(stream))
    stream.close()
    assert meter.events == []
    assert "without usage" in caplog.text


def test_responses_stream_records_the_completed_usage(oai: FakeOpenAI, meter: Recorder) -> None:
    events = list(oai.responses.create(model="gpt-5", input="x", stream=True, meterstream_subject="a"))
    assert events[-1].type == "response.completed"
    (event,) = meter.events
    assert event["api"] == "responses" and event["usage"] == events[-1].response.usage.model_dump(exclude_unset=True)
    oai.responses.create(model="gpt-5", input="x", meterstream_subject="a")
    assert meter.events[1]["usage"] == event["usage"], "streamed or not, the same usage"


@pytest.mark.parametrize("seed", range(6))
def test_anthropic_stream_usage_is_start_updated_by_delta(meter: Recorder, seed: int) -> None:
    client = mc.instrument_anthropic(FakeAnthropic(Resource(messages_answer)), meter)  # type: ignore[arg-type]
    body = {
        "model": "claude-haiku-4-5-20251001",
        "max_tokens": 10,
        "messages": [{"role": "user", "content": str(seed)}],
    }
    events = list(client.messages.create(**body, stream=True, meterstream_subject="a"))
    assert [e.type for e in events][-1] == "message_stop"
    message = client.messages.create(**body, meterstream_subject="a")
    streamed, plain = meter.events
    assert streamed["usage"] == plain["usage"] == message.usage.model_dump(exclude_unset=True)
    assert streamed["provider"] == "anthropic" and streamed["api"] is None


def test_anthropic_stream_closed_early_records_what_it_received(meter: Recorder) -> None:
    client = mc.instrument_anthropic(FakeAnthropic(Resource(messages_answer)), meter)  # type: ignore[arg-type]
    body = {"model": "claude-haiku-4-5-20251001", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]}
    stream = client.messages.create(**body, stream=True, meterstream_subject="a")
    start = next(iter(stream))
    stream.close()
    (event,) = meter.events
    assert event["usage"] == start.message.usage.model_dump(exclude_unset=True), "input side known, output so far"


def test_anthropic_fast_mode_is_passed_as_speed(meter: Recorder) -> None:
    def fast(body: dict[str, Any]) -> Message:
        document, _ = STUB.messages(body)
        assert document is not None
        return Message.model_validate({**document, "usage": {**document["usage"], "speed": "fast"}})

    client = mc.instrument_anthropic(FakeAnthropic(Resource(fast)), meter)  # type: ignore[arg-type]
    client.messages.create(model="claude-opus-4-6", max_tokens=1, messages=[], meterstream_subject="a")
    assert meter.events[0]["extra_data"] == {"speed": "fast"}


def test_a_metering_failure_never_reaches_the_caller(caplog: pytest.LogCaptureFixture) -> None:
    client = mc.instrument_openai(FakeOpenAI(Resource(openai_answer), Resource(responses_answer)), Recorder(fail=True))  # type: ignore[arg-type]
    result = client.chat.completions.create(**chat_body(), meterstream_subject="a")
    assert isinstance(result, ChatCompletion)
    assert "not recorded" in caplog.text


def test_instrumenting_again_replaces_rather_than_stacks(meter: Recorder) -> None:
    other = Recorder()
    client = FakeOpenAI(Resource(openai_answer), Resource(responses_answer))
    mc.instrument_openai(client, meter)  # type: ignore[arg-type]
    mc.instrument_openai(client, other)  # type: ignore[arg-type]
    client.chat.completions.create(**chat_body(), meterstream_subject="a")
    assert (len(meter.events), len(other.events)) == (0, 1)


def test_copies_are_instrumented(oai: FakeOpenAI, meter: Recorder) -> None:
    oai.with_options(timeout=1).chat.completions.create(**chat_body(), meterstream_subject="a")
    oai.copy().responses.create(model="gpt-5", input="x", meterstream_subject="a")
    assert len(meter.events) == 2


def test_async_methods_and_streams(meter: Recorder) -> None:
    class AsyncResource:
        async def create(self, **kwargs: Any) -> Any:  # like an `async def` SDK method
            return self.answer(kwargs)

        def parse(self, **kwargs: Any) -> Any:  # like a decorated one: a plain function returning a coroutine
            return self.create(**kwargs)

        @staticmethod
        def answer(kwargs: dict[str, Any]) -> Any:
            result = openai_answer(kwargs)
            return FakeAsyncStream(list(result._iterator)) if kwargs.get("stream") else result

    chat = AsyncResource()
    client = mc.instrument_openai(FakeOpenAI(chat, Resource(responses_answer)), meter)  # type: ignore[arg-type, arg-type]

    async def main() -> None:
        assert asyncio.iscoroutinefunction(client.chat.completions.create)
        await client.chat.completions.create(**chat_body(), meterstream_subject="a")
        await client.chat.completions.parse(**chat_body(), meterstream_subject="b")
        with mc.subject("c"):
            stream = await client.chat.completions.create(**chat_body(), stream=True)
        chunks = [c async for c in stream]
        assert all(c.choices for c in chunks)

    asyncio.run(main())
    assert [e["subject"] for e in meter.events] == ["a", "b", "c"]
