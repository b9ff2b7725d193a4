"""Reservations on the production topology with two API processes sharing one PostgreSQL (each reads its
own copy of the windows, kept by its own sink): parallel reservations never exceed a balance, a call
counting toward two features is held on both or neither, holds expire at their TTL, commits and releases
are idempotent, and once every hold is settled each balance equals grants minus the query API's usage."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.helpers.stack import MultiProcessStack

pytestmark = pytest.mark.e2e

PLAN_ISSUE = 1000
PLAN_HOLD = 7


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MultiProcessStack]:
    base: Path = tmp_path_factory.mktemp("reservations")
    yield from MultiProcessStack(
        base, control=True, replicas=1, extra_env={"METERSTREAM_SINK_DEFAULT_PLAN": "starter"}
    ).running()


def _json(r: httpx.Response) -> Any:
    return orjson.loads(r.content) if r.content else None


def new_subject(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def features(stack: MultiProcessStack) -> None:
    """Features over all tokens, over one model's tokens, and the default plan's (one model only, so it does
    not touch the other tests' calls)."""
    with httpx.Client(base_url=stack.api_urls[0], timeout=30) as c:
        for body in (
            {"key": "tokens", "name": "Tokens", "meterSlug": "tokens_total"},
            {
                "key": "premium",
                "name": "Premium",
                "meterSlug": "tokens_total",
                "meterGroupByFilters": {"model": "gpt-4o"},
            },
            {"key": "spend", "name": "Spend", "meterSlug": "cost_usd"},
            {
                "key": "plan_tokens",
                "name": "Plan tokens",
                "meterSlug": "tokens_total",
                "meterGroupByFilters": {"model": "plan-model"},
            },
        ):
            r = c.post("/api/v1/features", json=body)
            assert r.status_code == 201, r.text
        plan = {
            "name": "Starter",
            "entitlements": [
                {
                    "type": "metered",
                    "featureKey": "plan_tokens",
                    "issueAfterReset": PLAN_ISSUE,
                    "usagePeriod": {"interval": "MONTH"},
                }
            ],
        }
        r = c.put("/api/v1/plans/starter", json=plan)
        assert r.status_code in (200, 201), r.text


def entitle(url: str, subject: str, feature: str, amount: int | str, **extra: Any) -> None:
    body = {
        "type": "metered",
        "featureKey": feature,
        "usagePeriod": {"interval": "MONTH"},
        "issueAfterReset": amount,
        **extra,
    }
    r = httpx.post(f"{url}/api/v1/subjects/{subject}/entitlements", json=body, timeout=30)
    assert r.status_code == 201, r.text


def value(url: str, subject: str, feature: str) -> dict[str, Any]:
    r = httpx.get(f"{url}/api/v1/subjects/{subject}/entitlements/{feature}/value", timeout=30)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = _json(r)
    return body


def queried_tokens(url: str, subject: str) -> Decimal:
    r = httpx.get(f"{url}/api/v1/meters/tokens_total/query", params={"subject": subject}, timeout=30)
    assert r.status_code == 200, r.text
    return sum((Decimal(str(row["value"])) for row in _json(r)["data"]), Decimal(0))


async def _reserve(http: httpx.AsyncClient, url: str, subject: str, body: dict[str, Any]) -> httpx.Response:
    """A reserve as a client sends it: with an id of its own, so that a retry after a lost connection (a
    pooled keep-alive connection the server closed as idle just as it was reused) is the same reservation."""
    body = {"id": uuid.uuid4().hex, **body}
    for attempt in range(3):
        try:
            return await http.post(f"{url}/api/v1/subjects/{subject}/reservations", json=body)
        except httpx.TransportError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


@pytest.mark.usefixtures("features")
async def test_parallel_reservations_never_exceed_the_balance(stack: MultiProcessStack) -> None:
    """20 parallel reservations of 75 against 500, half through each API process: exactly 6, every time."""
    urls = stack.api_urls
    async with httpx.AsyncClient(timeout=60) as http:
        for _ in range(50):
            subject = new_subject("par")
            entitle(urls[0], subject, "tokens", 500)
            answers = await asyncio.gather(
                *(_reserve(http, urls[i % 2], subject, {"amounts": {"tokens": 75}}) for i in range(20))
            )
            codes = [r.status_code for r in answers]
            assert codes.count(201) == 6, codes
            assert codes.count(429) == 14, [r.text for r in answers if r.status_code not in (201, 429)]
            denied = _json(next(r for r in answers if r.status_code == 429))
            assert denied["allowed"] is False
            assert denied["features"][0]["balance"] == 50  # 500 - 6 x 75, what the 14 did not get
            v = value(urls[1], subject, "tokens")
            assert (v["balance"], v["reserved"], v["usage"]) == (50, 450, 0)


@pytest.mark.usefixtures("features")
async def test_a_new_subject_under_the_default_plan_is_never_overdrawn(stack: MultiProcessStack) -> None:
    """200 parallel reservations for a subject nobody has seen: its plan is made once, and holds stop at it."""
    urls = stack.api_urls
    subject = new_subject("fresh")
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=200)) as http:
        answers = await asyncio.gather(
            *(_reserve(http, urls[i % 2], subject, {"amounts": {"plan_tokens": PLAN_HOLD}}) for i in range(200))
        )
    # A fresh connection: the burst's have idled past the server's keep-alive timeout while the last
    # reserves waited their turn, and reusing one races the server closing it.
    async with httpx.AsyncClient(timeout=30) as http:
        ents = (await http.get(f"{urls[0]}/api/v1/subjects/{subject}/entitlements")).json()
    codes = [r.status_code for r in answers]
    assert codes.count(201) == PLAN_ISSUE // PLAN_HOLD, sorted(set(codes))
    assert codes.count(429) == 200 - PLAN_ISSUE // PLAN_HOLD
    assert [e["featureKey"] for e in ents] == ["plan_tokens"]  # made once, not once per request
    v = value(urls[0], subject, "plan_tokens")
    assert v["reserved"] == PLAN_ISSUE // PLAN_HOLD * PLAN_HOLD
    assert v["balance"] == PLAN_ISSUE % PLAN_HOLD


