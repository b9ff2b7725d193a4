"""The production topology on this machine, for measuring: the bundled broker (Tansu) and separate
``meterstream ingest``, ``processor`` (one or more) and ``sink`` processes, configured through their
environment as in docker-compose.yml (the test suite's :class:`MultiProcessStack`), with only the parts a
scenario needs started, and the pid of each for CPU and memory sampling."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import httpx
import orjson

from bench.common import OWN_ROOTS
from meterstream.topics import ensure_topics
from schemas.settings import KafkaSettings, TopicSettings
from tests.helpers.stack import MultiProcessStack, Service, wait_ready


@dataclass
class BenchStack(MultiProcessStack):
    """A :class:`MultiProcessStack` whose parts start separately."""

    def start_broker(self) -> BenchStack:
        from meterstream.broker import LocalBroker, free_port

        self.base.mkdir(parents=True, exist_ok=True)
        self.broker = LocalBroker.start(log_path=self.base / "tansu.log")
        self.ingest_port, self.sink_port = free_port(), free_port()
        ensure_topics(self.kafka, TopicSettings(partitions=self.partitions))
        return self

    def start_control(self) -> BenchStack:
        """An embedded PostgreSQL for the control plane (the sink, which serves the API, gets its DSN)."""
        from meterstream.pgserver import EmbeddedPostgres

        self.postgres = EmbeddedPostgres.start(self.base / "postgres")
        OWN_ROOTS.add(self.postgres.pid)  # the server daemonises: not a child, yet not another process's load
        return self

    @property
    def kafka(self) -> KafkaSettings:
        return KafkaSettings(bootstrap_servers=self.broker.bootstrap)

    def start_ingest(self, timeout_s: float = 90.0) -> Service:
        self.ingest = Service(["ingest"], self.env("ingest"), self.base / "ingest.log")
        self.ingest.start()
        wait_ready(f"{self.ingest_url}/readyz", timeout_s, self.ingest.process)
        return self.ingest

    def start_sink(self, timeout_s: float = 180.0) -> Service:
        self.sink = Service(["sink"], self.env("sink"), self.base / "sink.log")
        self.sink.start()
        wait_ready(f"{self.query_url}/readyz", timeout_s, self.sink.process)
        return self.sink

    def start_processors(self, count: int, timeout_s: float = 90.0) -> list[Service]:
        started = [self.add_processor() for _ in range(count)]
        for service in started:
            wait_ready(self.processor_ready_url(service), timeout_s, service.process)
        return started

    def pids(self) -> dict[str, int]:
        """Every running process of the stack, by role."""
        pids: dict[str, int] = {}
        if self.broker is not None:
            pids["broker"] = self.broker.pid
        if self.ingest is not None and self.ingest.process is not None:
            pids["ingest"] = self.ingest.process.pid
        for n, service in enumerate(self.processors):
            if service.process is not None:
                pids[f"processor-{n}"] = service.process.pid
        if self.sink is not None and self.sink.process is not None:
            pids["sink"] = self.sink.process.pid
        return pids

    def processor_metric(self, service: Service, name: str) -> float:
        """Sum of a Prometheus counter over its labels, from a processor's /metrics."""
        return metric(self.processor_ready_url(service).replace("/readyz", "/metrics"), name)

    def sink_metric(self, name: str) -> float:
        return metric(f"{self.query_url}/metrics", name)

    def stored_requests(self, client: httpx.Client | None = None) -> int:
        """The requests meter over all time, as the query API answers it (-1 if it does not answer)."""
        try:
            get = client.get if client is not None else httpx.get
            response = get(f"{self.query_url}/api/v1/meters/requests/query", timeout=30)
            if response.status_code != 200:
                return -1
            rows = orjson.loads(response.content)["data"]
            return int(sum(Decimal(str(r["value"])) for r in rows))
        except httpx.HTTPError:
            return -1

    def wait_stored(self, count: int, timeout_s: float, poll_s: float = 0.1) -> float:
        """Poll until the requests meter equals ``count``; returns the time.monotonic() it was seen."""
        deadline = time.monotonic() + timeout_s
        got = -1
        with httpx.Client() as client:
            while time.monotonic() < deadline:
                got = self.stored_requests(client)
                if got >= count:
                    if got > count:
                        raise AssertionError(f"{got} requests stored, more than the {count} sent")
                    return time.monotonic()
                time.sleep(poll_s)
        raise TimeoutError(f"{got} of {count} events stored after {timeout_s:.0f}s; logs:\n{self.logs()}")


def bench_stack(base: Path, partitions: int = 4, **env: str) -> BenchStack:
    return BenchStack(base=base, partitions=partitions, extra_env=dict(env))


def metric(url: str, name: str) -> float:
    """Sum of a Prometheus metric over its labels, from a /metrics endpoint (0 if absent)."""
    text = httpx.get(url, timeout=5).text
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})?\s+([-0-9.e+]+)$", re.MULTILINE)
    return sum(float(m) for m in pattern.findall(text))


def histogram(url: str, name: str) -> dict[str, float]:
    """Mean and bucket-resolution p50 / p95 of a Prometheus histogram (summed over its labels)."""
    text = httpx.get(url, timeout=5).text
    buckets: dict[float, float] = {}
    for bound, value in re.findall(
        rf'^{re.escape(name)}_bucket\{{[^}}]*le="([^"]+)"[^}}]*\}}\s+([-0-9.e+]+)$', text, re.M
    ):
        key = float("inf") if bound == "+Inf" else float(bound)
        buckets[key] = buckets.get(key, 0.0) + float(value)
    count, total = metric(url, f"{name}_count"), metric(url, f"{name}_sum")
    result = {"count": count, "mean": total / count if count else 0.0}
    for q in (50, 95):
        result[f"p{q}_at_most"] = next((b for b, c in sorted(buckets.items()) if c >= q / 100 * count), 0.0)
    return result
