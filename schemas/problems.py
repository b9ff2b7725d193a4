"""RFC 7807 problem details, the error body of every HTTP endpoint (``application/problem+json``)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Final

PROBLEM_JSON: Final = "application/problem+json"


class MeterstreamError(Exception):
    """Root of Meterstream's own exceptions."""


@dataclass(frozen=True, slots=True)
class FieldError:
    """One reason a request was rejected: which event (index in a batch, None for a single event),
    which field (dotted path, e.g. ``data.usage.prompt_tokens``), and why."""

    field: str
    message: str
    index: int | None = None

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"field": self.field, "message": self.message}
        if self.index is not None:
            body["index"] = self.index
        return body

    def __str__(self) -> str:
        where = f"event {self.index}: " if self.index is not None else ""
        return f"{where}{self.field}: {self.message}"


@dataclass(slots=True)
class Problem(MeterstreamError):
    """An error answered as problem+json. ``errors`` lists field-level causes (RFC 7807 extension member)."""

    status: int
    detail: str
    errors: list[FieldError] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        Exception.__init__(self, self.detail)

    def to_dict(self, instance: str | None = None) -> dict[str, Any]:
        """The problem+json body. ``instance`` identifies this occurrence (a fresh URN by default), so a
        client's report can be matched with the server's log line."""
        body: dict[str, Any] = {
            "type": "about:blank",
            "title": HTTPStatus(self.status).phrase,
            "status": self.status,
            "detail": self.detail,
            "instance": instance or f"urn:uuid:{uuid.uuid4()}",
        }
        if self.errors:
            body["errors"] = [e.to_dict() for e in self.errors]
        return body


def bad(field: str, message: str) -> Problem:
    """A 400 naming one field: ``field: message`` as the detail, and the field in ``errors``."""
    return Problem(400, f"{field}: {message}", [FieldError(field, message)])
