"""The client's reservations, without a network: a fake Meterstream reservations API (an httpx transport)
and the real OpenAI and Anthropic SDK clients answered by a fake provider (an httpx2 transport serving the
stub provider's responses).

Covered: typed answers (Decimal amounts, aware times), idempotent retries (same bytes, counted once), the
429 denial, problem details, the reserve's request (prompt keywords only, inline media stripped), and the
wrappers' enforce mode: refused before the provider, commit instead of emit, release on an SDK error,
commit when a stream ends or is closed early, sync and async.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import anthropic
import httpx
import httpx2
import meterstream_client as mc
import openai
import pytest
from meterstream_client._reservations import MEDIA_MIN_CHARS, new_reservation_id, prompt_request

from tests.helpers.stub_providers import StubProviders

FAST = mc.RetryPolicy(initial_delay=0.001, max_delay=0.01)
HAIKU = "claude-haiku-4-5-20251001"

#: A scripted answer: an HTTP status, an exception to raise, "lost" (handled, then answered 503), or None
#: (answered as usual).
Step = int | Exception | str | None


# -- a fake Meterstream reservations API --------------------------------------------------------------------


def provider_tokens(data: dict[str, Any]) -> int:
    """Tokens in a commit's usage (canonical counts, or an OpenAI / Anthropic usage object)."""
    usage = data.get("usage")
    if usage is None:
        return int(data.get("input_tokens", 0)) + int(data.get("output_tokens", 0))
    if "prompt_tokens" in usage:
        return int(usage["prompt_tokens"]) + int(usage["completion_tokens"])
    cache = int(usage.get("cache_creation_input_tokens") or 0) + int(usage.get("cache_read_input_tokens") or 0)
    return int(usage["input_tokens"]) + cache + int(usage["output_tokens"])


