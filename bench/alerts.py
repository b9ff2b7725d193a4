"""The alerts scenario's probes (``alerts`` in bench/scenarios.py).

Many probe subjects, each with a metered entitlement on feature ``tokens`` and a grant of
:data:`GRANT` tokens, and one threshold rule (50 / 80 / 100 % of the grant) sending to a real HTTP
receiver (tests/helpers/webhooks.py: a threaded server on 127.0.0.1 that verifies every Standard Webhooks
signature with the ``standardwebhooks`` library). Each probe subject gets one usage event of
:data:`PROBE_TOKENS` tokens, which crosses 50 % and 80 % at once (not 100 %); for each the bench notes
when its 204 came, when the 80 % webhook arrived, the crossing's own timestamp (the payload's
``timestamp``: when the sink's evaluation recorded it), and, for the baseline, when the subject's
entitlement value first showed the tokens (``GET /api/v1/subjects/{s}/entitlements/tokens/value``,
polled by one thread for every probe not seen yet): the freshness floor the alerts are built on.

Times are wall-clock (``time.time()``) throughout: the receiver stamps arrivals with it and the payload's
timestamp comes from the sink process's clock, on the same machine.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import orjson

from tests.helpers.webhooks import Receiver

FEATURE = "tokens"
GRANT = 1000
#: One probe event's input and output tokens: 850 of the 1,000 granted, 85 %.
PROBE_INPUT, PROBE_OUTPUT = 600, 250
PROBE_TOKENS = PROBE_INPUT + PROBE_OUTPUT
THRESHOLDS = (50, 80, 100)
#: The threshold whose webhook is timed.
TIMED = 80


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def setup(base_url: str, receiver: Receiver, subjects: tuple[str, ...], threads: int = 4) -> dict[str, Any]:
    """The feature, a webhook channel to ``receiver`` (its signing secret handed to it), the rule, and every
    probe subject's entitlement (monthly, usage from a few minutes ago) and grant. Returns what was made."""
    since = _iso((datetime.now(UTC) - timedelta(minutes=5)).replace(second=0, microsecond=0))
    with httpx.Client(base_url=base_url, timeout=30) as admin:
        r = admin.post("/api/v1/features", json={"key": FEATURE, "name": "Tokens", "meterSlug": "tokens_total"})
        assert r.status_code == 201, r.text
        r = admin.post("/api/v1/notification/channels", json={"type": "WEBHOOK", "name": "bench", "url": receiver.url})
        assert r.status_code == 201, r.text
        channel = r.json()
        receiver.secret = channel["signingSecret"]
        rule_body = {
            "type": "entitlements.balance.threshold",
            "name": "bench budget",
            "channels": [channel["id"]],
            "features": [FEATURE],
            "thresholds": [{"type": "usage_percentage", "value": v} for v in THRESHOLDS],
        }
        r = admin.post("/api/v1/notification/rules", json=rule_body)
        assert r.status_code == 201, r.text
        rule = r.json()

    def entitle(chunk: tuple[str, ...]) -> None:
        with httpx.Client(base_url=base_url, timeout=30) as client:
            for subject in chunk:
                body = {"type": "metered", "featureKey": FEATURE, "measureUsageFrom": since,
                        "usagePeriod": {"interval": "MONTH", "anchor": since}}  # fmt: skip
                r = client.post(f"/api/v1/subjects/{subject}/entitlements", json=body)
                assert r.status_code == 201, r.text
                grant = {"amount": GRANT, "effectiveAt": since, "expiration": {"duration": "YEAR", "count": 1}}
                r = client.post(f"/api/v1/subjects/{subject}/entitlements/{FEATURE}/grants", json=grant)
                assert r.status_code == 201, r.text

    started = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(entitle, [subjects[i::threads] for i in range(threads)]))
    return {"channel": channel["id"], "rule": rule["id"], "subjects": len(subjects),
            "setup_s": round(time.monotonic() - started, 1)}  # fmt: skip


