"""The ``meterstream`` command."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from meterstream import __version__
from meterstream.logs import configure_logging


def _time(value: str) -> datetime:
    """An RFC 3339 time with its offset (``2025-01-01T00:00:00Z``), as the API takes it: a time without one
    is refused rather than guessed to be UTC."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an RFC 3339 time (e.g. 2025-01-01T00:00:00Z)") from None
    if parsed.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{value!r} has no time zone offset: add Z or +HH:MM, as the API requires")
    return parsed.astimezone(UTC)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meterstream", description=__doc__)
    parser.add_argument("--version", action="version", version=f"meterstream {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="run everything locally: broker, processor, sink, engine, HTTP API")
    up.add_argument("--port", type=int, help="HTTP port (default 8888)")
    up.add_argument("--host", help="HTTP address (default 127.0.0.1)")
    up.add_argument("--data-dir", type=Path, help="where the data lives (default ./.meterstream)")
    up.add_argument("--partitions", type=int, help="partitions of the local topics (default 4)")

    commands.add_parser("ingest", help="the ingest HTTP service (METERSTREAM_INGEST_*)")
    commands.add_parser("processor", help="a Faust processor worker (METERSTREAM_PROCESSOR_*)")
    commands.add_parser("sink", help="the ClickHouse sink, with the query API (METERSTREAM_SINK_*)")
    commands.add_parser("query", help="the query API alone (METERSTREAM_QUERY_*)")
    commands.add_parser(
        "migrate", help="apply ClickHouse and PostgreSQL schema migrations (METERSTREAM_SINK_*, its POSTGRES__DSN)"
    )
    commands.add_parser("topics", help="create the Kafka topics (METERSTREAM_PROCESSOR_*)")

    keys = commands.add_parser(
        "keys", help="API keys: create, list, revoke (METERSTREAM_SINK_POSTGRES__DSN, or the local data dir's)"
    )
    keys.add_argument("--data-dir", type=Path, help="a `meterstream up` data directory (default ./.meterstream)")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = key_commands.add_parser("create", help="make a key; its secret is printed once")
    create.add_argument("--name", required=True, help="what the key is for")
    create.add_argument(
        "--scope",
        dest="scopes",
        action="append",
        required=True,
        choices=["admin", "read", "ingest"],
        help="repeat for several (admin includes the others)",
    )
    key_commands.add_parser("list", help="every key, without secrets")
    revoke = key_commands.add_parser("revoke", help="revoke a key (everywhere within a second)")
    revoke.add_argument("key_id", help="the key's id (see list)")

    reconcile = commands.add_parser(
        "reconcile",
        help="recompute window totals from the audit log and report differences (METERSTREAM_SINK_*)",
    )
    reconcile.add_argument("--from", dest="start", type=_time, required=True, help="RFC 3339 start (inclusive)")
    reconcile.add_argument("--to", dest="end", type=_time, required=True, help="RFC 3339 end (exclusive)")

    gap = commands.add_parser(
        "accept-gap",
        help="record source offsets as lost for good, so a sink held behind them goes on (its readiness names them)",
    )
    gap.add_argument("--url", default="http://127.0.0.1:8889", help="the sink's API (local mode: port 8888)")
    gap.add_argument(
        "--key", default=os.environ.get("METERSTREAM_ADMIN_KEY"), help="admin key ($METERSTREAM_ADMIN_KEY)"
    )
    gap.add_argument("--topic-id", required=True, help="the events topic's id")
    gap.add_argument("--partition", type=int, required=True)
    gap.add_argument("--first", type=int, required=True, help="first lost offset")
    gap.add_argument("--last", type=int, required=True, help="last lost offset (inclusive)")
    gap.add_argument("--reason", required=True, help="why they are gone (kept with the record)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from schemas.problems import MeterstreamError

    try:
        return _main(argv)
    except MeterstreamError as exc:
        # Configuration and connection problems: one clear line, not a traceback.
        print(f"meterstream: error: {exc}", file=sys.stderr)
        return 2


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    # Imported here: `meterstream --help` should not pay for Faust, chDB and genai-prices.
    from schemas.settings import IngestSettings, LocalSettings, ProcessorSettings, QuerySettings, SinkSettings

    if args.command == "up":
        from meterstream.services import run_local

        overrides = {
            key: value
            for key, value in {
                "port": args.port,
                "host": args.host,
                "data_dir": args.data_dir,
                "partitions": args.partitions,
            }.items()
            if value is not None
        }
        local = LocalSettings().model_copy(update=overrides)
        configure_logging("INFO")
        run_local(local)
        return 0
    if args.command == "ingest":
        from meterstream.services import run_ingest

        ingest = IngestSettings()
        configure_logging(ingest.log_level)
        run_ingest(ingest)
        return 0
    if args.command == "processor":
        from meterstream.services import run_processor

        processor = ProcessorSettings()
        configure_logging(processor.log_level)
        run_processor(processor)
        return 0
    if args.command == "sink":
        from meterstream.services import run_sink

        sink = SinkSettings()
        configure_logging(sink.log_level)
        run_sink(sink)
        return 0
    if args.command == "query":
        from meterstream.services import run_query

        query = QuerySettings()
        configure_logging(query.log_level)
        run_query(query)
        return 0
    if args.command == "migrate":
        from sinks.clickhouse.connection import ClickHouse
        from sinks.clickhouse.schema import migrate

        configure_logging("INFO")
        sink = SinkSettings()
        applied = migrate(ClickHouse(sink.clickhouse))
        print(f"applied migrations: {applied or 'none (up to date)'}")
        if sink.postgres.dsn is not None:
            from control.postgres.store import apply_migrations

            applied = apply_migrations(sink.postgres.dsn.get_secret_value(), sink.postgres.timeout_s)
            print(f"applied PostgreSQL migrations: {applied or 'none (up to date)'}")
        return 0
    if args.command == "topics":
        from meterstream.topics import ensure_topics

        configure_logging("INFO")
        settings = ProcessorSettings()
        ensure_topics(settings.kafka, settings.topics, allowed_lateness_s=settings.allowed_lateness_s)
        print(f"topics ready on {settings.kafka.bootstrap_servers}")
        return 0
    if args.command == "reconcile":
        return _reconcile(args.start, args.end)
    if args.command == "accept-gap":
        return _accept_gap(args)
    if args.command == "keys":
        return _keys(args)
    raise AssertionError(args.command)


def _keys(args: argparse.Namespace) -> int:
    import asyncio

    from control.keys import KeyService
    from control.postgres.store import PostgresStore, apply_migrations
    from meterstream.pgserver import EmbeddedPostgres
    from schemas.settings import LocalSettings, SinkSettings

    configure_logging("WARNING")
    dsn = SinkSettings().postgres.dsn or LocalSettings().postgres.dsn
    embedded = None
    if dsn is not None and args.data_dir is None:
        uri = dsn.get_secret_value()
    else:
        data_dir = (args.data_dir or LocalSettings().data_dir).resolve()
        if not (data_dir / "postgres").exists():
            print(
                f"meterstream: error: no data directory at {data_dir} (run `meterstream up` first, or set "
                "METERSTREAM_SINK_POSTGRES__DSN)",
                file=sys.stderr,
            )
            return 2
        embedded = EmbeddedPostgres.start(data_dir / "postgres")
        uri = embedded.uri
    try:
        apply_migrations(uri)

        async def run() -> int:
            store = PostgresStore(uri)
            await store.open()
            try:
                keys = KeyService(store)
                if args.keys_command == "create":
                    key, token = await keys.create_key(args.name, args.scopes)
                    scopes = ", ".join(sorted(args.scopes))
                    print(f"{token}\n(id {key.id}, scopes {scopes}; the secret is not shown again)")
                elif args.keys_command == "list":
                    for k in await keys.keys():
                        state = f"revoked {k.revoked_at.isoformat()}" if k.revoked_at else "active"
                        scopes = ",".join(sorted(s.value for s in k.scopes))
                        print(f"{k.id}  {scopes:<18} {state:<10} {k.created_at.isoformat()}  {k.name}")
                else:
                    await keys.revoke_key(args.key_id)
                    print(f"revoked {args.key_id}")
                return 0
            finally:
                await store.close()

        return asyncio.run(run())
    finally:
        if embedded is not None and embedded.started:
            embedded.stop()  # started only for this command: leave nothing running


def _reconcile(start: datetime, end: datetime) -> int:
    from schemas.settings import SinkSettings
    from sinks.clickhouse.connection import ClickHouse
    from sinks.clickhouse.reader import MeterReader

    configure_logging("WARNING")
    reader = MeterReader(ClickHouse(SinkSettings().clickhouse))
    differences = reader.reconcile(start, end)
    for d in differences:
        changed = ", ".join(f"{k}: audit {a} != stored {b}" for k, (a, b) in d.values.items() if a != b)
        print(f"{d.window_start.isoformat()} {d.subject} {d.provider}/{d.model}: {changed}")
    print(f"{len(differences)} window(s) differ between {start.isoformat()} and {end.isoformat()}")
    for g in reader.accepted_gaps():
        print(
            f"accepted gap: events topic {g.topic_id} partition {g.partition} offsets {g.first_offset}.."
            f"{g.last_offset} ({g.accepted_at.isoformat()}: {g.reason}); their events are in no total"
        )
    return 1 if differences else 0


def _accept_gap(args: argparse.Namespace) -> int:
    import json
    import urllib.error
    import urllib.request

    body = {
        "topicId": args.topic_id,
        "partition": args.partition,
        "firstOffset": args.first,
        "lastOffset": args.last,
        "reason": args.reason,
    }
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {args.key}"} if args.key else {})
    request = urllib.request.Request(
        f"{args.url.rstrip('/')}/api/v1/admin/gaps", data=json.dumps(body).encode(), headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=30):
            pass
    except urllib.error.HTTPError as exc:
        print(f"meterstream: error: {exc.code} {exc.read().decode(errors='replace')}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"meterstream: error: {args.url} does not answer ({exc})", file=sys.stderr)
        return 1
    print(f"accepted as lost: offsets {args.first}..{args.last} of {args.topic_id} partition {args.partition}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