@dataclass
class FakeReservations:
    """One token budget per subject; holds, commits and releases as the spec describes them."""

    limit: int = 1_000_000
    script: list[Step] = field(default_factory=list)
    #: Every request: (method, path, body bytes, headers).
    requests: list[tuple[str, str, bytes, httpx.Headers]] = field(default_factory=list)
    reservations: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Reservation id -> the commit's usage data (the first one: a repeat counts once).
    commits: dict[str, dict[str, Any]] = field(default_factory=dict)
    used: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def calls(self, action: str) -> list[tuple[str, str, bytes, httpx.Headers]]:
        return [r for r in self.requests if r[1].endswith(action)]

    def handle(self, request: httpx.Request) -> httpx.Response:
        with self.lock:
            self.requests.append((request.method, request.url.path, request.content, request.headers))
            step = self.script.pop(0) if self.script else None
            if isinstance(step, Exception):
                raise step
            if isinstance(step, int):
                return problem(step, f"scripted {step}", headers={"Retry-After": "0"})
            response = self._answer(request)
            if step == "lost":
                return problem(503, "answer lost")
            return response

    def _answer(self, request: httpx.Request) -> httpx.Response:
        parts = request.url.path.strip("/").split("/")
        body = json.loads(request.content) if request.content else {}
        if parts[:3] == ["api", "v1", "estimate"]:
            est = self.estimate(body["request"])
            return httpx.Response(200, json={**est, "covers": "text", "notes": ["images at their maximum"]})
        if parts[:3] == ["api", "v1", "subjects"] and parts[4] == "reservations":
            return self.reserve(parts[3], body)
        if parts[:3] == ["api", "v1", "reservations"]:
            held = self.reservations.get(parts[3])
            if held is None:
                return problem(404, f"no reservation {parts[3]}")
            if len(parts) == 4:
                return httpx.Response(200, json=held)
            if parts[4] == "commit":
                return self.commit(held, body)
            return self.release(held)
        return problem(404, "no route")

    def estimate(self, request: dict[str, Any]) -> dict[str, Any]:
        bound = request.get("max_tokens") or request.get("max_completion_tokens") or request.get("max_output_tokens")
        if bound is None:
            raise AssertionError("the tests always bound the output")
        prompt = json.dumps({k: v for k, v in request.items() if not k.startswith("max_")})
        return {"inputTokens": math.ceil(len(prompt) / 4), "outputTokens": bound, "costUsd": "0.0125"}

    def balance(self, subject: str) -> int:
        held = sum(
            Decimal(r["features"][0]["amount"])
            for r in self.reservations.values()
            if r["subject"] == subject and r["status"] == "held"
        )
        return self.limit - self.used.get(subject, 0) - int(held)

    def reserve(self, subject: str, body: dict[str, Any]) -> httpx.Response:
        rid = body["id"]
        if rid in self.reservations:
            return httpx.Response(200, json=self.reservations[rid])
        if "amounts" in body:
            est, amount = None, int(Decimal(body["amounts"]["tokens"]))
        else:
            if "request" in body:
                est = self.estimate(body["request"])
            else:
                est = {
                    "inputTokens": body["estimate"]["input_tokens"],
                    "outputTokens": body["estimate"]["output_tokens"],
                }
                est["costUsd"] = None
            amount = est["inputTokens"] + est["outputTokens"]
        balance = self.balance(subject)
        feature = {"featureKey": "tokens", "entitlementId": "01JENT", "amount": str(amount), "isSoftLimit": False}
        if amount > balance:
            fit = max(0, balance - (est["inputTokens"] if est else amount))
            return problem(
                429,
                f"{subject} has {balance} tokens left; the call needs up to {amount}",
                headers={"Retry-After": "12.5"},
                allowed=False,
                features=[{**feature, "balance": str(balance), "overLimit": False, "fits": False}],
                fit={"maxOutputTokens": fit},
            )
        now = datetime.now(UTC)
        held = {
            "id": rid,
            "subject": subject,
            "status": "held",
            "allowed": True,
            "provider": body.get("provider"),
            "model": body.get("model"),
            "createdAt": now.isoformat().replace("+00:00", "Z"),
            "expiresAt": (now + timedelta(seconds=body.get("ttlSeconds", 60))).isoformat().replace("+00:00", "Z"),
            "estimate": est,
            "features": [{**feature, "balance": str(balance - amount), "overLimit": False}],
        }
        self.reservations[rid] = held
        return httpx.Response(201, json=held)

    def commit(self, held: dict[str, Any], body: dict[str, Any]) -> httpx.Response:
        if held["status"] == "released":
            return problem(409, "reservation released")
        data = body["usage"]
        if held["model"] is not None and data.get("model", held["model"]) != held["model"]:
            # As Meterstream: the usage is recorded under the reserved model (the dated snapshot a response
            # names is refused).
            return problem(400, f"usage.model is {data['model']!r} but the reservation was for {held['model']!r}")
        if held["id"] not in self.commits:
            self.commits[held["id"]] = data
            actual = provider_tokens(data)
            self.used[held["subject"]] = self.used.get(held["subject"], 0) + actual
            held["status"] = "committed"
            held["committedAt"] = datetime.now(UTC).isoformat()
            held["features"] = [{**f, "actual": str(actual)} for f in held["features"]]
        return httpx.Response(200, json=held)

    def release(self, held: dict[str, Any]) -> httpx.Response:
        if held["status"] == "committed":
            return problem(409, "reservation committed")
        held["status"] = "released"
        held.setdefault("releasedAt", datetime.now(UTC).isoformat())
        return httpx.Response(200, json=held)


def problem(status: int, detail: str, headers: dict[str, str] | None = None, **extra: Any) -> httpx.Response:
    body = {"type": "about:blank", "title": "Problem", "status": status, "detail": detail, **extra}
    return httpx.Response(
        status, content=json.dumps(body), headers={"Content-Type": "application/problem+json", **(headers or {})}
    )


def sync_meter(fake: FakeReservations, **kwargs: Any) -> mc.MeterstreamClient:
    return mc.MeterstreamClient(
        "http://meterstream.test", api_key="ms_test_key", transport=fake.transport, retry=FAST, **kwargs
    )


def async_meter(fake: FakeReservations, **kwargs: Any) -> mc.AsyncMeterstreamClient:
    return mc.AsyncMeterstreamClient(
        "http://meterstream.test", api_key="ms_test_key", transport=fake.transport, retry=FAST, **kwargs
    )


@pytest.fixture
def fake() -> FakeReservations:
    return FakeReservations()


@pytest.fixture
def meter(fake: FakeReservations) -> Iterator[mc.MeterstreamClient]:
    with sync_meter(fake) as meter:
        yield meter


# -- the API: typed answers, retries, errors ---------------------------------------------------------------


