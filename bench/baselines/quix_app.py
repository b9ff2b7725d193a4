"""Baseline: Quix Streams doing Meterstream's aggregation, run in its own venv (bench/.venv-alt).

Reads the same events topic Meterstream's processor reads (records of ``{"v":1,"events":[...]}``), explodes
the events, prices each one with genai-prices (``ModelPrice.calc_price``; the model lookup is cached per
provider and model, as any careful user would), re-keys by subject × provider × model (``group_by``: Quix
repartitions through a topic, which is how it aggregates by a key the records are not keyed by), and sums
tokens and cost in tumbling 1-minute windows on event time, with a grace period equal to Meterstream's
allowed lateness (7 days), so no event is dropped as late. Final windows go to an output topic (none close
within a benchmark run). Changelog topics are off: their recovery relies on the broker's high watermark,
which the local broker gets wrong; this also spares Quix work Meterstream's processor does not skip.

It prints one JSON line per progress report: ``{"events": n, "t": unix time}``, the first when the first
event is aggregated, the last (with ``"done": true``) when ``--events`` events are.

Run: ``python quix_app.py --broker HOST:PORT --topic T --events N [--no-pricing]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from quixstreams import Application

SEVEN_DAYS_MS = 7 * 24 * 3600 * 1000
PICO = Decimal(10**12)


class Prices:
    """genai-prices, looked up once per provider and model."""

    def __init__(self) -> None:
        from genai_prices import Usage
        from genai_prices.data_snapshot import get_snapshot

        self._usage = Usage
        self._snapshot = get_snapshot()
        self._cache: dict[tuple[str, str], Any] = {}

    def cost_pico(self, provider: str, model: str, usage: dict[str, int]) -> int | None:
        key = (provider, model)
        price = self._cache.get(key)
        if price is None and key not in self._cache:
            try:
                _, info = self._snapshot.find_provider_model(model, None, provider, None)
                price = info.get_prices(datetime.now(UTC))
            except LookupError:
                price = None
            self._cache[key] = price
        if price is None:
            return None
        return int(price.calc_price(self._usage(**usage))["total_price"] * PICO)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--broker", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--events", type=int, required=True)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--no-pricing", action="store_true")
    args = parser.parse_args()

    prices = None if args.no_pricing else Prices()
    run_id = uuid.uuid4().hex[:8]
    app = Application(
        broker_address=args.broker,
        consumer_group=f"quix-bench-{run_id}",
        auto_offset_reset="earliest",
        use_changelog_topics=False,
        state_dir=f"/tmp/quix-bench-state-{run_id}",
        loglevel="WARNING",
        # As Meterstream's consumers on this broker: a short session, so joining the group is quick.
        consumer_extra_config={"session.timeout.ms": 6000, "heartbeat.interval.ms": 1500},
    )
    source = app.topic(args.topic, value_deserializer="json")
    # The local broker does not report retention.ms, which group_by copies to its repartition topic.
    source.broker_config.extra_config.setdefault("retention.ms", str(SEVEN_DAYS_MS))
    output = app.topic(f"quix-bench-windows-{run_id}", value_serializer="json")

    def explode(record: dict[str, Any]) -> list[dict[str, Any]]:
        return record["events"]

    def priced(event: dict[str, Any]) -> dict[str, Any]:
        usage = event["usage"]
        cost = prices.cost_pico(event["provider"], event["model"], usage) if prices else 0
        return {
            "key": f"{event['subject']}|{event['provider']}|{event['model']}",
            "input": usage.get("input_tokens", 0),
            "output": usage.get("output_tokens", 0),
            "cache_read": usage.get("cache_read_tokens", 0),
            "cost": cost or 0,
            "unpriced": int(cost is None),
        }

    state = {"events": 0, "next_report": 0.0, "started": False}

    def progress() -> None:
        state["events"] += 1
        n = state["events"]
        now = time.time()
        if not state["started"] or now >= state["next_report"] or n >= args.events:
            state["started"] = True
            state["next_report"] = now + 0.25
            done = n >= args.events
            print(json.dumps({"events": n, "t": now, "done": done}), flush=True)
            if done:
                app.stop()

    def init(event: dict[str, Any]) -> dict[str, int]:
        progress()
        return {"requests": 1, "input": event["input"], "output": event["output"],
                "cache_read": event["cache_read"], "cost": event["cost"], "unpriced": event["unpriced"]}  # fmt: skip

    def reduce(total: dict[str, int], event: dict[str, Any]) -> dict[str, int]:
        progress()
        total["requests"] += 1
        total["input"] += event["input"]
        total["output"] += event["output"]
        total["cache_read"] += event["cache_read"]
        total["cost"] += event["cost"]
        total["unpriced"] += event["unpriced"]
        return total

    sdf = app.dataframe(source)
    sdf = sdf.apply(explode, expand=True)
    sdf = sdf.set_timestamp(lambda value, key, timestamp, headers: value["time_us"] // 1000)
    sdf = sdf.apply(priced)
    sdf = sdf.group_by(lambda value: value["key"], name="subject-model")
    sdf = sdf.tumbling_window(duration_ms=60_000, grace_ms=SEVEN_DAYS_MS).reduce(reduce, init).final()
    sdf = sdf.to_topic(output)
    logging.getLogger("quixstreams").setLevel(logging.WARNING)
    app.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
