"""The broker's own latency floor: a bare producer (no HTTP, no validation) sending one record per
request at a fixed rate, acknowledgement latency per record, and the broker's pauses.

Ingest cannot answer faster than the broker acknowledges, so this is the baseline for the single-event
p99. ``python -m bench.broker_floor [--client librdkafka|aiokafka]`` runs it on a fresh bundled broker;
the ingest scenario runs it on the broker ingest just used. Two client libraries are offered so that a
pause can be told apart from a quirk of one client: if both see the same pauses, the broker paused.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import ms, percentile

TOPIC = "meterstream.events"
#: An acknowledgement slower than this counts towards a pause.
SLOW_S = 0.008
#: Slow acknowledgements of records sent within this long of each other belong to the same pause.
PAUSE_GAP_S = 0.05


def _summary(client: str, sent_at: list[float], latencies: list[float], warmup_s: float) -> dict[str, Any]:
    start = sent_at[0] if sent_at else 0.0
    pairs = [(t - start, lat) for t, lat in zip(sent_at, latencies, strict=True) if t - start >= warmup_s]
    values = [lat for _, lat in pairs]
    pauses: list[tuple[float, float]] = []  # (first send, longest acknowledgement) per pause
    for at, lat in pairs:
        if lat < SLOW_S:
            continue
        if pauses and at - pauses[-1][0] < PAUSE_GAP_S:
            pauses[-1] = (pauses[-1][0], max(pauses[-1][1], lat))
        else:
            pauses.append((at, lat))
    measured = (pairs[-1][0] - pairs[0][0]) if len(pairs) > 1 else 0.0
    return {
        "client": client,
        "records": len(values),
        "p50_ms": ms(percentile(values, 50)),
        "p99_ms": ms(percentile(values, 99)),
        "max_ms": ms(max(values, default=None)),
        "pauses": len(pauses),
        "seconds_between_pauses": measured / len(pauses) if pauses else None,
        "longest_pause_ms": ms(max((p[1] for p in pauses), default=None)),
    }


def _librdkafka(
    bootstrap: str, partitions: int, rate: float, seconds: float, size: int
) -> tuple[list[float], list[float]]:
    from confluent_kafka import Producer

    # As ingest's producer, without linger: the floor, not ingest's batching trade-off.
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": "true", "linger.ms": "0"})
    producer.list_topics(TOPIC, timeout=10)
    sent_at: list[float] = []
    latencies: list[float] = []
    value = b"x" * size
    start = time.perf_counter()
    count = int(rate * seconds)
    for i in range(count):
        due = start + i / rate
        while (wait := due - time.perf_counter()) > 0:
            producer.poll(wait)  # serves delivery reports while waiting for the next send
        t0 = time.perf_counter()
        sent_at.append(t0)
        latencies.append(0.0)

        def done(error: Any, _message: Any, index: int = i, t0: float = t0) -> None:
            latencies[index] = time.perf_counter() - t0 if error is None else float("inf")

        producer.produce(TOPIC, value, partition=i % partitions, on_delivery=done)
    producer.flush(30)
    return sent_at, latencies


def _aiokafka(
    bootstrap: str, partitions: int, rate: float, seconds: float, size: int
) -> tuple[list[float], list[float]]:
    from aiokafka import AIOKafkaProducer

    async def run() -> tuple[list[float], list[float]]:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
        await producer.start()
        sent_at: list[float] = []
        latencies: list[float] = []
        value = b"x" * size

        async def one(index: int) -> None:
            t0 = sent_at[index]
            await (await producer.send(TOPIC, value, partition=index % partitions))
            latencies[index] = time.perf_counter() - t0

        tasks = []
        start = time.perf_counter()
        for i in range(int(rate * seconds)):
            if (wait := start + i / rate - time.perf_counter()) > 0:
                await asyncio.sleep(wait)
            sent_at.append(time.perf_counter())
            latencies.append(float("inf"))
            tasks.append(asyncio.ensure_future(one(i)))
        await asyncio.gather(*tasks)
        await producer.stop()
        return sent_at, latencies

    return asyncio.run(run())


def _measure(
    client: str, bootstrap: str, partitions: int, rate: float, seconds: float, warmup_s: float
) -> dict[str, Any]:
    size = 400  # about one single-event record as ingest writes it
    run = _librdkafka if client == "librdkafka" else _aiokafka
    sent_at, latencies = run(bootstrap, partitions, rate, seconds + warmup_s, size)
    return _summary(client, sent_at, latencies, warmup_s) | {"rate": rate, "record_bytes": size}


def measure(bootstrap: str, partitions: int, rate: float = 1000, seconds: float = 15, warmup_s: float = 1,
            client: str = "librdkafka") -> dict[str, Any]:  # fmt: skip
    """Run the bare producer in a process of its own (the caller's threads must not disturb it)."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        result: dict[str, Any] = pool.apply(_measure, (client, bootstrap, partitions, rate, seconds, warmup_s))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.broker_floor", description=__doc__)
    parser.add_argument("--client", choices=("librdkafka", "aiokafka", "both"), default="both")
    parser.add_argument("--rate", type=float, default=1000, help="records per second (one per request)")
    parser.add_argument("--seconds", type=float, default=15)
    args = parser.parse_args()
    from meterstream.broker import LocalBroker
    from meterstream.topics import ensure_topics
    from schemas.settings import KafkaSettings, TopicSettings

    with tempfile.TemporaryDirectory(prefix="broker-floor-") as tmp:
        broker = LocalBroker.start(log_path=Path(tmp) / "tansu.log")
        try:
            ensure_topics(KafkaSettings(bootstrap_servers=broker.bootstrap), TopicSettings(partitions=4))
            clients = ("librdkafka", "aiokafka") if args.client == "both" else (args.client,)
            for client in clients:
                print(measure(broker.bootstrap, 4, args.rate, args.seconds, client=client), flush=True)
        finally:
            broker.stop()


if __name__ == "__main__":
    main()