def test_reserve_commit_release_answers_are_typed(meter: mc.MeterstreamClient, fake: FakeReservations) -> None:
    held = meter.reserve(
        "alice", provider="openai", model="gpt-4o", estimate={"input_tokens": 1200, "output_tokens": 500}
    )
    assert isinstance(held, mc.Reservation) and held.status == "held" and held.allowed
    assert held.subject == "alice" and (held.provider, held.model) == ("openai", "gpt-4o")
    assert held.created_at.tzinfo is not None and held.expires_at - held.created_at == timedelta(seconds=60)
    (feature,) = held.features
    assert feature == mc.ReservedFeature("tokens", "01JENT", Decimal(1700), Decimal(1_000_000 - 1700), False)
    assert held.estimate == mc.Estimate(1200, 500, None)
    assert len(held.id) == 26, "a ULID made by the client"

    committed = meter.commit(held.id, {"input_tokens": 812, "output_tokens": 230}, provider="openai", model="gpt-4o")
    assert committed.status == "committed" and committed.features[0].actual == Decimal(1042)
    assert committed.committed_at is not None and committed.committed_at.tzinfo is not None
    assert fake.commits[held.id] == {"input_tokens": 812, "output_tokens": 230, "provider": "openai", "model": "gpt-4o"}
    assert meter.get_reservation(held.id).status == "committed"

    other = meter.reserve("alice", amounts={"tokens": Decimal("100")}, ttl_seconds=5, reservation_id="job-7:a.b")
    assert other.id == "job-7:a.b" and other.estimate is None
    assert json.loads(fake.requests[-1][2]) == {"id": "job-7:a.b", "amounts": {"tokens": "100"}, "ttlSeconds": 5}
    assert meter.release(other.id).status == "released"
    # The key is sent as on every other request.
    assert {r[3]["authorization"] for r in fake.requests} == {"Bearer ms_test_key"}
    assert meter.estimate("openai", "gpt-4o", {"messages": [], "max_tokens": 9}) == mc.Estimate(
        4, 9, Decimal("0.0125"), "text", ("images at their maximum",)
    )


def test_a_reserve_is_retried_with_the_same_id_and_bytes(meter: mc.MeterstreamClient, fake: FakeReservations) -> None:
    fake.script = [httpx.ConnectError("refused"), 503, "lost", 502]
    held = meter.reserve("bob", provider="openai", model="gpt-4o", request={"messages": [], "max_tokens": 10})
    bodies = [r[2] for r in fake.calls("/reservations")]
    assert len(bodies) == 5 and len(set(bodies)) == 1, "every attempt sends the same request"
    assert json.loads(bodies[0])["id"] == held.id
    assert list(fake.reservations) == [held.id], "the lost answer's hold is the one returned: one hold"
    assert fake.balance("bob") == fake.limit - held.features[0].amount == fake.limit - 14


