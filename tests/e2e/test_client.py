"""The Python client end to end: the real OpenAI and Anthropic SDK clients, instrumented, calling a local
stub provider; the real Meterstream service (``meterstream up``) storing their usage.

Ground truth is what the provider sent (the stub records each response's usage) priced by genai-prices
directly; the assertions are exact: every call's usage stored verbatim, once, with the cost genai-prices
gives, and the per-subject meter totals (read through the client's query helper) equal to the sums.
Including when Meterstream is down during the calls, and when its acknowledgements are lost.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import anthropic
import httpx
import meterstream_client as mc
import openai
import pytest
from pydantic import BaseModel

from tests.helpers.flaky_proxy import FlakyProxy
from tests.helpers.stack import LocalStack
from tests.helpers.stub_providers import Served, StubProviders
from tests.helpers.truth import Sent, sent_from_provider_usage

pytestmark = pytest.mark.e2e

OPENAI_CHAT = ("gpt-4o-mini", "gpt-4o", "o3-mini")
OPENAI_RESPONSES = ("gpt-5", "gpt-4o-mini")
# Current models genai-prices knows (the SDK warns on deprecated ones, e.g. claude-sonnet-4-20250514).
ANTHROPIC = ("claude-haiku-4-5-20251001", "claude-opus-4-5-20251101")
FLAVOUR = {"chat": "chat", "responses": "responses", "messages": "default"}
PROVIDER = {"chat": "openai", "responses": "openai", "messages": "anthropic"}
FAST_RETRY = mc.RetryPolicy(initial_delay=0.2, max_delay=1.0)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    stack = LocalStack(tmp_path_factory.mktemp("client") / "data").start()
    yield stack
    assert stack.stop() == 0, stack.service.log()[-3000:] if stack.service else ""


@pytest.fixture(scope="module")
def stub() -> Iterator[StubProviders]:
    stub = StubProviders().start()
    yield stub
    stub.stop()


@pytest.fixture
def run() -> str:
    """A prefix making this test's subjects its own on the shared stack."""
    return uuid.uuid4().hex[:8]


