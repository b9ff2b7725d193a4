"""User-defined meters on PostgreSQL (the API's; the meters file's live in the configuration)."""

from __future__ import annotations

from datetime import datetime

from psycopg.rows import DictRow
from psycopg.types.json import Jsonb

from control.postgres.sql import Sql
from schemas.meters import UserMeter


def _meter(r: DictRow) -> UserMeter:
    return UserMeter(
        id=r["id"],
        slug=r["slug"],
        name=r["name"],
        description=r["description"],
        event_type=r["event_type"],
        aggregation=r["aggregation"],
        value_property=r["value_property"],
        group_by=r["group_by"],
        event_from=r["event_from"],
        metadata=r["metadata"],
        created_at=r["created_at"],
        updated_at=r["updated_at"],
        deleted_at=r["deleted_at"],
    )


class MeterSql(Sql):
    async def insert_meter(self, m: UserMeter) -> None:
        await self._write(
            "INSERT INTO meters (id, slug, name, description, event_type, aggregation, value_property, group_by, "
            "event_from, metadata, created_at, updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (
                m.id,
                m.slug,
                m.name,
                m.description,
                m.event_type,
                m.aggregation,
                m.value_property,
                Jsonb(dict(m.group_by)),
                m.event_from,
                None if m.metadata is None else Jsonb(dict(m.metadata)),
                m.created_at,
                m.updated_at,
            ),
            f"a meter with slug {m.slug} already exists",
        )

    async def meters(self, include_deleted: bool = False) -> list[UserMeter]:
        where = "TRUE" if include_deleted else "deleted_at IS NULL"
        return [_meter(r) for r in await self._all(f"SELECT * FROM meters WHERE {where} ORDER BY created_at, id")]

    async def update_meter(self, m: UserMeter) -> None:
        """Name, description, metadata and group-by keys: what does not change the meaning of stored data."""
        await self._conn.execute(
            b"UPDATE meters SET name = %s, description = %s, metadata = %s, group_by = %s, updated_at = %s "
            b"WHERE id = %s AND deleted_at IS NULL",
            (
                m.name,
                m.description,
                None if m.metadata is None else Jsonb(dict(m.metadata)),
                Jsonb(dict(m.group_by)),
                m.updated_at,
                m.id,
            ),
        )

    async def delete_meter(self, meter_id: str, at: datetime) -> None:
        await self._conn.execute(
            b"UPDATE meters SET deleted_at = %s, updated_at = %s WHERE id = %s AND deleted_at IS NULL",
            (at, at, meter_id),
        )