def test_commit_and_release_are_retried_and_count_once(meter: mc.MeterstreamClient, fake: FakeReservations) -> None:
    held = meter.reserve("carol", provider="openai", model="gpt-4o", estimate={"input_tokens": 5, "output_tokens": 5})
    fake.script = ["lost", httpx.ReadTimeout("slow"), 500]
    usage = {"usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}, "api": "chat"}
    assert meter.commit(held.id, usage).status == "committed"
    assert len(fake.calls("/commit")) == 4 and len({r[2] for r in fake.calls("/commit")}) == 1
    assert fake.used["carol"] == 10, "stored by the first attempt, counted once"

    second = meter.reserve("carol", provider="openai", model="gpt-4o", estimate={"input_tokens": 1, "output_tokens": 1})
    fake.script = [httpx.RemoteProtocolError("reset"), 504]
    assert meter.release(second.id).status == "released"
    assert len(fake.calls("/release")) == 3


def test_retries_stop_after_api_attempts(fake: FakeReservations) -> None:
    with sync_meter(fake, api_attempts=3) as meter:
        fake.script = [503, 503, 503, 503]
        with pytest.raises(mc.MeterstreamAPIError) as failed:
            meter.reserve("dave", provider="openai", model="gpt-4o", estimate={"input_tokens": 1, "output_tokens": 1})
        assert failed.value.status == 503 and "scripted 503" in str(failed.value)
        assert len(fake.requests) == 3
        fake.script = [httpx.ConnectError("down")] * 3
        with pytest.raises(httpx.ConnectError):
            meter.release("whatever")
        assert len(fake.requests) == 6


def test_a_denial_raises_limit_exceeded_with_balances(meter: mc.MeterstreamClient, fake: FakeReservations) -> None:
    fake.limit = 1000
    with pytest.raises(mc.LimitExceededError) as denied:
        meter.reserve("erin", provider="openai", model="gpt-4o", estimate={"input_tokens": 700, "output_tokens": 500})
    error = denied.value
    assert len(fake.requests) == 1, "a denial is an answer, not a failure: not retried"
    assert isinstance(error, mc.MeterstreamAPIError) and isinstance(error, httpx.HTTPStatusError)
    assert (error.status, error.subject, error.allowed) == (429, "erin", False)
    assert error.reservation_id == json.loads(fake.requests[0][2])["id"]
    assert error.retry_after == 12.5 and error.fit == 300
    (feature,) = error.features
    assert (feature.feature_key, feature.amount, feature.balance, feature.fits) == (
        "tokens",
        Decimal(1200),
        Decimal(1000),
        False,
    )
    assert "erin has 1000 tokens left" in str(error)
    fake.limit = 600
    with pytest.raises(mc.LimitExceededError) as nothing_fits:
        meter.reserve("erin", provider="openai", model="gpt-4o", estimate={"input_tokens": 700, "output_tokens": 5})
    assert nothing_fits.value.fit is None


def test_other_problems_raise_with_their_detail(meter: mc.MeterstreamClient, fake: FakeReservations) -> None:
    with pytest.raises(mc.MeterstreamAPIError, match=r"404.*no reservation nope") as missing:
        meter.get_reservation("nope")
    assert missing.value.status == 404 and not isinstance(missing.value, mc.LimitExceededError)
    held = meter.reserve("frank", amounts={"tokens": 3})
    meter.release(held.id)
    with pytest.raises(mc.MeterstreamAPIError, match="released") as conflict:
        meter.commit(held.id, {"input_tokens": 1})
    assert conflict.value.status == 409 and len(fake.calls("/commit")) == 1, "a 409 is not retried"

    def bad_request(request: httpx.Request) -> httpx.Response:
        return problem(
            400,
            "request.max_tokens: required",
            invalidParameters=[{"field": "request.max_tokens", "reason": "required"}],
        )

    with (
        mc.MeterstreamClient("http://x.test", transport=httpx.MockTransport(bad_request)) as other,
        pytest.raises(mc.MeterstreamAPIError) as invalid,
    ):
        other.estimate("openai", "gpt-4o", {"messages": []})
    assert invalid.value.invalid_parameters == (("request.max_tokens", "required"),)
    assert invalid.value.detail == "request.max_tokens: required"


def test_arguments_are_checked_before_sending(meter: mc.MeterstreamClient, fake: FakeReservations) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        meter.reserve("a", provider="openai", model="m", estimate={"input_tokens": 1}, amounts={"t": 1})
    with pytest.raises(ValueError, match="provider and model"):
        meter.reserve("a", request={"messages": []})
    with pytest.raises(ValueError, match="reservation_id"):
        meter.reserve("a", amounts={"t": 1}, reservation_id="has space")
    with pytest.raises(ValueError, match="ttl_seconds"):
        meter.reserve("a", amounts={"t": 1}, ttl_seconds=3601)
    with pytest.raises(ValueError, match="canonical counts"):
        meter.commit("r1", {"prompt_tokens": 3})
    assert fake.requests == []
    ids = [new_reservation_id() for _ in range(50)]
    assert len(set(ids)) == 50 and all(len(i) == 26 and i.isalnum() for i in ids)


def test_the_async_client(fake: FakeReservations) -> None:
    async def main() -> None:
        async with async_meter(fake) as meter:
            fake.script = [httpx.ConnectError("refused"), 503]
            held = await meter.reserve("gina", provider="anthropic", model=HAIKU, request={"max_tokens": 5})
            assert len({r[2] for r in fake.requests}) == 1 and len(fake.requests) == 3
            fake.script = ["lost"]
            done = await meter.commit(held.id, {"usage": {"input_tokens": 3, "output_tokens": 2}})
            assert done.status == "committed" and fake.used["gina"] == 5
            assert (await meter.get_reservation(held.id)).features[0].actual == Decimal(5)
            fake.limit = 0
            with pytest.raises(mc.LimitExceededError):
                await meter.reserve("gina", amounts={"tokens": 1})
            assert (await meter.estimate("openai", "gpt-4o", {"max_tokens": 1})).output_tokens == 1

    asyncio.run(main())


# -- the reserve's request: prompt keywords only, inline media stripped -------------------------------------


def test_prompt_request_keeps_the_prompt_and_strips_inline_media() -> None:
    png = base64.b64encode(bytes(range(256)) * 4096).decode()  # ~1.4 MB of base64
    long_text = "word " * 2000  # long, but text: kept (the input tokens are counted from it)
    kwargs = {
        "model": "gpt-4o",
        "temperature": 0.2,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 300,
        "top_p": openai.NOT_GIVEN,
        "tool_choice": openai.NOT_GIVEN,
        "messages": [
            {"role": "system", "content": long_text},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this?"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}", "detail": "high"}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
                    {"type": "input_audio", "input_audio": {"data": png, "format": "wav"}},
                    {"type": "file", "file": {"file_data": f"data:application/pdf;base64,{png}", "filename": "a.pdf"}},
                ],
            },
        ],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    }
    request = prompt_request(kwargs)
    assert set(request) == {"messages", "max_tokens", "tools"}
    encoded = json.dumps(request)
    assert len(encoded) < len(long_text) + 2000, "the media is not shipped"
    system, user = request["messages"]
    assert system["content"] == long_text
    text, image, url, audio, file = user["content"]
    assert text == {"type": "text", "text": "what is this?"}
    assert image["image_url"]["url"].startswith("data:image/png;base64,<meterstream: ")
    assert image["image_url"]["detail"] == "high" and url == kwargs["messages"][1]["content"][2]  # type: ignore[index]
    assert audio == {
        "type": "input_audio",
        "input_audio": {"data": f"<meterstream: {len(png)} base64 characters omitted>", "format": "wav"},
    }
    assert file["file"]["file_data"].startswith("data:application/pdf;base64,<meterstream")

    anthropic_style = prompt_request(
        {
            "system": [{"type": "text", "text": "be brief"}],
            "max_tokens": 10,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}},
                        {
                            "type": "document",
                            "source": {"type": "base64", "media_type": "application/pdf", "data": png},
                        },
                        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0K"}},
                    ],
                }
            ],
        }
    )
    big, doc, small = anthropic_style["messages"][0]["content"]
    assert big["source"] == {
        "type": "base64",
        "media_type": "image/png",
        "data": f"<meterstream: {len(png)} base64 characters omitted>",
    }
    assert doc["source"]["data"].startswith("<meterstream")
    assert small["source"]["data"] == "iVBORw0K", f"below {MEDIA_MIN_CHARS} characters: sent as it is"
    responses_style = prompt_request(
        {
            "input": [
                {"role": "user", "content": [{"type": "input_image", "image_url": f"data:image/jpeg;base64,{png}"}]}
            ],
            "instructions": "x",
            "max_output_tokens": 5,
        }
    )
    assert responses_style["input"][0]["content"][0]["image_url"].startswith("data:image/jpeg;base64,<meterstream")


