"""The statements' plumbing every part of the PostgreSQL adapter shares."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import psycopg
from psycopg.rows import DictRow

from control.errors import Conflict
from control.listing import Listing


class Sql:
    """Statements on one connection, inside the transaction the store opened."""

    def __init__(self, conn: psycopg.AsyncConnection[DictRow]) -> None:
        self._conn = conn

    async def _all(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> list[DictRow]:
        cur = await self._conn.execute(sql.encode(), params)
        return await cur.fetchall()

    async def _one(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> DictRow | None:
        cur = await self._conn.execute(sql.encode(), params)
        return await cur.fetchone()

    async def _write(self, sql: str, params: Sequence[Any] | Mapping[str, Any], what: str) -> int:
        try:
            cur = await self._conn.execute(sql.encode(), params)
        except psycopg.errors.UniqueViolation:
            raise Conflict(what) from None
        return cur.rowcount

    async def _page(
        self,
        source: str,
        where: Sequence[str],
        params: Mapping[str, Any],
        columns: Mapping[str, str],
        listing: Listing,
    ) -> tuple[list[DictRow], int]:
        """One page of ``source`` (what to select ``FROM`` a table or join) and how many rows match in all;
        ``columns`` maps the API's names of the fields a list may be ordered by to their columns, ``id`` among
        them (the tie-break, so pages do not overlap)."""
        selected, _, table = source.partition(" FROM ")
        cond = " AND ".join(where)
        order = f"{columns[listing.order_by]} {'DESC' if listing.descending else 'ASC'}, {columns['id']}"
        page = f" LIMIT {int(listing.limit)}" if listing.limit is not None else ""
        rows = await self._all(
            f"SELECT {selected} FROM {table} WHERE {cond} ORDER BY {order} OFFSET {int(listing.offset)}{page}", params
        )
        total = await self._one(f"SELECT count(*) AS n FROM {table} WHERE {cond}", params)
        return rows, int(total["n"]) if total else 0