@pytest.mark.usefixtures("features")
async def test_a_call_counting_toward_two_features_is_held_on_both_or_neither(stack: MultiProcessStack) -> None:
    url = stack.api_urls[0]
    subject = new_subject("two")
    entitle(url, subject, "tokens", 1000)
    entitle(url, subject, "premium", 150)
    call = {"provider": "openai", "model": "gpt-4o", "estimate": {"input_tokens": 100, "output_tokens": 100}}
    async with httpx.AsyncClient(timeout=30) as http:
        denied = await _reserve(http, url, subject, call)
        assert denied.status_code == 429, denied.text
        assert denied.headers["content-type"] == "application/problem+json"
        body = _json(denied)
        assert {f["featureKey"]: f["fits"] for f in body["features"]} == {"premium": False, "tokens": True}
        assert body["fit"] == {"maxOutputTokens": 50}  # 150 left - 100 input
        assert int(denied.headers["Retry-After"]) >= 1  # the period's end
        assert value(url, subject, "tokens")["reserved"] == 0  # nothing held on the feature that had room
        shrunk = await _reserve(http, url, subject, {**call, "estimate": {"input_tokens": 100, "output_tokens": 50}})
        assert shrunk.status_code == 201, shrunk.text
        assert {f["featureKey"]: f["balance"] for f in _json(shrunk)["features"]} == {"premium": 0, "tokens": 850}
        other = await _reserve(http, url, subject, {**call, "model": "gpt-4o-mini"})
        assert other.status_code == 201, other.text
        assert [f["featureKey"] for f in _json(other)["features"]] == ["tokens"]  # the filter does not match


@pytest.mark.usefixtures("features")
async def test_a_hold_expires_at_its_ttl_and_its_amount_returns(stack: MultiProcessStack) -> None:
    url, other = stack.api_urls
    subject = new_subject("ttl")
    entitle(url, subject, "tokens", 100)
    async with httpx.AsyncClient(timeout=30) as http:
        held = await _reserve(http, url, subject, {"amounts": {"tokens": 100}, "ttlSeconds": 2})
        started = time.monotonic()
        assert held.status_code == 201, held.text
        expires = _json(held)["expiresAt"]
        assert value(other, subject, "tokens")["reserved"] == 100
        denied = await _reserve(http, other, subject, {"amounts": {"tokens": 1}})
        assert denied.status_code == 429
        assert 1 <= int(denied.headers["Retry-After"]) <= 2  # when the hold expires
        while True:
            r = await _reserve(http, other, subject, {"amounts": {"tokens": 100}, "ttlSeconds": 60})
            if r.status_code == 201:
                break
            assert r.status_code == 429, r.text
            assert time.monotonic() - started < 5, "the hold did not expire"
            await asyncio.sleep(0.05)
        assert 1.0 <= time.monotonic() - started <= 3.0
        got = await http.get(f"{url}/api/v1/reservations/{_json(held)['id']}")
        assert (_json(got)["status"], _json(got)["expiresAt"]) == ("expired", expires)


