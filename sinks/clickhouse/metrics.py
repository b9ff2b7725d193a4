"""Gauges read from ClickHouse at each scrape of ``/metrics``.

The engine's own memory accounting: with the embedded engine, the sink's RSS holds ClickHouse's memory
(caches, merges) beside Python's, and the RSS alone cannot tell them apart (one ``system.metrics`` query,
about a millisecond). And the events each user meter left out for want of a value (one query of its states'
two counts)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Final

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from schemas.meters import UserMeter
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


class MeterValuesMissing(Collector):
    """``meterstream_meter_values_missing{meter=...}``: events of a user meter whose value is missing or not a
    number where one is needed (left out of its numbers, never counted as 0), from its states: so far as they
    are backfilled. Meters that need no value (COUNT) are left out. A scrape that cannot reach the engine
    reports nothing."""

    def __init__(self, ch: ClickHouse, meters: Callable[[], Sequence[UserMeter]]) -> None:
        self._ch, self._meters = ch, meters

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "meterstream_meter_values_missing",
            "Events of a user meter left out for want of a value (missing, or not a number where one is needed)",
            labels=["meter"],
        )
        slugs = {m.state_id: m.slug for m in self._meters() if m.value_property is not None}
        if slugs:
            try:
                rows = (
                    self._ch.client()
                    .query(
                        # n_values: the events with the value their meter's aggregation needs.
                        "SELECT meter_id, sum(events) - sum(n_values) FROM meter_windows "
                        "WHERE meter_id IN {ids:Array(String)} AND subject != '' GROUP BY meter_id",
                        parameters={"ids": list(slugs)},
                    )
                    .result_rows
                )
            except Exception as exc:
                log.debug("meter values unavailable: %s", exc)
                return
            found = {str(meter_id): float(count) for meter_id, count in rows}
            for state_id, slug in slugs.items():
                family.add_metric([slug], found.get(state_id, 0.0))
        yield family

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("meterstream_meter_values_missing", "", labels=["meter"])
