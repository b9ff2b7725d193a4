"""Fills the events topic directly, with the records ingest would write, from a process of its own.

The records are encoded first (``prepare``), and produced only on ``go``, as fast as the broker takes
them, so a measurement can start with everything already downstream of the HTTP layer.
"""

from __future__ import annotations

import multiprocessing
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from bench.events import events_records


@dataclass(frozen=True)
class PrefillSpec:
    bootstrap: str
    topic: str
    events: int
    partitions: int
    subjects: int = 10_000
    #: Events per simulated ingest request (one record per partition per request).
    per_request: int = 1000
    seed: int = 11
    prefix: str = "pf"


def _produce(spec: PrefillSpec, conn: Connection) -> None:
    from confluent_kafka import Producer

    records = list(
        events_records(
            spec.events,
            partitions=spec.partitions,
            subjects=spec.subjects,
            per_request=spec.per_request,
            seed=spec.seed,
            prefix=spec.prefix,
        )
    )
    size = sum(len(value) for _, value, _ in records)
    conn.send({"ready": True, "records": len(records), "bytes": size})
    conn.recv()
    producer = Producer(
        {
            "bootstrap.servers": spec.bootstrap,
            "acks": "all",
            "enable.idempotence": "true",
            "linger.ms": "20",
            "message.max.bytes": str(4 * 1024 * 1024),
            "queue.buffering.max.kbytes": str(2 * 1024 * 1024),
        }
    )
    failures: list[str] = []

    def on_delivery(error: Any, message: Any) -> None:
        if error is not None:
            failures.append(str(error))

    started = time.monotonic()
    timestamp = int(time.time() * 1000)
    for partition, value, _ in records:
        while True:
            try:
                producer.produce(spec.topic, value, partition=partition, timestamp=timestamp, on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    remaining = producer.flush(120)
    conn.send({"seconds": time.monotonic() - started, "undelivered": remaining, "failures": failures[:5]})


class Prefill:
    """``prepare()`` encodes in a child process; ``go()`` produces and returns once all is acknowledged."""

    def __init__(self, spec: PrefillSpec) -> None:
        self.spec = spec
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_produce, args=(spec, child), daemon=True)
        self.info: dict[str, Any] = {}

    def prepare(self) -> Prefill:
        self._process.start()
        self.info = self._conn.recv()
        return self

    def go(self) -> dict[str, Any]:
        self._conn.send("go")
        result: dict[str, Any] = self._conn.recv()
        self._process.join(30)
        if result["undelivered"] or result["failures"]:
            raise RuntimeError(f"pre-fill failed: {result}")
        return self.info | result

    def run(self) -> dict[str, Any]:
        return self.prepare().go()
