"""The Faust worker: events topic in, windows topic (and dead letters) out.

Delivery guarantee (at-least-once into the windows topic, made exactly-once by the sink): an input offset
is acknowledged to Faust, and so committed, only after the broker acknowledged the output for it and for
every earlier offset of its partition. ``take_events`` acks a batch when the loop asks for the next one,
or when the stream is closed, even by an exception; so the loop body never lets an exception out: a
record that cannot be processed (a poison record: decoding and processing are pure, so retrying cannot
help) becomes a "failed" output and dead letters at once, and only producing is retried, until the
outputs are acknowledged; if it is cancelled mid-batch (shutdown while the broker is unreachable) it exits
the process hard, so nothing of the batch is acknowledged and the restart redelivers it. Output records
carry their source coordinates, so redelivered duplicates are harmless.

Faust tables are not used: their changelog recovery cannot be trusted on every Kafka-protocol broker
(see docs/architecture.md), and per-event table writes would cap throughput far below what batching gives.
The window state lives in ClickHouse, where the sink adds each record's deltas exactly once.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import shutil
import ssl
import tempfile
from pathlib import Path
from typing import Any, Final

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka
from prometheus_client import Counter, Histogram

from processors.pricing import Pricer
from processors.windows import WindowPolicy, failed_output, process_record
from schemas.recent import RecentKeys
from schemas.records import EventsRecord, decode_events, encode
from schemas.settings import CONSUMER_FETCH_MAX_WAIT_MS, ProcessorSettings

log = logging.getLogger(__name__)

RECORDS = Counter("meterstream_processor_records_total", "Events-topic records processed")
PROCESSED = Counter("meterstream_processor_events_total", "Events processed", ["status"])
DUPLICATES = Counter("meterstream_processor_duplicates_total", "Events dropped as already counted (recent keys)")
DEAD_LETTERED = Counter("meterstream_processor_dead_lettered_total", "Events sent to the dead-letter topic")
UNPRICED = Counter("meterstream_processor_unpriced_total", "Counted events without a price", ["provider", "model"])
BAD_RECORDS = Counter(
    "meterstream_processor_bad_records_total", "Records that could not be processed (poison: dead-lettered)"
)
BATCH_SECONDS = Histogram("meterstream_processor_batch_seconds", "Processing time of one batch, outputs acknowledged")
RETRIES = Counter("meterstream_processor_batch_retries_total", "Batches retried after a produce failure")

#: Exit status when a batch is interrupted and the process must die without acknowledging it.
EXIT_UNACKED: Final = 70
_MAX_UNPRICED_LABELS: Final = 500


class Processor:
    """Builds the Faust app and its agent; ``start()`` and ``stop()`` run it."""

    def __init__(self, settings: ProcessorSettings, pricer: Pricer, topic_id: str) -> None:
        self._settings = settings
        self._pricer = pricer
        self._topic_id = topic_id
        self._policy = WindowPolicy(settings.allowed_lateness_s * 1_000_000)
        # Keys of events whose output was acknowledged; only ever used to drop duplicates early.
        self._recent: RecentKeys[tuple[str, str], None] = RecentKeys(settings.recent_keys)
        self.assigned: set[int] = set()
        self._unpriced_labels: set[tuple[str, str]] = set()
        # Faust insists on a data directory even with in-memory tables; it stays empty and goes at stop().
        # Named after this process, so one left by a killed processor is recognised and removed (here).
        remove_stale_datadirs()
        self._datadir = tempfile.mkdtemp(prefix=f"{DATADIR_PREFIX}{os.getpid()}-")
        self.app = self._build_app()

    async def start(self) -> None:
        await self.app.start()

    async def stop(self) -> None:
        try:
            await self.app.stop()
        finally:
            shutil.rmtree(self._datadir, ignore_errors=True)

    def _build_app(self) -> faust.App:
        settings = self._settings
        kafka = settings.kafka
        app = faust.App(
            settings.group_id,
            broker=[f"kafka://{server.strip()}" for server in kafka.bootstrap_servers.split(",")],
            broker_credentials=_credentials(settings),
            broker_session_timeout=settings.session_timeout_s,
            broker_heartbeat_interval=min(3.0, settings.session_timeout_s / 4),
            broker_commit_interval=1.0,
            topic_partitions=settings.topics.partitions,
            topic_allow_declare=False,
            store="memory://",
            web_enabled=False,
            consumer_auto_offset_reset="earliest",
            consumer_max_fetch_size=16 * 1024 * 1024,
            producer_acks=-1,
            producer_max_request_size=8 * 1024 * 1024,
            producer_linger_ms=5,
            datadir=self._datadir,
        )
        # Before the first topic: the transport is created on first use.
        app.transport = _Transport(app.conf.broker_consumer, app)
        events = app.topic(settings.topics.events, value_type=bytes, value_serializer="raw")
        windows_topic = settings.topics.windows
        dead_letter_topic = settings.topics.dead_letter

        async def process(stream: Any) -> None:
            async for batch in stream.take_events(settings.batch_records, within=settings.batch_within_ms / 1000):
                try:
                    await self._process_batch(app, batch, windows_topic, dead_letter_topic)
                except asyncio.CancelledError:
                    # Leaving now would let take_events acknowledge a batch whose outputs may be missing.
                    log.critical("processor: stopped in the middle of a batch; exiting without acknowledging it")
                    os._exit(EXIT_UNACKED)

        app.agent(events, name="meterstream-windows")(process)

        @app.on_partitions_assigned.connect  # type: ignore[arg-type]
        async def on_assigned(sender: Any, assigned: Any, **_: Any) -> None:
            self.assigned = {tp.partition for tp in assigned if tp.topic == settings.topics.events}
            log.info("processor: assigned events partitions %s", sorted(self.assigned))

        return app

    async def _process_batch(self, app: faust.App, batch: list[Any], windows: str, dead_letter: str) -> None:
        delay = 0.1
        while True:
            try:
                with BATCH_SECONDS.time():
                    await self._try_batch(app, batch, windows, dead_letter)
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                RETRIES.inc()
                log.exception("processor: batch failed, retrying in %.1fs", delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _try_batch(self, app: faust.App, batch: list[Any], windows: str, dead_letter: str) -> None:
        futures = []
        stored_keys: list[tuple[str, str]] = []
        counts = {"records": 0, "duplicates": 0, "dead": 0}
        statuses: collections.Counter[str] = collections.Counter()
        unpriced: collections.Counter[tuple[str, str]] = collections.Counter()
        for event in batch:
            message = event.message
            try:
                record: EventsRecord = decode_events(event.value)
                output = process_record(
                    record,
                    topic_id=self._topic_id,
                    partition=message.partition,
                    offset=message.offset,
                    policy=self._policy,
                    pricer=self._pricer,
                    known=self._recent,
                )
                # Encoding is pure too: a record whose output cannot be written is a poison record, never
                # one retried for ever while the partition behind it waits.
                encoded = encode(output.windows), [encode(letter) for letter in output.dead_letters]
            except Exception as exc:
                # A poison record: decoding and processing are pure, so it would fail the same way on every
                # retry. Its events go to the dead-letter topic and the audit log ("failed"), and its output
                # keeps the sink's offset chain unbroken. Only producing (below) is retried.
                BAD_RECORDS.inc()
                log.error("processor: record at %s:%s cannot be processed: %s", message.partition, message.offset, exc)
                output = failed_output(
                    event.value,
                    topic_id=self._topic_id,
                    partition=message.partition,
                    offset=message.offset,
                    reason=f"cannot be processed: {type(exc).__name__}: {exc}"[:500],
                )
                encoded = encode(output.windows), [encode(letter) for letter in output.dead_letters]
            windows_value, letters = encoded
            for letter_value in letters:
                futures.append(await app.producer.send(dead_letter, None, letter_value, None, None, None))
            futures.append(await app.producer.send(windows, None, windows_value, message.partition, None, None))
            stored_keys.extend(output.keys)
            counts["records"] += 1
            counts["duplicates"] += output.duplicates
            counts["dead"] += len(output.dead_letters)
            audit = output.windows["events"]
            statuses.update(audit["status"])
            if output.unpriced:
                unpriced.update(
                    (audit["provider"][i], audit["model"][i])
                    for i, cost in enumerate(audit["cost_atto"])
                    if cost is None and audit["status"][i] == "counted"
                )
        await asyncio.gather(*futures)
        # Only now are these events somewhere durable downstream.
        for key in stored_keys:
            self._recent.add(key, None)
        RECORDS.inc(counts["records"])
        DUPLICATES.inc(counts["duplicates"])
        DEAD_LETTERED.inc(counts["dead"])
        for status, count in statuses.items():
            PROCESSED.labels(status).inc(count)
        for (provider, model), count in unpriced.items():
            UNPRICED.labels(*self._unpriced_label(provider, model)).inc(count)

    def _unpriced_label(self, provider: str, model: str) -> tuple[str, str]:
        # Model names come from clients: cap the label set so a stream of made-up names cannot blow up
        # the metrics registry (queries show every model exactly; the metric keeps the first ones).
        label = (provider[:64], model[:128])
        if label not in self._unpriced_labels:
            if len(self._unpriced_labels) >= _MAX_UNPRICED_LABELS:
                return ("other", "other")
            self._unpriced_labels.add(label)
        return label


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # Faust fixes the fetch wait at 1.5 s (see CONSUMER_FETCH_MAX_WAIT_MS for why that matters).
        # aiokafka reads the attribute when the consumer starts, which is later.
        consumer._fetch_max_wait_ms = CONSUMER_FETCH_MAX_WAIT_MS
        return consumer


DATADIR_PREFIX = "meterstream-faust-"


def remove_stale_datadirs(root: Path | None = None) -> list[Path]:
    """Remove the data directories of processors that are gone (killed: a clean stop removes its own)."""
    removed = []
    for path in Path(root or tempfile.gettempdir()).glob(f"{DATADIR_PREFIX}*-*"):
        pid_text = path.name[len(DATADIR_PREFIX) :].split("-", 1)[0]
        if not pid_text.isdigit() or _alive(int(pid_text)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


class _Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class _Transport(faust_aiokafka.Transport):
    Consumer = _Consumer


#: librdkafka's TLS settings (ingest and the sink pass them to librdkafka as they are), read here into the
#: TLS context the processor's client (aiokafka) takes.
_TLS_KEYS = frozenset({"ssl.ca.location", "ssl.certificate.location", "ssl.key.location", "ssl.key.password"})


def _tls(extra: dict[str, str]) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=extra.get("ssl.ca.location"))
    if "ssl.certificate.location" in extra:  # mutual TLS: the client's certificate and key
        context.load_cert_chain(
            extra["ssl.certificate.location"], extra.get("ssl.key.location"), extra.get("ssl.key.password")
        )
    return context


def _credentials(settings: ProcessorSettings) -> Any:
    """The broker credentials for Faust, from the same settings ingest and the sink use; settings in
    ``KAFKA__EXTRA`` that have no equivalent here are named in a warning at start, not silently dropped."""
    kafka = settings.kafka
    ignored = sorted(set(kafka.extra) - _TLS_KEYS)
    if ignored:
        log.warning("processor: KAFKA__EXTRA settings %s apply to ingest and the sink only (librdkafka)", ignored)
    tls = kafka.security_protocol in ("SSL", "SASL_SSL")
    if kafka.security_protocol.startswith("SASL") and kafka.sasl_username and kafka.sasl_password:
        return faust.SASLCredentials(
            username=kafka.sasl_username,
            password=kafka.sasl_password.get_secret_value(),
            mechanism=kafka.sasl_mechanism or "PLAIN",
            ssl_context=_tls(kafka.extra) if tls else None,
        )
    if kafka.security_protocol == "SSL":
        return faust.SSLCredentials(_tls(kafka.extra))
    return None
