"""Which page of a list, in which order: OpenMeter's ``orderBy``/``order`` and ``offset``/``limit`` (or
``page``/``pageSize``, turned into them), handed from the routes through the rules to the store."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Listing:
    #: The API's name of the field to order by (each list knows its own).
    order_by: str
    descending: bool = False
    offset: int = 0
    limit: int | None = None
