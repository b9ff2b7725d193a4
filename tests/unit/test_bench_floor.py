"""The broker-floor benchmark's summary: percentiles after the warm-up, and slow acknowledgements of
records sent close together counted as one broker pause."""

from __future__ import annotations

from bench.broker_floor import _summary


def test_pauses_group_slow_acknowledgements_sent_close_together() -> None:
    sent = [i / 1000 for i in range(3000)]  # 3 s at 1,000 records/s
    latencies = [0.001] * 3000
    for i in range(1500, 1540):  # one pause: 40 records in a row waited 40..1 ms
        latencies[i] = 0.001 * (1540 - i)
    latencies[2500] = 0.030  # a second, separate pause
    summary = _summary("test", sent, latencies, warmup_s=1.0)

    assert summary["records"] == 2000  # the first second is warm-up
    assert summary["pauses"] == 2
    assert summary["longest_pause_ms"] == 40.0
    assert summary["p50_ms"] == 1.0
    assert summary["p99_ms"] > 1.0  # 34 of 2,000 acknowledgements waited >= 8 ms: the pauses are the tail


def test_warm_up_is_not_counted() -> None:
    sent = [i / 100 for i in range(300)]
    latencies = [0.5] * 100 + [0.002] * 200  # a slow start (connecting) inside the warm-up only
    summary = _summary("test", sent, latencies, warmup_s=1.0)

    assert summary["pauses"] == 0
    assert summary["max_ms"] == 2.0
    assert summary["seconds_between_pauses"] is None