class Probes:
    """The probe events, their 204s, the value poller, and what the receiver got for each."""

    def __init__(self, ingest_url: str, query_url: str, receiver: Receiver) -> None:
        self._ingest_url = ingest_url
        self._query_url = query_url
        self.receiver = receiver
        #: subject -> when its event's 204 came; when its value first showed the tokens.
        self.sent: dict[str, float] = {}
        self.visible: dict[str, float] = {}
        self.failed_sends = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def send(self, client: httpx.Client, subject: str) -> None:
        event = {
            "specversion": "1.0",
            "id": subject,
            "source": "bench-alerts",
            "type": "llm.usage",
            "subject": subject,
            "time": _iso(datetime.now(UTC)),
            "data": {"provider": "openai", "model": "gpt-4o-mini", "input_tokens": PROBE_INPUT,
                     "output_tokens": PROBE_OUTPUT},
        }  # fmt: skip
        response = client.post(
            f"{self._ingest_url}/api/v1/events",
            content=orjson.dumps(event),
            headers={"Content-Type": "application/cloudevents+json"},
        )
        acknowledged = time.time()
        if response.status_code == 204:
            with self._lock:
                self.sent[subject] = acknowledged
        else:
            self.failed_sends += 1

    def poll_values(self) -> None:
        """Until stopped: every probe sent and not yet seen in its entitlement value, read in turn."""
        with httpx.Client(base_url=self._query_url, timeout=30) as client:
            while not self._stop.is_set():
                with self._lock:
                    pending = [s for s in self.sent if s not in self.visible]
                for subject in pending:
                    try:
                        r = client.get(f"/api/v1/subjects/{subject}/entitlements/{FEATURE}/value")
                        seen = time.time()
                        if r.status_code == 200 and Decimal(str(orjson.loads(r.content)["usage"])) >= PROBE_TOKENS:
                            with self._lock:
                                self.visible[subject] = seen
                    except (httpx.HTTPError, KeyError, ValueError):
                        pass
                time.sleep(0.02)

    def arrivals(self, threshold: int = TIMED) -> dict[str, tuple[float, float]]:
        """subject -> (when its ``threshold`` % webhook first arrived answered 204, when the crossing was
        recorded: the payload's timestamp)."""
        out: dict[str, tuple[float, float]] = {}
        for r in self.receiver.delivered():
            p = r.payload
            if p.get("type") != "entitlements.balance.threshold":
                continue
            t = p["data"].get("threshold") or {}
            if Decimal(str(t.get("value", -1))) != threshold:
                continue
            subject = p["data"]["subject"]["key"]
            recorded = datetime.fromisoformat(p["timestamp"].replace("Z", "+00:00")).timestamp()
            out.setdefault(subject, (r.at, recorded))
        return out

    def wait(self, timeout_s: float) -> None:
        """Until every probe's timed webhook has arrived and its value shows, or ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                sent, visible = set(self.sent), set(self.visible)
            if sent <= visible and sent <= set(self.arrivals()):
                return
            time.sleep(0.1)

    def stop(self) -> None:
        self._stop.set()

    def summary(self, load_ended: float | None = None) -> dict[str, Any]:
        """The lags (s) of every probe; a probe whose webhook (or value) never came counts with its wait so
        far (a lower bound), and is counted as missing. ``load_ended``: when the steady load stopped (how
        many crossings were recorded only after it)."""
        now = time.time()
        timed = self.arrivals()
        with self._lock:
            sent, visible = dict(self.sent), dict(self.visible)
        alert, value, recorded, delivered = [], [], [], []
        first = min(sent.values(), default=now)
        #: Per probe: seconds into the probes its 204 came, then its lags to the webhook, the value and the record.
        series = []
        for subject, t in sent.items():
            got = timed.get(subject)
            alert.append((got[0] if got else now) - t)
            value.append(visible.get(subject, now) - t)
            if got:
                recorded.append(got[1] - t)
                delivered.append(got[0] - got[1])
            series.append([round(v, 3) for v in (t - first, alert[-1], value[-1], got[1] - t if got else -1)])
        everything = self.receiver.received
        hooks = [r for r in self.receiver.delivered() if r.payload.get("type") == "entitlements.balance.threshold"]
        return {
            "alert_s": alert,
            "value_s": value,
            "recorded_s": recorded,
            "delivered_s": delivered,
            "probes": len(sent),
            "failed_sends": self.failed_sends,
            "alerts_missing": sum(1 for s in sent if s not in timed),
            "values_missing": sum(1 for s in sent if s not in visible),
            "recorded_after_load_end": None
            if load_ended is None
            else sum(1 for _, recorded_at in timed.values() if recorded_at > load_ended),
            "load_ended_s": None if load_ended is None else round(load_ended - first, 3),
            "webhooks_received": len(everything),
            "webhooks_unverified": sum(1 for r in everything if not r.verified),
            # Each probe crosses 50 % and 80 %: two notifications each, and none for 100 %.
            "threshold_webhooks": len(hooks),
            "crossed_100": sum(1 for r in hooks if Decimal(str(r.payload["data"]["threshold"]["value"])) == 100),
            "series": series,
        }