def test_prompt_request_of_pydantic_arguments() -> None:
    from pydantic import BaseModel

    class Answer(BaseModel):
        value: int

    request = prompt_request({"messages": [], "response_format": Answer, "max_completion_tokens": 3, "n": 2})
    assert request["response_format"]["json_schema"]["name"] == "Answer"
    assert request["response_format"]["json_schema"]["schema"]["properties"]["value"]["type"] == "integer"
    assert request["n"] == 2 and request["max_completion_tokens"] == 3


# -- enforce mode: the real SDK clients, answered by a fake provider ----------------------------------------


@dataclass
class FakeProvider:
    """OpenAI and Anthropic answered from the stub's builders, through an httpx2 transport."""

    stub: StubProviders = field(default_factory=StubProviders)
    bodies: list[dict[str, Any]] = field(default_factory=list)

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        body = json.loads(request.content)
        self.bodies.append(body)
        if body.get("model") == "error-400":
            error = {"type": "error", "error": {"type": "invalid_request_error", "message": "bad model"}}
            return httpx2.Response(400, json=error)
        path = request.url.path
        route = {"/v1/chat/completions": self.stub.chat, "/v1/responses": self.stub.responses}.get(
            path, self.stub.messages
        )
        document, stream = route(body)
        if stream is None:
            return httpx2.Response(200, json=document)
        return httpx2.Response(200, content=b"".join(stream), headers={"Content-Type": "text/event-stream"})

    def openai(self, meter: Any) -> openai.OpenAI:
        http = httpx2.Client(transport=httpx2.MockTransport(self.handle))
        client = openai.OpenAI(base_url="http://provider.test/v1", api_key="k", max_retries=0, http_client=http)
        return mc.instrument_openai(client, meter, enforce_limits=True)

    def anthropic(self, meter: Any) -> anthropic.Anthropic:
        http = httpx2.Client(transport=httpx2.MockTransport(self.handle))
        client = anthropic.Anthropic(base_url="http://provider.test", api_key="k", max_retries=0, http_client=http)
        return mc.instrument_anthropic(client, meter, enforce_limits=True)

    def async_openai(self, meter: Any) -> openai.AsyncOpenAI:
        http = httpx2.AsyncClient(transport=httpx2.MockTransport(self.handle))
        client = openai.AsyncOpenAI(base_url="http://provider.test/v1", api_key="k", max_retries=0, http_client=http)
        return mc.instrument_openai(client, meter, enforce_limits=True)

    def async_anthropic(self, meter: Any) -> anthropic.AsyncAnthropic:
        http = httpx2.AsyncClient(transport=httpx2.MockTransport(self.handle))
        client = anthropic.AsyncAnthropic(base_url="http://provider.test", api_key="k", max_retries=0, http_client=http)
        return mc.instrument_anthropic(client, meter, enforce_limits=True)


