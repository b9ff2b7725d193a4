"""What travels on Kafka between the services: the wire formats and their encoders.

The hot path handles ~10^5 events/s, so records are plain JSON (orjson) decoded into dicts typed by
TypedDicts, not pydantic models: the event was validated once, at ingest.

Topics (see :mod:`schemas.topics`):

* ``events``: written by ingest. One record holds the accepted events of one request that hash to one
  partition (partitioned by subject), so the processor's per-record cost is paid per batch, not per event.
  The record timestamp is the receive time, never the event time: a backfilled event must not be deleted
  by retention before it is processed.
* ``windows``: written by the processor. Exactly one record per ``events`` record, on the same partition
  number, carrying the source coordinates (topic id, partition, offset), the window deltas of that record
  and its audit rows. The sink applies a partition's records in offset order, each exactly once.
* ``dead-letter``: events the processor would not count (later than the allowed lateness) or could not
  process at all (a poison record), with the reason.

Versions and rolling upgrades. Every record carries ``v``. A writer writes ``RECORD_VERSION``; a reader
reads every version in ``READABLE_VERSIONS``. Additions a reader can ignore (a new optional field, a new
audit status stored as it is) keep the version; anything an older reader would get wrong bumps it, and
the readers that understand it ship first: **upgrade sinks before processors, processors before ingest**.
A reader never skips a record it cannot read: the sink holds that partition where it is (nothing applied
past it, nothing committed past it, readiness red and the reason in the log) until a sink that reads it
runs; the processor treats it as a poison record (dead-lettered, in the audit log, the chain continues).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Final, Literal, NotRequired, TypedDict

import orjson

RECORD_VERSION: Final = 1
#: The version of a windows record holding an atto-dollar amount too large for a 64-bit integer (USD 9.22 and
#: more in one event, or in one window of one record), written as a decimal string: JSON numbers that large
#: cannot be written by orjson, and a reader parsing them as floats would lose cents. Only such records carry
#: it, so every other record stays readable by version-1 readers.
BIG_AMOUNTS_VERSION: Final = 2
#: Versions this code reads (see the module docstring for the upgrade rule).
READABLE_VERSIONS: Final = frozenset({1, BIG_AMOUNTS_VERSION})

INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1


def wire_atto(amount: int) -> int | str:
    """An atto-dollar amount as a record carries it: an integer if it fits in 64 bits, else its decimal
    string (and the record is then of ``BIG_AMOUNTS_VERSION``)."""
    return amount if INT64_MIN <= amount <= INT64_MAX else str(amount)


def atto(amount: int | str) -> int:
    """An atto-dollar amount read from a record (see ``wire_atto``)."""
    return amount if type(amount) is int else int(amount)


class UnsupportedVersion(ValueError):
    """A record of a version this code does not read (written by a newer release)."""

    def __init__(self, kind: str, version: object, record: dict[str, Any]) -> None:
        super().__init__(
            f"{kind} record version {version!r} is not readable by this release (reads "
            f"{sorted(READABLE_VERSIONS)}): upgrade this service first"
        )
        self.version = version
        self.record = record


class AcceptedEvent(TypedDict):
    """One validated event, as ingest hands it to the processor."""

    id: str
    source: str
    subject: str
    type: str
    #: Event time, microseconds since the epoch, UTC (the receive time when the client sent none).
    time_us: int
    received_us: int
    #: The event's data as JSON text, passed through untouched to the audit log (null: "null").
    data: str
    # For events of the usage type only:
    provider: NotRequired[str]
    model: NotRequired[str]
    #: Canonical counts keyed by genai-prices usage key (see schemas.usage).
    usage: NotRequired[dict[str, int]]
    #: genai-prices price context (service_tier, processing=batch, speed), when the event asked for one.
    price_context: NotRequired[dict[str, str]]


class EventsRecord(TypedDict):
    v: int
    events: list[AcceptedEvent]


#: Why an accepted event is or is not in the built-in meters ("failed": its record could not be processed,
#: see DeadLetterRecord; it is in the audit log and the dead-letter topic, in no meter, and not taken as
#: stored by the dedupe, so the same event sent again once fixed counts).
EventStatus = Literal["counted", "late", "not_metered", "failed"]


class AuditColumns(TypedDict):
    """The accepted events of one events record with their prices, for the raw audit log: one list per
    column, the same length each (column-oriented, as it is inserted; far cheaper to encode and decode
    than one object per event)."""

    #: Position in the events record: (topic id, partition, offset, index) identifies one *occurrence*.
    index: list[int]
    id: list[str]
    source: list[str]
    subject: list[str]
    type: list[str]
    time_us: list[int]
    received_us: list[int]
    data: list[str]
    provider: list[str]
    model: list[str]
    input_tokens: list[int]
    output_tokens: list[int]
    cache_read_tokens: list[int]
    cache_write_tokens: list[int]
    reasoning_tokens: list[int]
    #: Canonical counts as JSON text.
    usage: list[str]
    #: Cost and its input and output parts in atto-dollars (1e-18 USD, exact integers; see
    #: schemas.money), or None when the event could not be priced.
    #: (Each a decimal string instead of an integer beyond 64 bits: see ``wire_atto``.)
    cost_atto: list[int | str | None]
    cost_input_atto: list[int | str | None]
    cost_output_atto: list[int | str | None]
    #: Where the price came from ("genai-prices 0.2.3 data:…" or "override …"), or why there is none.
    price_source: list[str]
    status: list[EventStatus]


AUDIT_COLUMNS: Final = tuple(AuditColumns.__annotations__)


class WindowDelta(TypedDict):
    """What one events record adds to one 1-minute window of one subject × provider × model."""

    subject: str
    provider: str
    model: str
    #: Window start, seconds since the epoch, UTC, a multiple of 60.
    window_start: int
    requests: int
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    reasoning_tokens: int
    total_tokens: int
    #: Cost of the priced requests, atto-dollars (a decimal string beyond 64 bits: see ``wire_atto``).
    cost_atto: int | str
    unpriced_requests: int


class WindowsRecord(TypedDict):
    v: int
    #: Identity of the events topic (Kafka topic id): offsets restart when a topic is recreated.
    topic_id: str
    partition: int
    offset: int
    windows: list[WindowDelta]
    events: AuditColumns


class DeadLetterRecord(TypedDict):
    reason: str
    topic_id: str
    partition: int
    offset: int
    #: The event, or (a record that could not be decoded into events) the record's bytes as text.
    event: NotRequired[AcceptedEvent]
    raw: NotRequired[str]


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return format(value, "f")
    raise TypeError(f"cannot encode {type(value).__name__}")


def encode(record: EventsRecord | WindowsRecord | DeadLetterRecord) -> bytes:
    return orjson.dumps(record, default=_default)


def _decode(kind: str, value: bytes) -> Any:
    """Raises ValueError when ``value`` is not a JSON object, UnsupportedVersion when it is one of a
    version this code does not read."""
    record = orjson.loads(value)
    if not isinstance(record, dict):
        raise ValueError(f"{kind} record is not a JSON object")
    if record.get("v") not in READABLE_VERSIONS:
        raise UnsupportedVersion(kind, record.get("v"), record)
    return record


def decode_events(value: bytes) -> EventsRecord:
    record: EventsRecord = _decode("events", value)
    return record


def decode_windows(value: bytes) -> WindowsRecord:
    record: WindowsRecord = _decode("windows", value)
    return record