def chat_messages(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


class Ledger:
    """The calls a test made, in order, matched with what the stub served for each."""

    def __init__(self, stub: StubProviders) -> None:
        self.stub = stub
        self.mark = len(stub.served)
        self.subjects: list[str] = []
        self.started = datetime.now(UTC)

    def expect(self, subject: str) -> None:
        """The next successful provider call is for ``subject``."""
        self.subjects.append(subject)

    def calls(self) -> list[tuple[str, Served]]:
        served = self.stub.served_since(self.mark)
        assert len(served) == len(self.subjects), (len(served), len(self.subjects))
        return list(zip(self.subjects, served, strict=True))


def stored_events(stack: LocalStack, subject: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{stack.url}/api/v1/events", params={"subject": subject, "limit": "100"}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def wait_stored(stack: LocalStack, expected: Counter[str], timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    got: dict[str, int] = {}
    while time.monotonic() < deadline:
        got = {s: len(stored_events(stack, s)) for s in expected}
        if got == dict(expected):
            return
        time.sleep(0.3)
    raise AssertionError(f"stored {got}, expected {dict(expected)}")


def assert_stored_exactly(
    stack: LocalStack, meter: mc.MeterstreamClient, ledger: Ledger, calls: list[tuple[str, Served]]
) -> None:
    """Every call stored once, verbatim, priced as genai-prices prices it; meters equal to the sums."""
    ended = datetime.now(UTC)
    stats = meter.stats
    assert (stats.pending, stats.dropped, stats.rejected) == (0, 0, 0), stats
    wait_stored(stack, Counter(subject for subject, _ in calls))
    truth: dict[str, list[Sent]] = defaultdict(list)
    for subject in {s for s, _ in calls}:
        expected = sorted(
            (served.model, json.dumps(served.usage, sort_keys=True), served.api) for s, served in calls if s == subject
        )
        events = stored_events(stack, subject)
        got = sorted(
            (e["event"]["data"]["model"], json.dumps(e["event"]["data"]["usage"], sort_keys=True)) for e in events
        )
        # The provider's usage object, verbatim, once per call: nothing lost, nothing doubled.
        assert got == [(model, usage) for model, usage, _ in expected]
        assert len({e["event"]["id"] for e in events}) == len(events)
        for stored in events:
            event, meta = stored["event"], stored["meterstream"]
            api = event["data"].get("api", "messages")
            response = {"model": event["data"]["model"], "usage": event["data"]["usage"]}
            sent = sent_from_provider_usage(event, response, FLAVOUR[api])
            assert event["data"]["provider"] == PROVIDER[api]
            assert event["type"] == "llm.usage" and event["source"] == meter.source
            assert ledger.started <= sent.time <= ended
            assert meta["status"] == "counted", stored
            assert meta["usage"] == dict(sent.counts)
            assert sent.cost is not None and sent.cost > 0
            assert Decimal(meta["costUsd"]) == sent.cost
            truth[subject].append(sent)
    # The meters, read through the client's query helper, per subject and per subject x model.
    for subject, sents in truth.items():
        windows = meter.query_usage(subject, window="DAY", start=ledger.started - timedelta(minutes=1))
        assert totals(windows) == expected_totals(sents)
        by_model = meter.query_usage(subject, window="MONTH", by_model=True)
        assert {w.model for w in by_model} == {s.model for s in sents}
        for model in {s.model for s in sents}:
            assert totals([w for w in by_model if w.model == model]) == expected_totals(
                [s for s in sents if s.model == model]
            )


def totals(windows: list[mc.UsageWindow]) -> dict[str, Decimal]:
    fields = (
        "requests",
        "input_tokens",
        "output_tokens",
        "cache_read_tokens",
        "cache_write_tokens",
        "reasoning_tokens",
        "tokens_total",
        "cost_usd",
        "unpriced_requests",
    )
    return {f: sum((Decimal(getattr(w, f)) for w in windows), Decimal(0)) for f in fields}


def expected_totals(sents: list[Sent]) -> dict[str, Decimal]:
    def count(key: str) -> Decimal:
        return Decimal(sum(s.counts.get(key, 0) for s in sents))

    return {
        "requests": Decimal(len(sents)),
        "input_tokens": count("input_tokens"),
        "output_tokens": count("output_tokens"),
        "cache_read_tokens": count("cache_read_tokens"),
        "cache_write_tokens": count("cache_write_tokens"),
        "reasoning_tokens": count("output_reasoning_tokens"),
        "tokens_total": count("input_tokens") + count("output_tokens"),
        "cost_usd": sum((s.cost or Decimal(0) for s in sents), Decimal(0)),
        "unpriced_requests": Decimal(0),
    }


#: SDK clients opened by a test, closed after it (an unclosed client's sockets surface, as warnings, in
#: whatever test runs when they are collected).
_OPENED: list[Any] = []


@pytest.fixture(autouse=True)
def _close_sdk_clients() -> Iterator[None]:
    yield
    while _OPENED:
        _OPENED.pop().close()


def opened(client: Any) -> Any:
    _OPENED.append(client)
    return client


def openai_client(stub: StubProviders, meter: mc.MeterstreamClient | mc.AsyncMeterstreamClient) -> openai.OpenAI:
    return mc.instrument_openai(opened(openai.OpenAI(base_url=f"{stub.url}/v1", api_key="test", max_retries=0)), meter)


def anthropic_client(
    stub: StubProviders, meter: mc.MeterstreamClient | mc.AsyncMeterstreamClient
) -> anthropic.Anthropic:
    return mc.instrument_anthropic(opened(anthropic.Anthropic(base_url=stub.url, api_key="test", max_retries=0)), meter)


def make_openai_calls(client: openai.OpenAI, ledger: Ledger, subjects: list[str], tag: str) -> None:
    """Every metered OpenAI entry point, streaming and not, subjects per call and from the context."""
    for i, subject in enumerate(subjects):
        model = OPENAI_CHAT[i % len(OPENAI_CHAT)]
        ledger.expect(subject)
        completion = client.chat.completions.create(
            model=model, messages=chat_messages(f"{tag} chat {i}"), meterstream_subject=subject
        )
        assert completion.usage is not None and completion.choices[0].message.content
        with mc.subject(subject):
            # Streamed, usage not asked for: the wrapper asks, and hides the usage chunk.
            ledger.expect(subject)
            chunks = list(
                client.chat.completions.create(model=model, messages=chat_messages(f"{tag} s {i}"), stream=True)
            )
            assert chunks and all(c.usage is None and c.choices for c in chunks)
            # Streamed, usage asked for: the caller gets the usage chunk as usual.
            ledger.expect(subject)
            stream = client.chat.completions.create(
                model=OPENAI_CHAT[(i + 1) % 3],
                messages=chat_messages(f"{tag} u {i}"),
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = list(stream)
            assert chunks[-1].usage is not None and chunks[-1].choices == []
            ledger.expect(subject)
            response = client.responses.create(model=OPENAI_RESPONSES[i % 2], input=f"{tag} r {i}")
            assert response.usage is not None
            ledger.expect(subject)
            events = list(
                client.responses.create(model=OPENAI_RESPONSES[(i + 1) % 2], input=f"{tag} rs {i}", stream=True)
            )
            assert events[-1].type == "response.completed"
            ledger.expect(subject)
            raw = client.chat.completions.with_raw_response.create(
                model=model, messages=chat_messages(f"{tag} raw {i}")
            )
            assert raw.http_response.status_code == 200 and raw.parse().usage is not None
            ledger.expect(subject)
            client.with_options(timeout=30).responses.create(model="gpt-5", input=f"{tag} opt {i}")
        ledger.expect(subject)
        with client.chat.completions.stream(
            model="gpt-4o", messages=chat_messages(f"{tag} helper {i}"), meterstream_subject=subject
        ) as helper:
            final = helper.get_final_completion()
        assert final.usage is None  # not asked for: hidden, as without the wrapper
        ledger.expect(subject)
        with client.responses.stream(model="gpt-5", input=f"{tag} rhelper {i}", meterstream_subject=subject) as rstream:
            assert rstream.get_final_response().usage is not None
        ledger.expect(subject)
        client.chat.completions.parse(
            model="gpt-4o-mini", messages=chat_messages(f"{tag} parse {i}"), meterstream_subject=subject
        )


def make_anthropic_calls(client: anthropic.Anthropic, ledger: Ledger, subjects: list[str], tag: str) -> None:
    for i, subject in enumerate(subjects):
        model = ANTHROPIC[i % len(ANTHROPIC)]
        ledger.expect(subject)
        message = client.messages.create(
            model=model, max_tokens=2000, messages=chat_messages(f"{tag} m {i}"), meterstream_subject=subject
        )
        assert message.usage.output_tokens > 0
        with mc.subject(subject):
            ledger.expect(subject)
            kinds = [
                e.type
                for e in client.messages.create(
                    model=model, max_tokens=2000, messages=chat_messages(f"{tag} ms {i}"), stream=True
                )
            ]
            assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
            ledger.expect(subject)
            raw = client.messages.with_raw_response.create(
                model=model, max_tokens=2000, messages=chat_messages(f"{tag} raw {i}")
            )
            assert raw.parse().usage.input_tokens > 0
        ledger.expect(subject)
        with client.messages.stream(
            model=ANTHROPIC[(i + 1) % 2],
            max_tokens=2000,
            messages=chat_messages(f"{tag} helper {i}"),
            meterstream_subject=subject,
        ) as stream:
            text = "".join(stream.text_stream)
            assert text and stream.get_final_message().usage.output_tokens > 0


# -- the tests ---------------------------------------------------------------------------------------


def test_openai_and_anthropic_usage_is_stored_exactly(stack: LocalStack, stub: StubProviders, run: str) -> None:
    subjects = [f"{run}-alice", f"{run}-bob", f"{run}-carol"]
    with mc.MeterstreamClient(stack.url, flush_interval=0.05, retry=FAST_RETRY) as meter:
        ledger = Ledger(stub)
        make_openai_calls(openai_client(stub, meter), ledger, subjects, run)
        make_anthropic_calls(anthropic_client(stub, meter), ledger, subjects[:2], run)
        assert meter.flush(timeout=30)
        assert_stored_exactly(stack, meter, ledger, ledger.calls())


def test_async_clients(stack: LocalStack, stub: StubProviders, run: str) -> None:
    subjects = [f"{run}-dave", f"{run}-erin"]
    ledger = Ledger(stub)

    async def calls(meter: mc.AsyncMeterstreamClient) -> None:
        oai = mc.instrument_openai(openai.AsyncOpenAI(base_url=f"{stub.url}/v1", api_key="test", max_retries=0), meter)
        ant = mc.instrument_anthropic(anthropic.AsyncAnthropic(base_url=stub.url, api_key="test", max_retries=0), meter)
        try:
            await exercise(oai, ant, meter)
        finally:  # an unclosed client's sockets would surface as warnings in a later test
            await oai.close()
            await ant.close()

    async def exercise(
        oai: openai.AsyncOpenAI, ant: anthropic.AsyncAnthropic, meter: mc.AsyncMeterstreamClient
    ) -> None:
        for i, subject in enumerate(subjects):
            ledger.expect(subject)
            await oai.chat.completions.create(
                model="gpt-4o-mini", messages=chat_messages(f"{run} a {i}"), meterstream_subject=subject
            )
            with mc.subject(subject):
                ledger.expect(subject)
                stream = await oai.chat.completions.create(
                    model="o3-mini", messages=chat_messages(f"{run} as {i}"), stream=True
                )
                assert isinstance(stream, openai.AsyncStream)
                assert all(c.choices for c in [c async for c in stream])
                ledger.expect(subject)
                events = [
                    e async for e in await oai.responses.create(model="gpt-5", input=f"{run} ar {i}", stream=True)
                ]
                assert events[-1].type == "response.completed"
                ledger.expect(subject)
                async with oai.chat.completions.stream(
                    model="gpt-4o", messages=chat_messages(f"{run} ah {i}")
                ) as helper:
                    await helper.get_final_completion()
                ledger.expect(subject)
                await ant.messages.create(model=ANTHROPIC[0], max_tokens=100, messages=chat_messages(f"{run} am {i}"))
                ledger.expect(subject)
                raw = await ant.messages.create(
                    model=ANTHROPIC[1], max_tokens=100, messages=chat_messages(f"{run} ams {i}"), stream=True
                )
                assert [e.type async for e in raw][-1] == "message_stop"
            ledger.expect(subject)
            async with ant.messages.stream(
                model=ANTHROPIC[0],
                max_tokens=100,
                messages=chat_messages(f"{run} amh {i}"),
                meterstream_subject=subject,
            ) as stream:
                await stream.get_final_message()
        assert await meter.flush(timeout=30)

    async def main() -> mc.DeliveryStats:
        async with mc.AsyncMeterstreamClient(stack.url, flush_interval=0.05, retry=FAST_RETRY) as meter:
            await calls(meter)
        return meter.stats

    stats = asyncio.run(main())
    assert (stats.emitted, stats.delivered) == (len(ledger.subjects), len(ledger.subjects))
    with mc.MeterstreamClient(stack.url) as reader:  # the checks read with the sync helper
        assert_stored_exactly(stack, reader, ledger, ledger.calls())


def test_failed_calls_record_nothing(stack: LocalStack, stub: StubProviders, run: str) -> None:
    with mc.MeterstreamClient(stack.url, flush_interval=0.05) as meter:
        oai, ant = openai_client(stub, meter), anthropic_client(stub, meter)
        subject = f"{run}-failing"
        with pytest.raises(openai.BadRequestError):
            oai.chat.completions.create(model="error-400", messages=chat_messages("x"), meterstream_subject=subject)
        with pytest.raises(anthropic.BadRequestError):
            ant.messages.create(
                model="error-400", max_tokens=10, messages=chat_messages("x"), meterstream_subject=subject
            )
        stream = ant.messages.create(
            model="error-midstream",
            max_tokens=10,
            messages=chat_messages("x"),
            stream=True,
            meterstream_subject=subject,
        )
        with pytest.raises(anthropic.APIStatusError):
            list(stream)
        requests_before = stub.requests
        with pytest.raises(mc.MissingSubjectError):
            oai.chat.completions.create(model="gpt-4o", messages=chat_messages("no subject"))
        with pytest.raises(mc.MissingSubjectError):
            ant.messages.stream(model=ANTHROPIC[0], max_tokens=10, messages=chat_messages("no subject"))
        assert stub.requests == requests_before, "no subject: refused before calling the provider"
        assert meter.flush(timeout=10)
        assert meter.stats.emitted == 0
    assert stored_events(stack, subject) == []


def test_wrapped_clients_behave_exactly_like_the_originals(stub: StubProviders) -> None:
    sent: list[Any] = []

    def accept(request: httpx.Request) -> httpx.Response:
        sent.extend(json.loads(request.content))
        return httpx.Response(204)

    with mc.MeterstreamClient("http://meterstream.test", transport=httpx.MockTransport(accept)) as meter:
        plain_oai = opened(openai.OpenAI(base_url=f"{stub.url}/v1", api_key="test", max_retries=0))
        wrapped_oai = openai_client(stub, meter)
        plain_ant = opened(anthropic.Anthropic(base_url=stub.url, api_key="test", max_retries=0))
        wrapped_ant = anthropic_client(stub, meter)
        assert type(wrapped_oai) is openai.OpenAI and type(wrapped_ant) is anthropic.Anthropic

        def dump(items: Any) -> list[Any]:
            return [item.to_dict() for item in items]

        def same(call: Any) -> None:
            plain, wrapped = (
                call(plain_oai, plain_ant, {}),
                call(wrapped_oai, wrapped_ant, {"meterstream_subject": "x"}),
            )
            assert type(plain) is type(wrapped)
            if isinstance(plain, BaseModel):
                assert plain.to_dict() == wrapped.to_dict()  # type: ignore[attr-defined]
            else:
                assert dump(plain) == dump(wrapped)

        m = chat_messages("same")
        same(lambda o, a, k: o.chat.completions.create(model="gpt-4o", messages=m, **k))
        same(lambda o, a, k: o.chat.completions.create(model="gpt-4o", messages=m, stream=True, **k))
        same(
            lambda o, a, k: o.chat.completions.create(
                model="gpt-4o", messages=m, stream=True, stream_options={"include_usage": True}, **k
            )
        )
        same(lambda o, a, k: o.responses.create(model="gpt-5", input="same", **k))
        same(lambda o, a, k: o.responses.create(model="gpt-5", input="same", stream=True, **k))
        same(lambda o, a, k: a.messages.create(model=ANTHROPIC[0], max_tokens=5, messages=m, **k))
        same(lambda o, a, k: a.messages.create(model=ANTHROPIC[0], max_tokens=5, messages=m, stream=True, **k))

        def helper(o: Any, a: Any, k: dict[str, Any]) -> list[Any]:
            with a.messages.stream(model=ANTHROPIC[1], max_tokens=5, messages=m, **k) as stream:
                events = list(stream)
                return [*events, stream.get_final_message()]

        same(helper)
        assert meter.flush(timeout=10)
        assert meter.stats.delivered == 8


def test_service_briefly_unavailable(stack: LocalStack, stub: StubProviders, run: str) -> None:
    """Meterstream stops while the app keeps calling the LLM: the calls succeed as usual, the usage waits
    in the buffer and is retried, and once Meterstream is back every call counts exactly once."""
    subjects = [f"{run}-frank", f"{run}-grace"]
    with mc.MeterstreamClient(stack.url, flush_interval=0.05, retry=FAST_RETRY, timeout=5) as meter:
        oai, ant = openai_client(stub, meter), anthropic_client(stub, meter)
        ledger = Ledger(stub)
        # Some usage delivered before the outage, so that what follows is resent on top of stored data.
        ledger.expect(subjects[0])
        oai.chat.completions.create(
            model="gpt-4o", messages=chat_messages(f"{run} before"), meterstream_subject=subjects[0]
        )
        assert meter.flush(timeout=30)
        assert stack.stop() == 0
        began = time.monotonic()
        make_openai_calls(oai, ledger, subjects, f"{run} down")
        make_anthropic_calls(ant, ledger, subjects, f"{run} down")
        assert time.monotonic() - began < 20, "calls must not wait for Meterstream"
        assert not meter.flush(timeout=1.5)
        stats = meter.stats
        assert stats.pending == len(ledger.subjects) - 1 and stats.retries > 0 and stats.delivered == 1, stats
        stack.start()
        assert meter.flush(timeout=60)
        assert_stored_exactly(stack, meter, ledger, ledger.calls())


def test_lost_acknowledgements_are_not_counted_twice(stack: LocalStack, stub: StubProviders, run: str) -> None:
    """Meterstream stores a batch but its 204 never reaches the client (twice), then refuses one request:
    the client resends the same events, and Meterstream counts each once."""
    proxy = FlakyProxy(stack.url, lose_acks=2, refuse=1).start()
    try:
        with mc.MeterstreamClient(proxy.url, flush_interval=0.2, retry=FAST_RETRY) as meter:
            oai, ant = openai_client(stub, meter), anthropic_client(stub, meter)
            ledger = Ledger(stub)
            subjects = [f"{run}-heidi", f"{run}-ivan"]
            make_openai_calls(oai, ledger, subjects[:1], f"{run} lost")
            make_anthropic_calls(ant, ledger, subjects, f"{run} lost")
            assert meter.flush(timeout=60)
            assert meter.stats.retries >= 3
            assert max(proxy.posted.values()) >= 2, "some events were sent more than once"
            assert_stored_exactly(stack, meter, ledger, ledger.calls())
    finally:
        proxy.stop()
