"""``meterstream ingest`` with several worker processes: ``/metrics`` counts every worker's requests (each
worker answers /metrics with the sum), not one worker's at random."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from meterstream.broker import free_port
from tests.helpers.events import iso
from tests.helpers.stack import Service, wait_ready

pytestmark = pytest.mark.integration


def _accepted(url: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("meterstream_ingest_events_accepted_total "):
            return float(line.split()[1])
    raise AssertionError("no meterstream_ingest_events_accepted_total")


def test_metrics_sum_every_worker(broker: object, tmp_path: Path) -> None:
    from datetime import UTC, datetime

    port = free_port()
    env = {
        "METERSTREAM_INGEST_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap,  # type: ignore[attr-defined]
        "METERSTREAM_INGEST_PORT": str(port),
        "METERSTREAM_INGEST_WORKERS": "2",
        "METERSTREAM_INGEST_AUTH__ENABLED": "false",
    }
    service = Service(["ingest"], env, tmp_path / "ingest.log")
    service.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{url}/readyz", 60, service.process)
        sent = 0
        for i in range(60):
            # A new connection each time: the kernel spreads them over both workers.
            event = {
                "specversion": "1.0",
                "id": f"w-{time.monotonic_ns()}-{i}",
                "source": "workers",
                "type": "llm.usage",
                "subject": "s",
                "time": iso(datetime.now(UTC)),
                "data": {"provider": "openai", "model": "gpt-4o-mini", "input_tokens": 1},
            }
            r = httpx.post(
                f"{url}/api/v1/events",
                json=event,
                headers={"content-type": "application/cloudevents+json", "connection": "close"},
            )
            assert r.status_code == 204, r.text
            sent += 1
        # Whichever worker answers, the total.
        assert {_accepted(url) for _ in range(10)} == {float(sent)}
    finally:
        service.stop()
        print(service.log()[-2000:])
