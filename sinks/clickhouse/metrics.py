"""The engine's own memory accounting on ``/metrics``: with the embedded engine, the sink's RSS holds
ClickHouse's memory (caches, merges) beside Python's, and the RSS alone cannot tell them apart.

Read on the event loop at each scrape: one ``system.metrics`` query, about a millisecond."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Final

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from sinks.clickhouse.connection import ClickHouse

log = logging.getLogger(__name__)

#: ``system.metrics`` rows exported, all in bytes: what the engine tracks in total, what its merges
#: hold, and its caches.
ENGINE_METRICS: Final = (
    "MemoryTracking",
    "MergesMutationsMemoryTracking",
    "MarkCacheBytes",
    "IndexMarkCacheBytes",
    "PrimaryIndexCacheBytes",
    "UncompressedCacheBytes",
    "QueryConditionCacheBytes",
    "QueryCacheBytes",
    "CompiledExpressionCacheBytes",
)


class EngineMemory(Collector):
    """``meterstream_clickhouse_memory_bytes{metric=...}``, read from ``system.metrics`` at each scrape.

    A scrape that cannot reach the engine reports nothing rather than failing the whole ``/metrics``.
    """

    def __init__(self, ch: ClickHouse) -> None:
        self._ch = ch

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "meterstream_clickhouse_memory_bytes",
            "ClickHouse's own memory accounting (system.metrics): total tracked, merges, caches",
            labels=["metric"],
        )
        try:
            rows = (
                self._ch.client()
                .query(
                    "SELECT metric, value FROM system.metrics WHERE metric IN {names:Array(String)}",
                    parameters={"names": list(ENGINE_METRICS)},
                )
                .result_rows
            )
        except Exception as exc:  # a scrape must not fail because storage is away
            log.debug("engine metrics unavailable: %s", exc)
            return
        for name, value in rows:
            family.add_metric([name], float(value))
        yield family

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # Registration must not query the engine (it may not be open yet).
        yield GaugeMetricFamily("meterstream_clickhouse_memory_bytes", "", labels=["metric"])