def _wait_stored(urls: list[str], subject: str, expected: Decimal, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    for url in urls:
        while queried_tokens(url, subject) != expected:
            assert time.monotonic() < deadline, f"{url}: {queried_tokens(url, subject)} != {expected}"
            time.sleep(0.1)


@pytest.mark.usefixtures("features")
async def test_commits_count_once_and_balances_end_exact(stack: MultiProcessStack) -> None:
    urls = stack.api_urls
    subject = new_subject("commit")
    entitle(urls[0], subject, "tokens", 10_000)
    async with httpx.AsyncClient(timeout=30) as http:
        call = {"provider": "openai", "model": "gpt-4o", "estimate": {"input_tokens": 500, "output_tokens": 200}}
        r = await _reserve(http, urls[0], subject, {**call, "id": "call-1"})
        assert r.status_code == 201, r.text
        again = await _reserve(http, urls[1], subject, {**call, "id": "call-1"})
        assert again.status_code == 200  # the same id and request: the same reservation, not a second hold
        assert value(urls[0], subject, "tokens")["reserved"] == 700
        clash = await _reserve(http, urls[0], subject, {**call, "id": "call-1", "ttlSeconds": 5})
        assert clash.status_code == 409

        usage = {"input_tokens": 321, "output_tokens": 123}
        bad = await http.post(f"{urls[0]}/api/v1/reservations/call-1/commit", json={"usage": {"input_tokens": -1}})
        assert bad.status_code == 400, bad.text
        assert value(urls[0], subject, "tokens")["reserved"] == 700  # a bad commit changes nothing
        done = await http.post(f"{urls[0]}/api/v1/reservations/call-1/commit", json={"usage": usage})
        assert done.status_code == 200, done.text
        assert _json(done)["status"] == "committed"
        assert _json(done)["features"][0]["actual"] == 444
        # Between the commit and the moment it is stored, it is neither forgotten nor counted twice, on
        # either process (each reads its own copy of the windows).
        deadline = time.monotonic() + 60
        while True:
            views = [value(u, subject, "tokens") for u in urls]
            for v in views:
                assert (v["usage"], v["balance"], v["reserved"]) == (444, 10_000 - 444, 0), v
            if all(queried_tokens(u, subject) == 444 for u in urls):
                break
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        retried = await http.post(f"{urls[1]}/api/v1/reservations/call-1/commit", json={"usage": usage})
        assert retried.status_code == 200
        other = await http.post(f"{urls[1]}/api/v1/reservations/call-1/commit", json={"usage": {"input_tokens": 1}})
        assert other.status_code == 409
        assert (await http.post(f"{urls[0]}/api/v1/reservations/call-1/release")).status_code == 409

        # The provider's own usage object, as ingest takes it.
        r = await _reserve(http, urls[1], subject, {**call, "id": "call-2"})
        provider_usage = {"usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}
        done = await http.post(f"{urls[1]}/api/v1/reservations/call-2/commit", json={"usage": provider_usage})
        assert done.status_code == 200, done.text
        assert _json(done)["features"][0]["actual"] == 15

        # A commit after expiry still records the usage (it happened).
        r = await _reserve(http, urls[0], subject, {**call, "id": "call-3", "ttlSeconds": 1})
        await asyncio.sleep(1.3)
        assert _json(await http.get(f"{urls[0]}/api/v1/reservations/call-3"))["status"] == "expired"
        late = await http.post(f"{urls[0]}/api/v1/reservations/call-3/commit", json={"usage": {"input_tokens": 40}})
        assert late.status_code == 200, late.text

        # Release frees the hold, twice is the same, and a released call cannot be committed.
        r = await _reserve(http, urls[0], subject, {**call, "id": "call-4"})
        for _ in range(2):
            rel = await http.post(f"{urls[1]}/api/v1/reservations/call-4/release")
            assert (rel.status_code, _json(rel)["status"]) == (200, "released")
        nope = await http.post(f"{urls[0]}/api/v1/reservations/call-4/commit", json={"usage": usage})
        assert nope.status_code == 409
        assert (await http.get(f"{urls[0]}/api/v1/reservations/nope")).status_code == 404

    expected = Decimal(444 + 15 + 40)
    _wait_stored(urls, subject, expected)
    for url in urls:
        v = value(url, subject, "tokens")
        assert (Decimal(str(v["usage"])), Decimal(str(v["balance"])), v["reserved"]) == (
            expected,
            10_000 - expected,
            0,
        )


@pytest.mark.usefixtures("features")
async def test_dollar_limits_hold_the_priced_bound_and_fail_closed_without_a_price(stack: MultiProcessStack) -> None:
    url = stack.api_urls[0]
    subject = new_subject("spend")
    entitle(url, subject, "spend", "0.01")
    async with httpx.AsyncClient(timeout=30) as http:
        # gpt-4o: $2.50 / M input, $10 / M output at most: 1000 in + 500 out <= $0.0075
        call = {"provider": "openai", "model": "gpt-4o", "estimate": {"input_tokens": 1000, "output_tokens": 500}}
        r = await _reserve(http, url, subject, call)
        assert r.status_code == 201, r.text
        assert Decimal(str(_json(r)["features"][0]["amount"])) == Decimal("0.0075")
        denied = await _reserve(http, url, subject, call)
        assert denied.status_code == 429
        # 0.0025 left; 1000 input tokens take 0.0025: no output fits
        assert _json(denied)["fit"] == {"maxOutputTokens": 0}
        unknown = await _reserve(
            http, url, subject, {**call, "model": "no-such-model-anywhere", "estimate": {"input_tokens": 1}}
        )
        assert unknown.status_code == 429
        assert "no known price" in _json(unknown)["detail"]


@pytest.mark.usefixtures("features")
async def test_reserves_see_usage_ingested_directly_as_soon_as_it_is_stored(stack: MultiProcessStack) -> None:
    """A reserve's usage read is cached per process; a write to the subject's windows must end the cache."""
    subject = new_subject("direct")
    entitle(stack.api_urls[0], subject, "tokens", 1000)
    async with httpx.AsyncClient(timeout=30) as http:
        for url in stack.api_urls:  # fill each process's cache
            r = await _reserve(http, url, subject, {"amounts": {"tokens": 10}, "ttlSeconds": 1})
            assert r.status_code == 201, r.text
        event = {
            "specversion": "1.0",
            "id": f"direct-{subject}",
            "source": "test",
            "type": "llm.usage",
            "subject": subject,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "data": {"provider": "openai", "model": "gpt-4o", "input_tokens": 900, "output_tokens": 50},
        }
        r = await http.post(f"{stack.ingest_url}/api/v1/events", json=event)
        assert r.status_code == 204, r.text
        await asyncio.sleep(1.1)  # the first holds expire
        deadline = time.monotonic() + 60
        for url in stack.api_urls:
            while (await http.get(f"{url}/api/v1/meters/tokens_total/query", params={"subject": subject})).json()[
                "data"
            ] == []:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            denied = await _reserve(http, url, subject, {"amounts": {"tokens": 100}})
            assert denied.status_code == 429, denied.text  # 1000 - 950 = 50 left
            assert _json(denied)["features"][0]["balance"] == 50


def _usage_reads(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    reads = {"clickhouse": 0.0, "kept": 0.0}
    for line in text.splitlines():
        if line.startswith("meterstream_reservation_usage_reads_total{"):
            source = line.split('source="', 1)[1].split('"', 1)[0]
            reads[source] = float(line.rsplit(" ", 1)[1])
    return reads


@pytest.mark.usefixtures("features")
async def test_usage_kept_between_reserves_is_brought_forward_exactly(stack: MultiProcessStack) -> None:
    """After a commit (or any usage of the subject) is stored, the next reserve takes the usage it read
    before plus what the sink stored since, not a new query: its balances equal grants minus the query
    API's usage, on a feature over every model and on one filtered to a model."""
    url = stack.api_urls[0]
    subject = new_subject("kept")
    entitle(url, subject, "tokens", 1_000_000)
    entitle(url, subject, "premium", 1_000_000)
    call = {"provider": "openai", "model": "gpt-4o", "estimate": {"input_tokens": 500, "output_tokens": 200}}
    used = {"tokens": 0, "premium": 0}
    before = _usage_reads(url)
    async with httpx.AsyncClient(timeout=30) as http:
        for i in range(6):
            r = await _reserve(http, url, subject, call)
            assert r.status_code == 201, r.text
            balances = {f["featureKey"]: f["balance"] for f in _json(r)["features"]}
            assert balances == {k: 1_000_000 - used[k] - 700 for k in used}, (i, balances)
            usage = {"input_tokens": 100 + i, "output_tokens": 7 * i}
            done = await http.post(f"{url}/api/v1/reservations/{_json(r)['id']}/commit", json={"usage": usage})
            assert done.status_code == 200, done.text
            used = {k: v + 100 + 8 * i for k, v in used.items()}
            # Usage of another model: on the feature over every model, not on the one filtered to gpt-4o.
            event = {
                "specversion": "1.0",
                "id": uuid.uuid4().hex,
                "source": "kept-test",
                "type": "llm.usage",
                "subject": subject,
                "data": {"provider": "openai", "model": "gpt-4o-mini", "input_tokens": 1000 * (i + 1)},
            }
            sent = await http.post(
                f"{stack.ingest_url}/api/v1/events",
                content=orjson.dumps(event),
                headers={"Content-Type": "application/cloudevents+json"},
            )
            assert sent.status_code == 204, sent.text
            used["tokens"] += 1000 * (i + 1)
            _wait_stored([url], subject, Decimal(used["tokens"]))
    after = _usage_reads(url)
    # The first reserve reads ClickHouse for each of the two features; the five later ones take the usage
    # brought forward (a write to another subject of the same version bucket forces a read: allow one).
    assert after["kept"] - before["kept"] >= 2 * 4, (before, after)
    assert after["clickhouse"] - before["clickhouse"] <= 2 * 2, (before, after)
