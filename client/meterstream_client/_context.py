"""The current end user (subject), for instrumented LLM calls that do not name one."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from meterstream_client._events import check_subject

_SUBJECT: ContextVar[str | None] = ContextVar("meterstream_subject", default=None)


@contextmanager
def subject(name: str) -> Iterator[str]:
    """Attribute the instrumented LLM calls made inside the block to the end user ``name``.

    Context-local (a :class:`~contextvars.ContextVar`): safe with threads and asyncio tasks, and nestable
    (the innermost wins)::

        with meterstream_client.subject("alice"):
            client.chat.completions.create(...)
    """
    token = _SUBJECT.set(check_subject(name))
    try:
        yield name
    finally:
        _SUBJECT.reset(token)


def current_subject() -> str | None:
    """The subject set by the innermost enclosing :func:`subject` block, if any."""
    return _SUBJECT.get()
