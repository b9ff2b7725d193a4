"""The control plane's failures that are not a request's fault."""

from __future__ import annotations

from schemas.problems import MeterstreamError


class StoreUnavailable(MeterstreamError):
    """The store cannot be reached now; the request may be retried (answered 503 with Retry-After)."""


class Conflict(MeterstreamError):
    """A write would break a uniqueness rule (answered 409)."""
