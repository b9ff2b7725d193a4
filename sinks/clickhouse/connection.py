"""Connections to ClickHouse: a server over HTTP, or the embedded engine (chDB), through one client API.

The embedded engine can be opened by one process at a time; inside that process any number of clients
(one per thread, as the engine serialises calls per client) share it.
"""

from __future__ import annotations

import importlib.util
import threading
from typing import Any, Final

import clickhouse_connect
from clickhouse_connect.driver import options
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError, OperationalError, ProgrammingError

from schemas.problems import MeterstreamError
from schemas.settings import ClickHouseSettings

# Every insert asks whether its rows are a pandas DataFrame, and the first one imports pandas to find out
# (installed with the embedded engine): ~1 s at each process start. We insert lists of rows only; the
# DataFrame parts of the client are never used.
if "pd" not in vars(options):
    options.pd = None
    options.pd_time_test = None

#: ClickHouse error codes that mean "the storage is not there" rather than "the query is wrong".
STORAGE_UNAVAILABLE_CODES: Final = frozenset({107, 159, 209, 210, 241, 242, 243, 999, 1001})


class StorageUnavailable(MeterstreamError):
    """ClickHouse cannot be reached or cannot read or write its data right now."""


def is_embedded(dsn: str) -> bool:
    return dsn.startswith("chdb:")


class ClickHouse:
    """Thread-local clients for one database."""

    def __init__(self, settings: ClickHouseSettings) -> None:
        self.settings = settings
        self.database = settings.database
        self._local = threading.local()
        self._lock = threading.Lock()
        self._clients: list[Client] = []
        #: Whether the server lets this user read only (``readonly`` in its settings profile, as the query
        #: service's user in docker-compose.yml): known once the first client is open.
        self.read_only = False

    def client(self) -> Client:
        """This thread's client (created on first use; the database is created if missing, unless the user
        may only read: then it must exist already)."""
        client: Client | None = getattr(self._local, "client", None)
        if client is None:
            with self._lock:
                if not self._clients:
                    bootstrap = self._open(database=None)
                    # A read-only user may not run even CREATE DATABASE IF NOT EXISTS.
                    self.read_only = _read_only(bootstrap, self.settings.dsn)
                    if not self.read_only:
                        on_cluster = f" ON CLUSTER `{self.settings.cluster}`" if self.settings.cluster else ""
                        bootstrap.command(f"CREATE DATABASE IF NOT EXISTS `{self.database}`{on_cluster}")
                    self._clients.append(bootstrap)
                client = self._open(database=self.database)
                self._clients.append(client)
            self._local.client = client
        return client

    def _open(self, database: str | None) -> Client:
        if is_embedded(self.settings.dsn) and importlib.util.find_spec("chdb") is None:
            raise StorageUnavailable(
                f"{self.settings.dsn} is the embedded engine, which needs the 'local' extra: "
                "pip install 'meterstream[local]' (or use a ClickHouse server: http://host:8123)"
            )
        kwargs: dict[str, Any] = {"dsn": self.settings.dsn}
        if database:
            kwargs["database"] = database
        if not is_embedded(self.settings.dsn):
            kwargs["username"] = self.settings.username or "default"
            if self.settings.password is not None:
                kwargs["password"] = self.settings.password.get_secret_value()
            kwargs["connect_timeout"] = 5
            kwargs["send_receive_timeout"] = 60
        try:
            return clickhouse_connect.get_client(**kwargs)
        except (OperationalError, ProgrammingError, ClickHouseError) as exc:
            raise StorageUnavailable(f"cannot open ClickHouse at {self.settings.dsn}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            for client in self._clients:
                client.close()
            self._clients.clear()
        self._local = threading.local()


def _read_only(client: Client, dsn: str) -> bool:
    """Whether the server runs this client's queries read-only (``readonly`` 1 or 2); never on the embedded
    engine."""
    if is_embedded(dsn):
        return False
    return int(client.query("SELECT getSetting('readonly')").result_rows[0][0]) != 0


def unavailable(exc: BaseException) -> bool:
    """Whether an exception from the client means the storage is unavailable (retry later)."""
    if isinstance(exc, (OperationalError, StorageUnavailable, OSError)):
        return True
    code = getattr(exc, "code", None)
    return isinstance(code, int) and code in STORAGE_UNAVAILABLE_CODES
