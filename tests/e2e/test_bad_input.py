"""A corpus of malformed requests against the running service, interleaved with valid traffic: each gets
its documented 4xx and a problem+json naming the cause, the service stays up, and the valid events are
counted exactly."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest

from tests.helpers.load import Load, assert_exact, wait_until_stored
from tests.helpers.stack import LocalStack
from tests.helpers.truth import sent_from_canonical

pytestmark = pytest.mark.e2e

NOW = datetime.now(UTC)


def ev(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "specversion": "1.0",
        "id": "bad-1",
        "source": "corpus",
        "type": "llm.usage",
        "subject": "mallory",
        "time": (NOW - timedelta(minutes=5)).isoformat(),
        "data": {"provider": "openai", "model": "gpt-4o-mini", "input_tokens": 10, "output_tokens": 1},
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not ...}


def usage(**data: Any) -> dict[str, Any]:
    return ev(data={"provider": "openai", "model": "gpt-4o-mini", **data})


@dataclass
class Bad:
    name: str
    status: int
    #: Text the problem's detail must contain (the cause, named).
    cause: str
    body: bytes = b""
    content_type: str | None = "application/cloudevents+json"
    method: str = "POST"
    path: str = "/api/v1/events"
    params: list[tuple[str, str]] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)


def j(value: Any) -> bytes:
    return orjson.dumps(value)


CORPUS = [
    Bad("not json", 400, "not valid JSON", b'{"specversion": '),
    Bad("trailing garbage", 400, "not valid JSON", j(ev()) + b"xyz"),
    Bad("json array in single mode", 400, "body", j([ev()])),
    Bad("bare string", 400, "body", b'"hello"'),
    Bad("null body", 400, "body", b"null"),
    Bad("empty body", 400, "body", b""),
    Bad("invalid utf-8", 400, "not valid JSON", b'{"id": "\xff\xfe"}'),
    Bad("NaN literal", 400, "not valid JSON", b'{"specversion":"1.0","x":NaN}'),
    Bad("text/plain", 415, "Content-Type", j(ev()), "text/plain"),
    Bad("xml", 415, "Content-Type", b"<event/>", "application/xml"),
    Bad("no content type", 415, "Content-Type", j(ev()), None),
    Bad("latin-1 charset", 415, "charset", j(ev()), "application/json; charset=iso-8859-1"),
    Bad("missing subject", 400, "subject", j(ev(subject=...))),
    Bad("empty subject", 400, "subject", j(ev(subject=""))),
    Bad("missing id", 400, "id", j(ev(id=...))),
    Bad("numeric id", 400, "id", j(ev(id=42))),
    Bad("missing source", 400, "source", j(ev(source=...))),
    Bad("missing type", 400, "type", j(ev(type=...))),
    Bad("wrong specversion", 400, "specversion", j(ev(specversion="0.3"))),
    Bad("missing specversion", 400, "specversion", j(ev(specversion=...))),
    Bad("subject with newline", 400, "control characters", j(ev(subject="a\nb"))),
    Bad("subject too long", 400, "subject", j(ev(subject="x" * 300))),
    Bad("data is a string", 400, "data", j(ev(data="tokens=5"))),
    Bad("data is an array", 400, "data", j(ev(data=[1, 2]))),
    Bad("usage event without data", 400, "data", j(ev(data=None))),
    Bad("negative tokens", 400, "data.input_tokens", j(usage(input_tokens=-5))),
    Bad("fractional tokens", 400, "data.input_tokens", j(usage(input_tokens=1.5))),
    Bad("string tokens", 400, "data.input_tokens", j(usage(input_tokens="10"))),
    Bad("2^63 tokens", 400, "data.input_tokens", j(usage(input_tokens=2**63))),
    Bad("boolean tokens", 400, "data.output_tokens", j(usage(input_tokens=1, output_tokens=True))),
    Bad("misspelt count", 400, "data.input_tokenz", j(usage(input_tokenz=10))),
    Bad("no usage at all", 400, "no usage", j(usage(note="hi"))),
    Bad("unknown usage shape", 400, "data.usage", j(usage(usage={"tokens_in": 5}))),
    Bad("usage not an object", 400, "data.usage", j(usage(usage=[5]))),
    Bad(
        "cache reads above input",
        400,
        "cached_tokens",
        j(usage(usage={"prompt_tokens": 10, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 50}})),
    ),
    Bad(
        "reasoning above output", 400, "reasoning_tokens", j(usage(input_tokens=5, output_tokens=2, reasoning_tokens=3))
    ),
    Bad(
        "unknown provider with raw usage",
        400,
        "data.provider",
        j(ev(data={"provider": "nowhere", "model": "m", "usage": {"a": 1}})),
    ),
    Bad("missing model", 400, "data.model", j(ev(data={"provider": "openai", "input_tokens": 1}))),
    Bad("far-future time", 400, "future", j(ev(time="2999-01-01T00:00:00Z"))),
    Bad("pre-1970 time", 400, "1970", j(ev(time="1969-07-20T20:17:00Z"))),
    Bad("time without offset", 400, "time", j(ev(time="2025-01-01T00:00:00"))),
    Bad("unix time number", 400, "time", j(ev(time=1700000000))),
    Bad("xml datacontenttype", 400, "datacontenttype", j(ev(datacontenttype="application/xml"))),
    Bad(
        "batch with one bad event",
        400,
        "event 1",
        j([ev(id="ok-in-bad-batch"), ev(id="b2", subject="")]),
        "application/cloudevents-batch+json",
    ),
    Bad("batch is an object", 400, "array", j(ev()), "application/cloudevents-batch+json"),
    Bad("empty json array", 400, "no events", b"[]", "application/json"),
    Bad("10 MB body", 413, "bytes", b"[" + b" " * 10_000_000 + b"]", "application/cloudevents-batch+json"),
    # 100,000 events that fit in the body limit: refused by their count, before any is validated.
    Bad(
        "100,000-event batch",
        413,
        "100000 events",
        b"[" + b",".join([b"{}"] * 100_000) + b"]",
        "application/cloudevents-batch+json",
    ),
    Bad(
        "binary mode without subject",
        400,
        "subject",
        j({"input_tokens": 1}),
        "application/json",
        headers={"ce-specversion": "1.0", "ce-id": "b", "ce-source": "s", "ce-type": "llm.usage"},
    ),
    # Queries
    Bad("unknown meter", 404, "meter not found", method="GET", path="/api/v1/meters/cost_eur/query"),
    Bad("unknown meter (get)", 404, "meter not found", method="GET", path="/api/v1/meters/not_a_meter"),
    Bad(
        "from after to",
        400,
        "from must be before to",
        method="GET",
        path="/api/v1/meters/cost_usd/query",
        params=[("from", "2025-02-01T00:00:00Z"), ("to", "2025-01-01T00:00:00Z")],
    ),
    Bad(
        "invalid time zone",
        400,
        "invalid time zone",
        method="GET",
        path="/api/v1/meters/cost_usd/query",
        params=[("windowTimeZone", "Europe/Atlantis")],
    ),
    Bad(
        "invalid window size",
        400,
        "windowSize",
        method="GET",
        path="/api/v1/meters/cost_usd/query",
        params=[("windowSize", "FORTNIGHT")],
    ),
    Bad(
        "sql-like groupBy",
        400,
        "invalid group by",
        method="GET",
        path="/api/v1/meters/cost_usd/query",
        params=[("groupBy", "model) UNION SELECT 1 --")],
    ),
    Bad(
        "non-ascii groupBy",
        400,
        "invalid group by",
        method="GET",
        path="/api/v1/meters/cost_usd/query",
        params=[("groupBy", "módèl")],
    ),
    Bad("bad from", 400, "from", method="GET", path="/api/v1/meters/cost_usd/query", params=[("from", "last tuesday")]),
    Bad("query body not json", 400, "not valid JSON", b"{", "application/json", path="/api/v1/meters/cost_usd/query"),
    Bad("query body not an object", 400, "object", b"[1]", "application/json", path="/api/v1/meters/cost_usd/query"),
    Bad("events limit 0", 400, "limit", method="GET", path="/api/v1/events", params=[("limit", "0")]),
    Bad("events limit 101", 400, "limit", method="GET", path="/api/v1/events", params=[("limit", "101")]),
    Bad("reconcile without range", 400, "from", method="GET", path="/api/v1/admin/reconcile"),
    Bad("no such endpoint", 404, "no such endpoint", method="GET", path="/api/v2/things"),
    Bad("wrong method", 405, "not allowed", method="PATCH", path="/api/v1/meters/cost_usd"),
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    stack = LocalStack(tmp_path_factory.mktemp("bad") / "data").start()
    yield stack
    stack.stop()


def test_the_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 40


def test_malformed_requests_with_valid_traffic_interleaved(stack: LocalStack) -> None:
    load = Load(stack.url, batch=20, seed=99, source="valid")
    with httpx.Client(base_url=stack.url, timeout=60) as client:
        for bad in CORPUS:
            load.send_one_batch(client)
            headers = dict(bad.headers)
            if bad.content_type:
                headers["Content-Type"] = bad.content_type
            response = client.request(
                bad.method, bad.path, content=bad.body or None, params=bad.params, headers=headers
            )
            assert response.status_code == bad.status, (bad.name, response.status_code, response.text[:300])
            assert response.headers["content-type"] == "application/problem+json", bad.name
            problem = response.json()
            assert {"type", "title", "status", "detail", "instance"} <= set(problem), bad.name
            assert problem["status"] == bad.status
            assert bad.cause.lower() in json.dumps(problem).lower(), (bad.name, problem)
            assert client.get("/healthz").status_code == 200
        # Valid, if unusual, values are data, not code: they are stored and queried back as sent.
        odd = [
            ev(id=f"odd-{i}", subject=s)
            for i, s in enumerate(
                ["Robert'); DROP TABLE usage_events;--", "用户-🙂", "a b\tc".replace("\t", " "), "%s{{x}}"]
            )
        ]
        assert (
            client.post(
                "/api/v1/events", content=orjson.dumps(odd), headers={"Content-Type": "application/json"}
            ).status_code
            == 204
        )
    assert not load.errors
    load.sent.extend(sent_from_canonical(e) for e in odd)
    wait_until_stored(stack.url, len(load.sent))
    rows = httpx.get(
        f"{stack.url}/api/v1/meters/requests/query", params=[("subject", e["subject"]) for e in odd]
    ).json()["data"]
    assert sorted(r["subject"] for r in rows) == sorted(e["subject"] for e in odd)
    # Nothing from a rejected request is stored, not even its valid events.
    assert (
        httpx.get(f"{stack.url}/api/v1/events", params={"id": "ok-in-bad-batch", "from": "2000-01-01T00:00:00Z"}).json()
        == []
    )
    assert_exact(stack.url, load.sent)