def msgs(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


@pytest.fixture
def provider() -> FakeProvider:
    return FakeProvider()


def served_usage(provider: FakeProvider, index: int = -1) -> dict[str, Any]:
    return provider.stub.served[index].usage


def test_enforced_calls_commit_the_response_usage_instead_of_emitting(
    meter: mc.MeterstreamClient, fake: FakeReservations, provider: FakeProvider
) -> None:
    oai, ant = provider.openai(meter), provider.anthropic(meter)
    completion = oai.chat.completions.create(
        model="gpt-4o", messages=msgs("hi"), max_tokens=50, meterstream_subject="h"
    )
    assert type(completion) is openai.types.chat.ChatCompletion
    ((_, _, body, _),) = fake.calls("/reservations")
    sent = json.loads(body)
    assert sent["provider"] == "openai" and sent["model"] == "gpt-4o"
    assert sent["request"] == {"messages": msgs("hi"), "max_tokens": 50}, "the prompt keywords only"
    (data,) = fake.commits.values()
    assert data["usage"] == completion.usage.model_dump(exclude_unset=True) == served_usage(provider)  # type: ignore[union-attr]
    assert (data["provider"], data["api"], data["service_tier"]) == ("openai", "chat", "default")
    assert "model" not in data, "recorded under the reserved model (gpt-4o), not the response's snapshot"
    message = ant.messages.create(model=HAIKU, max_tokens=20, messages=msgs("hi"), meterstream_subject="h")
    assert fake.commits[fake.calls("/commit")[-1][1].split("/")[-2]]["usage"] == served_usage(provider)
    assert message.usage.output_tokens > 0
    oai.responses.create(model="gpt-5", input="x", max_output_tokens=10, meterstream_subject="h")
    assert list(fake.commits.values())[-1]["usage"] == served_usage(provider)
    assert meter.flush(timeout=1) and meter.stats.emitted == 0, "the commit replaces the event"
    assert all(r["status"] == "committed" for r in fake.reservations.values())


def test_a_call_that_would_exceed_is_refused_before_the_provider(
    meter: mc.MeterstreamClient, fake: FakeReservations, provider: FakeProvider
) -> None:
    fake.limit = 100
    oai, ant = provider.openai(meter), provider.anthropic(meter)
    with pytest.raises(mc.LimitExceededError) as denied:
        oai.chat.completions.create(model="gpt-4o", messages=msgs("hi"), max_tokens=500, meterstream_subject="i")
    assert denied.value.fit is not None and 0 < denied.value.fit < 100
    with pytest.raises(mc.LimitExceededError):
        oai.chat.completions.create(
            model="gpt-4o", messages=msgs("hi"), max_tokens=500, stream=True, meterstream_subject="i"
        )
    with (
        pytest.raises(mc.LimitExceededError),
        ant.messages.stream(model=HAIKU, max_tokens=500, messages=msgs("hi"), meterstream_subject="i") as stream,
    ):
        stream.get_final_message()
    with (
        pytest.raises(mc.LimitExceededError),
        oai.chat.completions.stream(
            model="gpt-4o", max_tokens=500, messages=msgs("hi"), meterstream_subject="i"
        ) as helper,
    ):
        helper.get_final_completion()
    assert provider.bodies == [], "nothing reached the provider"
    assert fake.reservations == {}


def test_an_sdk_error_releases_the_hold(
    meter: mc.MeterstreamClient, fake: FakeReservations, provider: FakeProvider
) -> None:
    oai, ant = provider.openai(meter), provider.anthropic(meter)
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model="error-400", messages=msgs("x"), max_tokens=5, meterstream_subject="j")
    with pytest.raises(anthropic.BadRequestError):
        ant.messages.create(model="error-400", messages=msgs("x"), max_tokens=5, meterstream_subject="j")
    stream = ant.messages.create(
        model="error-midstream", messages=msgs("x"), max_tokens=5, stream=True, meterstream_subject="j"
    )
    with pytest.raises(anthropic.APIStatusError):
        list(stream)
    assert [r["status"] for r in fake.reservations.values()] == ["released"] * 3
    assert fake.commits == {} and fake.balance("j") == fake.limit


