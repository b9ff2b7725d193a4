"""Posting one notification to one webhook, signed by the Standard Webhooks specification. The only code
that imports an HTTP client and the ``standardwebhooks`` library.

Every attempt is signed afresh (``webhook-timestamp`` is the attempt's: receivers refuse timestamps more than
5 minutes off) with the same ``webhook-id`` (the notification event's id), so receivers dedupe retries by it.
Redirects are not followed (a 3xx is a failed attempt), at most ``max_response_bytes`` of a response are
read, and the whole request is bounded by ``timeout_s``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

import httpx
from standardwebhooks import Webhook

from control.webhooks.urls import UrlPolicy, UrlRefused, parse_url, resolve

#: Headers a channel's custom headers may not set (ours, and those that would break the request).
RESERVED_HEADERS: Final = frozenset(
    {
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
        "content-type",
        "content-length",
        "content-encoding",
        "transfer-encoding",
        "host",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "proxy-connection",
        "expect",
        "user-agent",
    }
)


@dataclass(frozen=True, slots=True)
class Outcome:
    """One attempt: the status (None: no answer), what of the body was read, and why it failed."""

    status_code: int | None
    body: str
    duration_ms: int
    error: str | None = None
    #: Seconds the receiver asked to wait (``Retry-After`` on a 429 or 503).
    retry_after_s: float | None = None
    #: Retrying cannot help (the URL may not be called): the delivery fails at once.
    permanent: bool = False

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def sign(secret: str, event_id: str, at: datetime, body: str) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt."""
    at = at.astimezone(UTC)  # the library replaces the zone rather than converting: give it UTC
    return {
        "webhook-id": event_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": Webhook(secret).sign(event_id, at, body),
    }


class WebhookSender:
    def __init__(
        self,
        policy: UrlPolicy,
        *,
        connect_timeout_s: float,
        timeout_s: float,
        max_response_bytes: int,
        user_agent: str,
    ) -> None:
        self._policy = policy
        self._timeout_s = timeout_s
        self._cap = max_response_bytes
        self._user_agent = user_agent
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            follow_redirects=False,
            trust_env=False,  # no proxy from the environment: the address checked is the one connected to
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
        )

    async def close(self) -> None:
        await self._client.aclose()

    async def send(self, url: str, custom_headers: Mapping[str, str], secret: str, event_id: str, body: str) -> Outcome:
        started = time.monotonic()

        def took() -> int:
            return int((time.monotonic() - started) * 1000)

        try:
            target = parse_url(url)
            address = await resolve(target, self._policy)
        except UrlRefused as exc:
            return Outcome(None, "", took(), f"refused: {exc}", permanent=exc.permanent)
        except Exception as exc:  # anything the resolver raises about this URL will not pass by retrying
            return Outcome(None, "", took(), f"refused: {type(exc).__name__}: {exc}"[:300], permanent=True)
        headers = {
            **{k: v for k, v in custom_headers.items() if k.lower() not in RESERVED_HEADERS},
            "content-type": "application/json",
            "user-agent": self._user_agent,
            "host": target.host if target.port in (80, 443) else f"{target.host}:{target.port}",
            **sign(secret, event_id, datetime.now(UTC), body),
        }
        try:
            request = self._client.build_request(
                "POST",
                httpx.URL(url).copy_with(host=str(address)),
                headers=headers,
                content=body.encode(),
                extensions={"sni_hostname": target.host} if target.scheme == "https" else {},
            )
        except Exception as exc:  # a header or URL httpx cannot send (refused when saved since): never passes
            return Outcome(None, "", took(), f"cannot be sent: {type(exc).__name__}: {exc}"[:300], permanent=True)
        try:
            async with asyncio.timeout(self._timeout_s):
                response = await self._client.send(request, stream=True)
                try:
                    read = bytearray()
                    async for chunk in response.aiter_raw():
                        read += chunk
                        if len(read) >= self._cap:
                            break
                finally:
                    await response.aclose()
        except TimeoutError:
            return Outcome(None, "", took(), f"timed out after {self._timeout_s:g}s")
        except httpx.HTTPError as exc:
            return Outcome(None, "", took(), f"{type(exc).__name__}: {exc}"[:300])
        text = bytes(read[: self._cap]).decode("utf-8", "replace")
        retry_after = None
        if response.status_code in (429, 503):
            value = response.headers.get("retry-after", "")
            retry_after = float(value) if value.isdigit() else None
        error = None if 200 <= response.status_code < 300 else f"HTTP {response.status_code}"
        return Outcome(response.status_code, text, took(), error, retry_after)
