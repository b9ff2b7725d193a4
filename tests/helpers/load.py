"""A client that keeps sending usage events and retries each request until it is answered 204, as a
billing client must; it remembers every event that was accepted, for the ground truth."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import orjson

from tests.helpers.events import MODELS, iso
from tests.helpers.truth import Sent, expected, sent_from_canonical


class Load:
    def __init__(self, url: str, *, batch: int = 200, subjects: int = 30, seed: int = 1, source: str = "load") -> None:
        self.url = url
        self.batch = batch
        self.subjects = subjects
        self.source = source
        self.rng = random.Random(seed)
        self.sent: list[Sent] = []
        self.requests = 0
        self.retries = 0
        self._next = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors: list[str] = []

    def _events(self) -> list[dict[str, Any]]:
        now = datetime.now(UTC)
        events = []
        for _ in range(self.batch):
            provider, model = self.rng.choice(MODELS)
            self._next += 1
            prompt = self.rng.randint(1, 8000)
            events.append(
                {
                    "specversion": "1.0",
                    "id": f"{self.source}-{self._next}",
                    "source": self.source,
                    "type": "llm.usage",
                    "subject": f"u{self.rng.randrange(self.subjects)}",
                    "time": iso(now - timedelta(microseconds=self.rng.randrange(3_600_000_000))),
                    "data": {
                        "provider": provider,
                        "model": model,
                        "input_tokens": prompt,
                        "cache_read_tokens": self.rng.randint(0, prompt),
                        "output_tokens": self.rng.randint(1, 2000),
                    },
                }
            )
        return events

    def send_one_batch(self, client: httpx.Client, events: list[dict[str, Any]] | None = None) -> None:
        """POST one batch until it is accepted (204). A batch may be resent after a failure: it must count once."""
        events = events if events is not None else self._events()
        body = orjson.dumps(events)
        while True:
            try:
                response = client.post(
                    f"{self.url}/api/v1/events",
                    content=body,
                    headers={"Content-Type": "application/cloudevents-batch+json"},
                )
                if response.status_code == 204:
                    break
                if response.status_code < 500:
                    self.errors.append(f"{response.status_code}: {response.text}")
                    return
            except httpx.HTTPError:
                pass
            self.retries += 1
            time.sleep(0.2)
        self.requests += 1
        self.sent.extend(sent_from_canonical(e) for e in events)

    def run(self, batches: int) -> None:
        with httpx.Client(timeout=10) as client:
            for _ in range(batches):
                self.send_one_batch(client)

    def start(self, pause_s: float = 0.0) -> None:
        def loop() -> None:
            with httpx.Client(timeout=10) as client:
                while not self._stop.is_set():
                    self.send_one_batch(client)
                    if pause_s:
                        time.sleep(pause_s)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)
            assert not self._thread.is_alive(), "the load generator is stuck"


def query(url: str, meter: str, params: list[tuple[str, str]] | None = None) -> dict[Any, Decimal]:
    response = httpx.get(f"{url}/api/v1/meters/{meter}/query", params=params or [], timeout=30)
    assert response.status_code == 200, response.text
    rows = json.loads(response.text, parse_float=Decimal, parse_int=Decimal)["data"]
    return {(r["subject"], tuple(sorted(r["groupBy"].items()))): r["value"] for r in rows}


def wait_until_stored(
    url: str, count: int, timeout_s: float = 120.0, progress: Callable[[], str] | None = None
) -> None:
    deadline = time.monotonic() + timeout_s
    got: Decimal | int = 0
    while time.monotonic() < deadline:
        try:
            got = sum(query(url, "requests").values())
        except (httpx.HTTPError, AssertionError):
            got = -1
        if got == count:
            return
        if got > count:
            raise AssertionError(f"{got} requests stored, more than the {count} sent: something was counted twice")
        time.sleep(0.5)
    raise AssertionError(f"{got} of {count} requests stored after {timeout_s}s {progress() if progress else ''}")


def assert_exact(url: str, sent: list[Sent]) -> None:
    """Every meter by subject and model equals the ground truth; reconciliation finds nothing."""
    unique = {e.id: e for e in sent}
    assert len(unique) == len(sent), "the load generator reused an id"
    for meter in ("requests", "tokens_total", "cache_read_tokens", "cost_usd"):
        truth = expected(sent, meter, group_by=["subject", "model"])
        want = {(k[2], k[3]): v for k, v in truth.items()}
        assert query(url, meter, [("groupBy", "subject"), ("groupBy", "model")]) == want, meter
    now = datetime.now(UTC)
    response = httpx.get(
        f"{url}/api/v1/admin/reconcile",
        params={"from": iso(now - timedelta(days=1)), "to": iso(now + timedelta(hours=1))},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert response.json()["differences"] == []