def test_streams_commit_their_usage_at_the_end(
    meter: mc.MeterstreamClient, fake: FakeReservations, provider: FakeProvider
) -> None:
    oai, ant = provider.openai(meter), provider.anthropic(meter)
    chunks = list(
        oai.chat.completions.create(
            model="gpt-4o", messages=msgs("a"), max_tokens=9, stream=True, meterstream_subject="k"
        )
    )
    assert chunks and all(c.usage is None and c.choices for c in chunks), "the stream is the caller's, as before"
    assert list(fake.commits.values())[-1]["usage"] == served_usage(provider)
    events = list(
        oai.responses.create(model="gpt-5", input="b", max_output_tokens=9, stream=True, meterstream_subject="k")
    )
    assert events[-1].type == "response.completed"
    assert list(fake.commits.values())[-1]["usage"] == served_usage(provider)
    with ant.messages.stream(model=HAIKU, max_tokens=9, messages=msgs("c"), meterstream_subject="k") as stream:
        final = stream.get_final_message()
    assert (
        list(fake.commits.values())[-1]["usage"] == final.usage.model_dump(exclude_unset=True) == served_usage(provider)
    )
    with oai.chat.completions.stream(
        model="gpt-4o", max_tokens=9, messages=msgs("d"), meterstream_subject="k"
    ) as helper:
        helper.get_final_completion()
    assert list(fake.commits.values())[-1]["usage"] == served_usage(provider)
    assert len(fake.commits) == 4 and all(r["status"] == "committed" for r in fake.reservations.values())


def test_a_stream_closed_early_commits_what_is_known(
    meter: mc.MeterstreamClient, fake: FakeReservations, provider: FakeProvider
) -> None:
    oai, ant = provider.openai(meter), provider.anthropic(meter)
    # OpenAI: the usage comes last; the estimate's input and one token per output chunk received.
    stream = oai.chat.completions.create(
        model="gpt-4o", messages=msgs("e"), max_tokens=9, stream=True, meterstream_subject="l"
    )
    received = [next(stream), next(stream), next(stream)]  # the role chunk, then two words
    stream.close()
    (held,) = fake.reservations.values()
    assert held["status"] == "committed"
    assert fake.commits[held["id"]] == {
        "provider": "openai",
        "input_tokens": held["estimate"]["inputTokens"],
        "output_tokens": sum(1 for c in received if c.choices[0].delta.content),
    }
    # Anthropic: message_start gave the input side; what was received is committed.
    with ant.messages.create(
        model=HAIKU, messages=msgs("f"), max_tokens=9, stream=True, meterstream_subject="l"
    ) as events:
        start = next(iter(events))
    rid = fake.calls("/commit")[-1][1].split("/")[-2]
    assert fake.commits[rid]["usage"] == start.message.usage.model_dump(exclude_unset=True)
    # The helpers: leaving the block early commits too.
    with ant.messages.stream(model=HAIKU, max_tokens=9, messages=msgs("g"), meterstream_subject="l") as helper:
        next(iter(helper))
    assert len(fake.commits) == 3
    # Closed before anything was read: nothing received, released.
    unread = oai.chat.completions.create(
        model="gpt-4o", messages=msgs("h"), max_tokens=9, stream=True, meterstream_subject="l"
    )
    unread.close()
    assert list(fake.reservations.values())[-1]["status"] == "released"
    assert len(fake.commits) == 3 and all(r["status"] != "held" for r in fake.reservations.values())


def test_a_dropped_stream_is_settled_when_collected(
    meter: mc.MeterstreamClient, fake: FakeReservations, provider: FakeProvider
) -> None:
    ant = provider.anthropic(meter)

    def read_one() -> None:
        stream = ant.messages.create(
            model=HAIKU, messages=msgs("m"), max_tokens=9, stream=True, meterstream_subject="m"
        )
        next(iter(stream))

    read_one()
    (held,) = fake.reservations.values()
    assert held["status"] == "committed", "the generator is closed when the stream is dropped"


