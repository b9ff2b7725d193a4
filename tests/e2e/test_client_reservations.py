"""Reservations end to end: the Python client's reservation API and the wrappers' enforce mode, with the
real OpenAI and Anthropic SDK clients calling the stub provider, against the real stack (``meterstream
up``) holding a token limit set up through OpenMeter's official client (feature, entitlement, grant).

What must hold: calls go through while they fit; the call that would exceed the limit is refused with
LimitExceededError before anything reaches the provider (the stub's request count does not move), with
the balance left equal to the grant minus what the stub's responses used; and the usage Meterstream stored
(each event, and the meters read through the query API) is exactly the usage in the stub's responses,
once per call (the commit replaced the event: nothing doubled).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import anthropic
import httpx
import meterstream_client as mc
import openai
import pytest
from genai_prices import extract_usage
from openmeter import Client

from tests.helpers import limits_truth as lt
from tests.helpers.events import iso
from tests.helpers.openmeter_entitlements import subject_entitlements
from tests.helpers.stack import LocalStack
from tests.helpers.stub_providers import Served, StubProviders
from tests.helpers.truth import price

pytestmark = pytest.mark.e2e

HAIKU = "claude-haiku-4-5-20251001"
OPUS = "claude-opus-4-5-20251101"
FLAVOUR = {"chat": "chat", "responses": "responses", "messages": "default"}
PROVIDER = {"chat": "openai", "responses": "openai", "messages": "anthropic"}
FAST_RETRY = mc.RetryPolicy(initial_delay=0.2, max_delay=1.0)
#: The output bound every call declares (the reservations are sized by it).
MAX_TOKENS = 2000


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    stack = LocalStack(tmp_path_factory.mktemp("reservations") / "data").start()
    yield stack
    assert stack.stop() == 0, stack.service.log()[-3000:] if stack.service else ""


@pytest.fixture(scope="module")
def stub() -> Iterator[StubProviders]:
    stub = StubProviders().start()
    yield stub
    stub.stop()


@pytest.fixture(scope="module")
def om(stack: LocalStack) -> Client:
    return Client(endpoint=stack.url, retry_total=0)


@pytest.fixture(scope="module")
def se(om: Client) -> Any:
    return subject_entitlements(om)


@pytest.fixture
def run() -> str:
    return uuid.uuid4().hex[:8]


def limit_tokens(om: Client, se: Any, subject: str, grant: int) -> str:
    """A hard limit of ``grant`` tokens (tokens_total) this month for ``subject``; returns the feature key."""
    key = f"tokens_{subject.replace('-', '_')}"
    om.features.create({"key": key, "name": f"Tokens of {subject}", "meterSlug": "tokens_total"})
    se.post(subject, {"type": "metered", "featureKey": key, "isSoftLimit": False, "usagePeriod": {"interval": "MONTH"}})
    se.create_grant(
        subject,
        key,
        {
            "amount": grant,
            "priority": 1,
            "effectiveAt": iso(lt.minute(datetime.now(UTC))),
            "expiration": {"duration": "MONTH", "count": 1},
        },
    )
    return key


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@dataclass(frozen=True)
class Counted:
    """One served response, as Meterstream must count it (genai-prices' reading of the stub's usage), under
    the model the call was reserved for (a reservation's usage is recorded under its model, not the dated
    snapshot an OpenAI response names)."""

    served: Served
    model: str
    counts: dict[str, int]

    @property
    def tokens_total(self) -> int:
        return self.counts.get("input_tokens", 0) + self.counts.get("output_tokens", 0)


def counted(served: Served, model: str) -> Counted:
    extracted = extract_usage(
        {"model": model, "usage": served.usage}, provider_id=PROVIDER[served.api], api_flavor=FLAVOUR[served.api]
    )
    return Counted(served, model, {k: int(v) for k, v in extracted.usage.__dict__.items() if v is not None})


def stored_events(stack: LocalStack, subject: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{stack.url}/api/v1/events", params={"subject": subject, "limit": "100"}, timeout=30)
    assert response.status_code == 200, response.text
    return list(response.json())


def assert_stored_exactly(stack: LocalStack, meter: mc.MeterstreamClient, subject: str, calls: list[Counted]) -> None:
    """Every call stored once, its usage verbatim, counted and priced as genai-prices does; the meters
    (read through the client's query helper) equal to the sums."""
    deadline = time.monotonic() + 90
    events = stored_events(stack, subject)
    while len(events) != len(calls) and time.monotonic() < deadline:
        time.sleep(0.3)
        events = stored_events(stack, subject)
    assert len(events) == len(calls), f"stored {len(events)} events for {len(calls)} calls"
    assert len({e["event"]["id"] for e in events}) == len(events)

    def key(model: str, usage: dict[str, Any]) -> tuple[str, str]:
        return model, json.dumps(usage, sort_keys=True)

    want = sorted(key(c.model, c.served.usage) for c in calls)
    got = sorted(key(e["event"]["data"]["model"], e["event"]["data"]["usage"]) for e in events)
    assert got == want, "the provider's usage object, verbatim, once per call"
    by_usage = {key(c.model, c.served.usage): c for c in calls}
    for stored in events:
        event, meta = stored["event"], stored["meterstream"]
        call = by_usage[key(event["data"]["model"], event["data"]["usage"])]
        assert event["type"] == "llm.usage" and event["data"]["provider"] == PROVIDER[call.served.api]
        assert meta["status"] == "counted", stored
        assert meta["usage"] == call.counts
        when = datetime.fromisoformat(event["time"]).astimezone(UTC)
        assert Decimal(meta["costUsd"]) == price(event["data"]["provider"], call.model, when, call.counts)
    total = {
        "requests": len(calls),
        "input_tokens": sum(c.counts.get("input_tokens", 0) for c in calls),
        "output_tokens": sum(c.counts.get("output_tokens", 0) for c in calls),
        "cache_read_tokens": sum(c.counts.get("cache_read_tokens", 0) for c in calls),
        "cache_write_tokens": sum(c.counts.get("cache_write_tokens", 0) for c in calls),
        "reasoning_tokens": sum(c.counts.get("output_reasoning_tokens", 0) for c in calls),
        "tokens_total": sum(c.tokens_total for c in calls),
        "unpriced_requests": 0,
    }
    got_total: dict[str, int] = {}
    while time.monotonic() < deadline:
        windows = meter.query_usage(subject, window=None, start=datetime.now(UTC) - timedelta(hours=1))
        got_total = {name: sum(getattr(w, name) for w in windows) for name in total}
        if got_total == total:
            break
        time.sleep(0.3)
    assert got_total == total


class Caller:
    """Makes enforced calls of every kind, in turn, and keeps what the stub served for each."""

    def __init__(self, stub: StubProviders, meter: mc.MeterstreamClient, subject: str) -> None:
        self.stub = stub
        self.subject = subject
        self.oai = mc.instrument_openai(
            openai.OpenAI(base_url=f"{stub.url}/v1", api_key="test", max_retries=0), meter, enforce_limits=True
        )
        self.ant = mc.instrument_anthropic(
            anthropic.Anthropic(base_url=stub.url, api_key="test", max_retries=0), meter, enforce_limits=True
        )
        self.calls: list[Counted] = []

    def close(self) -> None:
        self.oai.close()
        self.ant.close()

    def call(self, i: int) -> None:
        """Call number ``i`` (the kind cycles); its served usage is kept. Raises LimitExceededError when
        refused, after checking that the provider was not called."""
        before_requests, before_served = self.stub.requests, len(self.stub.served)
        try:
            model = self._call(i)
        except mc.LimitExceededError:
            assert self.stub.requests == before_requests, "a refused call must not reach the provider"
            raise
        assert self.stub.requests == before_requests + 1
        (served,) = self.stub.served_since(before_served)
        self.calls.append(counted(served, model))

    def _call(self, i: int) -> str:
        """Make call number ``i``; returns the model it asked for."""
        text, who = f"reservations call {i}", self.subject
        kind = i % 7
        model = ("gpt-4o-mini", "gpt-4o", HAIKU, OPUS, "gpt-5", HAIKU, "gpt-4o-mini")[kind]
        if kind == 0:
            reply = self.oai.chat.completions.create(
                model=model, messages=chat(text), max_tokens=MAX_TOKENS, meterstream_subject=who
            )
            assert reply.usage is not None
        elif kind == 1:
            stream = self.oai.chat.completions.create(
                model=model,
                messages=chat(text),
                max_completion_tokens=MAX_TOKENS,
                stream=True,
                meterstream_subject=who,
            )
            chunks = list(stream)
            assert chunks and all(c.usage is None and c.choices for c in chunks), "the caller's stream, unchanged"
        elif kind == 2:
            message = self.ant.messages.create(
                model=model, max_tokens=MAX_TOKENS, messages=chat(text), meterstream_subject=who
            )
            assert message.usage.output_tokens > 0
        elif kind == 3:
            events = self.ant.messages.create(
                model=model, max_tokens=MAX_TOKENS, messages=chat(text), stream=True, meterstream_subject=who
            )
            kinds = [e.type for e in events]
            assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
        elif kind == 4:
            response = self.oai.responses.create(
                model=model, input=text, max_output_tokens=MAX_TOKENS, meterstream_subject=who
            )
            assert response.usage is not None
        elif kind == 5:
            with self.ant.messages.stream(
                model=model, max_tokens=MAX_TOKENS, messages=chat(text), meterstream_subject=who
            ) as stream:
                assert "".join(stream.text_stream)
        else:
            with mc.subject(who):
                events = list(
                    self.oai.responses.create(model=model, input=text, max_output_tokens=MAX_TOKENS, stream=True)
                )
            assert events[-1].type == "response.completed"
        return model


def test_enforced_calls_stop_at_the_limit(
    stack: LocalStack, stub: StubProviders, om: Client, se: Any, run: str
) -> None:
    subject = f"{run}-enforced"
    grant = 150_000
    key = limit_tokens(om, se, subject, grant)
    with mc.MeterstreamClient(stack.url, flush_interval=0.05, retry=FAST_RETRY) as meter:
        caller = Caller(stub, meter, subject)
        try:
            denied: mc.LimitExceededError | None = None
            for i in range(60):
                try:
                    caller.call(i)
                except mc.LimitExceededError as exc:
                    denied = exc
                    break
            assert denied is not None, "the limit was never reached"
            assert len(caller.calls) >= 3
            # Refused because it does not fit: what is left is the grant minus exactly what was used.
            used = sum(c.tokens_total for c in caller.calls)
            (feature,) = [f for f in denied.features if f.feature_key == key]
            assert feature.balance == Decimal(max(grant - used, 0)) or feature.balance == Decimal(grant - used)
            assert feature.fits is False and feature.amount > (feature.balance or 0)
            assert denied.subject == subject and denied.status == 429
            # Refused again, streaming or not, and through the helpers: never reaching the provider.
            for i in range(len(caller.calls) + 1, len(caller.calls) + 8):
                with pytest.raises(mc.LimitExceededError):
                    caller.call(i)
        finally:
            caller.close()
        assert meter.flush(timeout=30)
        assert meter.stats.emitted == 0, "in enforce mode the commit replaces the event"
        assert_stored_exactly(stack, meter, subject, caller.calls)


def test_the_reservation_api(stack: LocalStack, om: Client, se: Any, run: str) -> None:
    subject = f"{run}-api"
    key = limit_tokens(om, se, subject, 10_000)
    with mc.MeterstreamClient(stack.url, retry=FAST_RETRY) as meter:
        request = {"messages": chat("How many tokens is this?"), "max_tokens": 3000}
        estimate = meter.estimate("openai", "gpt-4o", request)
        assert estimate.output_tokens == 3000 and 0 < estimate.input_tokens < 100
        assert estimate.cost_usd is not None and estimate.cost_usd > 0 and estimate.notes
        held = meter.reserve(subject, provider="openai", model="gpt-4o", request=request, ttl_seconds=120)
        assert held.status == "held" and held.allowed and held.subject == subject
        assert held.expires_at - held.created_at == timedelta(seconds=120)
        (feature,) = [f for f in held.features if f.feature_key == key]
        assert feature.amount == estimate.input_tokens + estimate.output_tokens
        assert feature.balance == 10_000 - feature.amount
        # Idempotent: the same id and request give the same reservation.
        again = meter.reserve(
            subject, provider="openai", model="gpt-4o", request=request, ttl_seconds=120, reservation_id=held.id
        )
        assert (again.id, again.status, again.created_at, again.expires_at) == (
            held.id,
            held.status,
            held.created_at,
            held.expires_at,
        )
        # The same hold. (The spec promises the same answer; the repeat's features carry no balance.)
        assert [(f.feature_key, f.entitlement_id, f.amount) for f in again.features] == [
            (f.feature_key, f.entitlement_id, f.amount) for f in held.features
        ]
        # A second hold that does not fit next to the first is refused, with what is left now.
        with pytest.raises(mc.LimitExceededError) as denied:
            meter.reserve(
                subject, provider="openai", model="gpt-4o", estimate={"input_tokens": 10, "output_tokens": 9000}
            )
        (left,) = [f for f in denied.value.features if f.feature_key == key]
        assert left.balance == 10_000 - feature.amount and left.fits is False
        assert denied.value.problem["allowed"] is False
        # The first hold expires within its 120 s: room may free up then.
        assert denied.value.retry_after is not None and 0 < denied.value.retry_after <= 120
        assert denied.value.fit == int(10_000 - feature.amount - 10)
        usage = {"input_tokens": 812, "output_tokens": 230}
        committed = meter.commit(held.id, usage)
        assert committed.status == "committed"
        assert [f.actual for f in committed.features if f.feature_key == key] == [Decimal(1042)]
        assert meter.commit(held.id, usage).status == "committed", "a repeated commit is the same commit"
        with pytest.raises(mc.MeterstreamAPIError) as conflict:
            meter.release(held.id)
        assert conflict.value.status == 409
        got = meter.get_reservation(held.id)
        assert got.status == "committed" and got.committed_at is not None and got.released_at is None
        # Release frees the hold; a commit after it is a conflict.
        freed = meter.reserve(subject, amounts={key: "8000"})
        assert meter.release(freed.id).status == "released"
        assert meter.release(freed.id).status == "released", "idempotent"
        with pytest.raises(mc.MeterstreamAPIError) as late:
            meter.commit(freed.id, usage, provider="openai", model="gpt-4o")
        assert late.value.status == 409
        assert meter.get_reservation(freed.id).released_at is not None
        # An expired hold frees its room; its commit still records the usage.
        short = meter.reserve(subject, amounts={key: "8000"}, ttl_seconds=1)
        time.sleep(1.5)
        assert meter.get_reservation(short.id).status == "expired"
        late_usage = {"input_tokens": 5, "output_tokens": 7}
        assert meter.commit(short.id, late_usage, provider="openai", model="gpt-4o").status == "committed"
        assert meter.reserve(subject, amounts={key: "7000"}).allowed, "released and expired holds are free again"
        # A request that cannot be bounded is a 400 naming the field.
        with pytest.raises(mc.MeterstreamAPIError) as unbounded:
            meter.estimate("openai", "no-such-model", {"messages": chat("x")})
        assert unbounded.value.status == 400 and unbounded.value.detail
        assert_stored_exactly_canonical(stack, subject, [(held.id, usage), (short.id, late_usage)])


def assert_stored_exactly_canonical(stack: LocalStack, subject: str, commits: list[tuple[str, dict[str, int]]]) -> None:
    deadline = time.monotonic() + 60
    events = stored_events(stack, subject)
    while len(events) < len(commits) and time.monotonic() < deadline:
        time.sleep(0.3)
        events = stored_events(stack, subject)
    assert sorted(e["event"]["id"] for e in events) == sorted(rid for rid, _ in commits), "event id = reservation id"
    for stored in events:
        usage = dict(commits)[stored["event"]["id"]]
        assert stored["meterstream"]["usage"] == usage


def test_enforced_async_clients(stack: LocalStack, stub: StubProviders, om: Client, se: Any, run: str) -> None:
    subject = f"{run}-async"
    limit_tokens(om, se, subject, 40_000)
    calls: list[Counted] = []

    async def one(make: Any, model: str) -> bool:
        before_requests, before_served = stub.requests, len(stub.served)
        try:
            await make()
        except mc.LimitExceededError:
            assert stub.requests == before_requests
            return False
        (served,) = stub.served_since(before_served)
        calls.append(counted(served, model))
        return True

    async def main() -> None:
        async with mc.AsyncMeterstreamClient(stack.url, flush_interval=0.05, retry=FAST_RETRY) as meter:
            oai = mc.instrument_openai(
                openai.AsyncOpenAI(base_url=f"{stub.url}/v1", api_key="test", max_retries=0), meter, enforce_limits=True
            )
            ant = mc.instrument_anthropic(
                anthropic.AsyncAnthropic(base_url=stub.url, api_key="test", max_retries=0), meter, enforce_limits=True
            )
            try:
                allowed = 0
                for i in range(40):
                    text = f"async reservations {i}"

                    async def chat_stream(text: str = text) -> None:
                        stream = await oai.chat.completions.create(
                            model="o3-mini", messages=chat(text), max_tokens=MAX_TOKENS, stream=True,
                            meterstream_subject=subject,
                        )  # fmt: skip
                        assert [c async for c in stream]

                    async def messages(text: str = text) -> None:
                        await ant.messages.create(
                            model=HAIKU, max_tokens=MAX_TOKENS, messages=chat(text), meterstream_subject=subject
                        )

                    async def helper(text: str = text) -> None:
                        async with ant.messages.stream(
                            model=OPUS, max_tokens=MAX_TOKENS, messages=chat(text), meterstream_subject=subject
                        ) as stream:
                            await stream.get_final_message()

                    if not await one((chat_stream, messages, helper)[i % 3], ("o3-mini", HAIKU, OPUS)[i % 3]):
                        break
                    allowed += 1
                assert 0 < allowed < 40, "calls went through, then the limit refused one"
            finally:
                await oai.close()
                await ant.close()
            assert await meter.flush(timeout=30)
            assert meter.stats.emitted == 0

    asyncio.run(main())
    with mc.MeterstreamClient(stack.url) as reader:
        assert_stored_exactly(stack, reader, subject, calls)
