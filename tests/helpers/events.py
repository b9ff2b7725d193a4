"""Realistic LLM usage events for tests: canonical payloads and providers' own usage objects."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson

from tests.helpers.truth import Sent, sent_from_canonical, sent_from_provider_usage

MODELS = [("openai", "gpt-4o-mini"), ("openai", "gpt-4o"), ("anthropic", "claude-sonnet-4-20250514")]


def iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass
class Generated:
    event: dict[str, Any]
    sent: Sent


def generate(
    n: int,
    *,
    start: datetime,
    span: timedelta,
    subjects: int,
    seed: int = 7,
    source: str = "e2e-app",
    models: list[tuple[str, str]] | None = None,
) -> Iterator[Generated]:
    """``n`` events at random times in ``[start, start + span)``, in random order, a third of them carrying
    the provider's raw usage object instead of canonical counts."""
    rng = random.Random(seed)
    models = models or MODELS
    for i in range(n):
        provider, model = rng.choice(models)
        time = start + timedelta(microseconds=rng.randrange(int(span.total_seconds() * 1_000_000)))
        subject = f"user-{rng.randrange(subjects):03d}"
        base = {
            "specversion": "1.0",
            "id": f"{seed}-{i}",
            "source": source,
            "type": "llm.usage",
            "subject": subject,
            "time": iso(time),
        }
        prompt = rng.randint(10, 20_000)
        cached = rng.choice([0, 0, rng.randint(0, prompt)])
        completion = rng.randint(1, 4_000)
        reasoning = rng.choice([0, rng.randint(0, completion)])
        form = rng.random()
        if provider == "openai" and form < 0.33:
            usage = {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": reasoning, "audio_tokens": 0},
            }
            event = {**base, "data": {"provider": provider, "model": model, "usage": usage}}
            yield Generated(event, sent_from_provider_usage(event, {"model": model, "usage": usage}, "chat"))
        elif provider == "anthropic" and form < 0.33:
            write = rng.choice([0, rng.randint(0, 5_000)])
            usage = {
                "input_tokens": prompt,
                "output_tokens": completion,
                "cache_creation_input_tokens": write,
                "cache_read_input_tokens": cached,
                "service_tier": "standard",
            }
            event = {**base, "data": {"provider": provider, "model": model, "usage": usage}}
            yield Generated(event, sent_from_provider_usage(event, {"model": model, "usage": usage}))
        else:
            data = {
                "provider": provider,
                "model": model,
                "input_tokens": prompt,
                "output_tokens": completion,
                "cache_read_tokens": cached,
                "reasoning_tokens": reasoning,
            }
            event = {**base, "data": data}
            yield Generated(event, sent_from_canonical(event))


def post_batch(url: str, events: list[dict[str, Any]], size: int = 500) -> None:
    """POST ``events`` to ``url``'s ingest in batches of ``size``; every request must answer 204."""
    for i in range(0, len(events), size):
        r = httpx.post(
            f"{url}/api/v1/events",
            content=orjson.dumps(events[i : i + size]),
            headers={"Content-Type": "application/cloudevents-batch+json"},
            timeout=30,
        )
        assert r.status_code == 204, r.text