def test_enforce_mode_async(fake: FakeReservations, provider: FakeProvider) -> None:
    async def main() -> None:
        async with async_meter(fake) as meter:
            oai, ant = provider.async_openai(meter), provider.async_anthropic(meter)
            await oai.chat.completions.create(model="gpt-4o", messages=msgs("a"), max_tokens=9, meterstream_subject="n")
            assert list(fake.commits.values())[-1]["usage"] == served_usage(provider)
            stream = await oai.chat.completions.create(
                model="gpt-4o", messages=msgs("b"), max_tokens=9, stream=True, meterstream_subject="n"
            )
            assert type(stream) is openai.AsyncStream
            assert [c async for c in stream][-1].choices
            assert list(fake.commits.values())[-1]["usage"] == served_usage(provider)
            events = await ant.messages.create(
                model=HAIKU, messages=msgs("c"), max_tokens=9, stream=True, meterstream_subject="n"
            )
            start = await events.__anext__()
            await events.close()  # early
            assert list(fake.commits.values())[-1]["usage"] == start.message.usage.model_dump(exclude_unset=True)
            async with ant.messages.stream(
                model=HAIKU, max_tokens=9, messages=msgs("d"), meterstream_subject="n"
            ) as helper:
                await helper.get_final_message()
            assert list(fake.commits.values())[-1]["usage"] == served_usage(provider)
            async with oai.chat.completions.stream(
                model="gpt-4o", max_tokens=9, messages=msgs("e"), meterstream_subject="n"
            ) as h:
                await h.get_final_completion()
            assert len(fake.commits) == 5
            with pytest.raises(openai.BadRequestError):
                await oai.chat.completions.create(
                    model="error-400", messages=msgs("x"), max_tokens=5, meterstream_subject="n"
                )
            assert list(fake.reservations.values())[-1]["status"] == "released"
            before = len(provider.bodies)
            fake.limit = 0
            with pytest.raises(mc.LimitExceededError):
                await oai.responses.create(model="gpt-5", input="x", max_output_tokens=5, meterstream_subject="n")
            with pytest.raises(mc.LimitExceededError):
                async with ant.messages.stream(
                    model=HAIKU, max_tokens=9, messages=msgs("f"), meterstream_subject="n"
                ) as s:
                    await s.get_final_message()
            assert len(provider.bodies) == before, "refused before the provider"
            assert meter.stats.emitted == 0
            await oai.close()
            await ant.close()

    asyncio.run(main())


def test_a_sync_meter_works_with_an_async_sdk(fake: FakeReservations, provider: FakeProvider) -> None:
    async def main(meter: mc.MeterstreamClient) -> None:
        oai = provider.async_openai(meter)
        await oai.chat.completions.create(model="gpt-4o", messages=msgs("a"), max_tokens=9, meterstream_subject="o")
        await oai.close()

    with sync_meter(fake) as meter:
        asyncio.run(main(meter))
    assert list(fake.commits.values())[-1]["usage"] == served_usage(provider)


def test_an_async_meter_with_a_sync_sdk_is_refused_before_the_provider(
    fake: FakeReservations, provider: FakeProvider
) -> None:
    meter = async_meter(fake)
    oai = provider.openai(meter)
    with pytest.raises(TypeError, match="needs a MeterstreamClient"):
        oai.chat.completions.create(model="gpt-4o", messages=msgs("a"), max_tokens=9, meterstream_subject="p")
    assert provider.bodies == [] and fake.requests == []


def test_a_failing_commit_never_reaches_the_caller(
    meter: mc.MeterstreamClient, fake: FakeReservations, provider: FakeProvider, caplog: pytest.LogCaptureFixture
) -> None:
    oai = provider.openai(meter)
    fake.script = [None, *[503] * 5]  # the reserve passes, every commit attempt fails
    completion = oai.chat.completions.create(model="gpt-4o", messages=msgs("q"), max_tokens=9, meterstream_subject="q")
    assert completion.choices[0].message.content
    assert "commit of reservation" in caplog.text and "expires by itself" in caplog.text


def test_enforce_off_is_unchanged(fake: FakeReservations, provider: FakeProvider) -> None:
    sent: list[Any] = []

    def accept(request: httpx.Request) -> httpx.Response:
        sent.extend(json.loads(request.content))
        return httpx.Response(204)

    with mc.MeterstreamClient("http://m.test", transport=httpx.MockTransport(accept)) as meter:
        http = httpx2.Client(transport=httpx2.MockTransport(provider.handle))
        oai = mc.instrument_openai(
            openai.OpenAI(base_url="http://provider.test/v1", api_key="k", max_retries=0, http_client=http), meter
        )
        oai.chat.completions.create(model="gpt-4o", messages=msgs("r"), meterstream_subject="r")
        assert meter.flush(timeout=5)
    assert len(sent) == 1 and sent[0]["data"]["usage"] == served_usage(provider)
