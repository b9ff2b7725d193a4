"""A throw-away PostgreSQL server for the tutorial baseline, if PostgreSQL is installed (else skipped).

initdb in a temporary directory, listening on a Unix socket only, default durability settings (fsync and
synchronous_commit on: a COMMIT is on disk, like a 204 from Meterstream). PostgreSQL refuses to run as
root; as root the server runs as the ``postgres`` user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.common import OWN_ROOTS
from meterstream.broker import free_port


def _bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def available() -> bool:
    return all(_bin(name) for name in ("initdb", "pg_ctl", "postgres"))


@dataclass
class PostgresServer:
    data_dir: Path
    socket_dir: Path
    port: int
    user: str | None

    @property
    def dsn(self) -> str:
        return f"host={self.socket_dir} port={self.port} user=bench dbname=postgres"

    @classmethod
    def start(cls) -> PostgresServer:
        """A new server in a directory of its own under the system temp dir (the postgres user must be able
        to reach it; the bench's work dir is private to root)."""
        base = Path(tempfile.mkdtemp(prefix="meterstream-bench-pg-"))
        data_dir, socket_dir = base / "pgdata", base / "pgsock"
        socket_dir.mkdir(exist_ok=True)
        user = "postgres" if os.geteuid() == 0 else None
        if user is not None:
            entry = pwd.getpwnam(user)
            for path in (base, socket_dir):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        server = cls(data_dir, socket_dir, free_port(), user)
        server._run(_bin("initdb") or "initdb", "-D", str(data_dir), "-A", "trust", "-U", "bench", "--no-sync")
        options = f"-p {server.port} -k {socket_dir} -c listen_addresses='' -c max_wal_size=4GB"
        log_path = base / "postgres.log"
        server._run(_bin("pg_ctl") or "pg_ctl", "-D", str(data_dir), "-o", options, "-l", str(log_path), "-w", "start")
        with contextlib.suppress(OSError, ValueError, IndexError):
            OWN_ROOTS.add(int((data_dir / "postmaster.pid").read_text().split()[0]))
        return server

    def _run(self, *command: str) -> None:
        prefix = ["runuser", "-u", self.user, "--"] if self.user else []
        done = subprocess.run([*prefix, *command], capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{command[0]} failed ({done.returncode}): {done.stdout[-500:]} {done.stderr[-500:]}")

    def stop(self) -> None:
        self._run(_bin("pg_ctl") or "pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.data_dir.parent, ignore_errors=True)
