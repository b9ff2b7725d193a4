"""Small pure pieces: the partitioner, money conversions, meter descriptions."""

from __future__ import annotations

import re
from decimal import Decimal

import pytest

from schemas.meters import METERS, find_meter
from schemas.money import format_usd, from_atto, round_to_atto, to_atto
from schemas.topics import murmur2, partition_for

# Kafka's own test vectors (clients/src/test/java/org/apache/kafka/common/utils/UtilsTest.java).
KAFKA_MURMUR2 = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}


@pytest.mark.parametrize(("data", "signed"), KAFKA_MURMUR2.items())
def test_murmur2_matches_kafka(data: bytes, signed: int) -> None:
    assert murmur2(data) == signed & 0xFFFFFFFF


def test_partition_is_stable_and_in_range() -> None:
    assert {partition_for("alice", 8) for _ in range(3)} == {partition_for("alice", 8)}
    assert all(0 <= partition_for(f"user-{i}", 7) < 7 for i in range(1000))
    assert len({partition_for(f"user-{i}", 4) for i in range(100)}) == 4


def test_money_is_exact() -> None:
    assert to_atto("0.00045") == 450_000_000_000_000
    assert to_atto(Decimal("7.5E-8")) == 75_000_000_000
    assert from_atto(450_000_000_000_000) == Decimal("0.00045")
    assert from_atto(to_atto("12345678901234567890.123456789012345678")) == Decimal(
        "12345678901234567890.123456789012345678"
    )
    with pytest.raises(ValueError, match="18 decimal places"):
        to_atto("1e-19")
    assert round_to_atto(Decimal("0.0003083333333333333333333333333")) == 308_333_333_333_333
    assert format_usd(Decimal("0.000450000000000000")) == "0.00045"
    assert format_usd(Decimal("12.000")) == "12"
    assert format_usd(Decimal("7.5E-8")) == "0.000000075"
    assert format_usd(Decimal(0)) == "0"


def test_meters_are_openmeter_shaped() -> None:
    ulid = re.compile(r"^[0-7][0-9A-HJKMNP-TV-Za-hjkmnp-tv-z]{25}$")
    slug = re.compile(r"^[a-z0-9]+(?:_[a-z0-9]+)*$")
    assert len({m.id for m in METERS}) == len(METERS)
    for meter in METERS:
        body = meter.to_api("llm.usage")
        assert ulid.match(body["id"]) and slug.match(body["slug"])
        assert {"id", "slug", "aggregation", "eventType", "createdAt", "updatedAt"} <= set(body)
        assert find_meter(meter.id) is meter and find_meter(meter.slug) is meter
    assert find_meter("nope") is None
    assert {m.slug for m in METERS} == {
        "requests",
        "input_tokens",
        "output_tokens",
        "cache_read_tokens",
        "cache_write_tokens",
        "reasoning_tokens",
        "tokens_total",
        "cost_usd",
        "unpriced_requests",
    }


def test_topic_durability_settings() -> None:
    import pytest
    from pydantic import ValidationError

    from schemas.settings import TopicSettings

    assert TopicSettings().min_insync == 1
    assert TopicSettings(replication_factor=3).min_insync == 2
    assert TopicSettings().retention_s == 14 * 86400
    with pytest.raises(ValidationError, match="no write could ever be acknowledged"):
        TopicSettings(replication_factor=1, min_insync_replicas=2)
