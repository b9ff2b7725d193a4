"""LiteLLM's built-in `openmeter` callback, out of the box (issue 18 item 5).

The requests are the ones its ``OpenMeterLogger`` posts, rebuilt field by field from its source
(litellm/integrations/openmeter.py: ``_common_logic`` and ``log_success_event``): a CloudEvent of type
``litellm_tokens`` from source ``litellm-proxy``, ``data = {"model", "cost", **usage}`` with usage
``prompt_tokens``, ``completion_tokens``, ``total_tokens`` (or none at all), ``json.dumps``-ed and posted as
``application/cloudevents+json`` to ``<OPENMETER_API_ENDPOINT>/api/v1/events``. They count in the LLM meters
(provider resolved from the model, priced by Meterstream at the event time) and LiteLLM's own cost in
``litellm_cost_usd``; the ground truth is computed here with genai-prices."""

from __future__ import annotations

import datetime as dt
import json
import random
import time
from collections import defaultdict
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest

from tests.helpers.stack import LocalStack
from tests.helpers.truth import price

pytestmark = pytest.mark.e2e

UTC = dt.UTC
#: (model as LiteLLM reports it, the provider and model Meterstream meters it under)
MODELS = [
    ("gpt-4o-mini", "openai", "gpt-4o-mini"),
    ("claude-3-5-sonnet-20240620", "anthropic", "claude-3-5-sonnet-20240620"),
    ("openai/gpt-4o", "openai", "gpt-4o"),
    ("my-finetune-xyz", "unknown", "my-finetune-xyz"),  # no provider known: counted, unpriced
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    stack = LocalStack(tmp_path_factory.mktemp("litellm") / "data").start()
    yield stack
    stack.stop()


def callback_payload(call_id: str, user: str, model: str, cost: float | None, usage: dict[str, Any]) -> dict[str, Any]:
    """What OpenMeterLogger._common_logic returns (same keys, same order, same value types)."""
    return {
        "specversion": "1.0",
        "type": "litellm_tokens",  # os.getenv("OPENMETER_EVENT_TYPE", "litellm_tokens")
        "id": call_id,
        "time": dt.datetime.now(dt.UTC).isoformat(),  # get_utc_datetime().isoformat()
        "subject": str(user),
        "source": "litellm-proxy",
        "data": {"model": model, "cost": cost, **usage},
    }


def post_like_litellm(endpoint: str, payload: dict[str, Any]) -> httpx.Response:
    url = endpoint + ("api/v1/events" if endpoint.endswith("/") else "/api/v1/events")
    headers = {"Content-Type": "application/cloudevents+json", "Authorization": "Bearer sk-anything"}
    return httpx.post(url, content=json.dumps(payload), headers=headers, timeout=10)


def query(stack: LocalStack, meter: str, group_by: str) -> dict[tuple[str, str], Decimal]:
    r = httpx.get(
        f"{stack.url}/api/v1/meters/{meter}/query",
        params=[("groupBy", "subject"), ("groupBy", group_by)],
        timeout=30,
    )
    assert r.status_code == 200, r.text
    rows = json.loads(r.text, parse_float=Decimal, parse_int=Decimal)["data"]
    return {(row["subject"], row["groupBy"][group_by]): row["value"] for row in rows}


def test_litellm_callback_events_are_metered_and_priced(stack: LocalStack) -> None:
    rng = random.Random(18)
    tokens: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    cost: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    litellm_cost: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    requests = 0
    for i in range(40):
        user = f"user-{i % 3}"
        reported, provider, model = MODELS[i % len(MODELS)]
        if i % 10 == 9:
            usage: dict[str, Any] = {}  # a response without usage (LiteLLM then sends none)
        else:
            prompt, completion = rng.randrange(1, 5000), rng.randrange(1, 800)
            usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        reported_cost = round(rng.uniform(0.00001, 0.02), 8)
        payload = callback_payload(f"chatcmpl-{i}", user, reported, reported_cost, usage)
        r = post_like_litellm(stack.url, payload)
        assert r.status_code == 204, r.text
        if i % 7 == 0:
            assert post_like_litellm(stack.url + "/", payload).status_code == 204  # a retry: counted once
        requests += 1
        counts = {"input_tokens": usage.get("prompt_tokens", 0), "output_tokens": usage.get("completion_tokens", 0)}
        tokens[(user, model)] += counts["input_tokens"] + counts["output_tokens"]
        at = dt.datetime.fromisoformat(payload["time"])
        ours = price(provider, model, at, counts) if provider != "unknown" else None
        cost[(user, model)] += ours or Decimal(0)
        litellm_cost[(user, reported)] += Decimal(str(reported_cost))
    deadline = time.monotonic() + 60
    while sum(query(stack, "requests", "model").values()) != requests:
        assert time.monotonic() < deadline, "not every call stored"
        time.sleep(0.3)
    assert query(stack, "tokens_total", "model") == dict(tokens)
    assert query(stack, "cost_usd", "model") == dict(cost)  # unpriced calls: 0 here, counted in unpriced_requests
    assert sum(cost.values()) > 0
    assert query(stack, "litellm_cost_usd", "model") == dict(litellm_cost)
    providers = {provider for (_, provider) in query(stack, "requests", "provider")}
    assert providers == {"openai", "anthropic", "unknown"}
    unpriced = query(stack, "unpriced_requests", "model")
    assert {model for (_, model), n in unpriced.items() if n} == {"my-finetune-xyz"}


def test_a_malformed_litellm_event_is_a_400_naming_the_field(stack: LocalStack) -> None:
    payload = callback_payload("bad-1", "user-9", "gpt-4o-mini", 0.1, {"prompt_tokens": -3, "completion_tokens": 1})
    r = post_like_litellm(stack.url, payload)
    assert r.status_code == 400
    assert "data.prompt_tokens" in r.json()["detail"]
    meters = {m["slug"]: m for m in httpx.get(f"{stack.url}/api/v1/meters", timeout=10).json()}
    assert meters["litellm_cost_usd"]["eventType"] == "litellm_tokens"
    assert httpx.delete(f"{stack.url}/api/v1/meters/litellm_cost_usd", timeout=10).status_code == 409
