"""Send LLM token usage to Meterstream.

* :class:`MeterstreamClient` / :class:`AsyncMeterstreamClient`: ``emit(subject, provider, model, usage)``
  enqueues one ``llm.usage`` CloudEvent; a background sender batches, retries and delivers it.
* :func:`instrument_openai` / :func:`instrument_anthropic`: meter every call of an SDK client, the subject
  given per call (``meterstream_subject=...``) or by :func:`subject`.
* ``query_usage(subject, window="DAY")`` on either client: tokens and cost per window, exact.
* ``reserve`` / ``commit`` / ``release`` on either client: hold a subject's budget before a call, then
  record what it used (or free the hold); ``instrument_*(..., enforce_limits=True)`` does it for every call.

No dependency beyond httpx; the wrappers import nothing from the SDKs they instrument.
"""

from meterstream_client._anthropic import instrument_anthropic
from meterstream_client._async_client import AsyncMeterstreamClient
from meterstream_client._base import BufferFullError
from meterstream_client._client import MeterstreamClient
from meterstream_client._context import current_subject, subject
from meterstream_client._delivery import DeliveryStats, DroppedEvent, RetryPolicy
from meterstream_client._instrument import SUBJECT_KWARG, MissingSubjectError
from meterstream_client._openai import instrument_openai
from meterstream_client._query import UsageWindow
from meterstream_client._reservations import (
    Estimate,
    LimitExceededError,
    MeterstreamAPIError,
    Reservation,
    ReservationStatus,
    ReservedFeature,
)

__version__ = "0.1.0"

__all__ = [
    "SUBJECT_KWARG",
    "AsyncMeterstreamClient",
    "BufferFullError",
    "DeliveryStats",
    "DroppedEvent",
    "Estimate",
    "LimitExceededError",
    "MeterstreamAPIError",
    "MeterstreamClient",
    "MissingSubjectError",
    "Reservation",
    "ReservationStatus",
    "ReservedFeature",
    "RetryPolicy",
    "UsageWindow",
    "current_subject",
    "instrument_anthropic",
    "instrument_openai",
    "subject",
]
