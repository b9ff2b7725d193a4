"""Limits end to end: features, entitlements (metered, boolean, static), grants, values, history, resets,
overrides and deletes through OpenMeter's official Python client (openmeter 1.0.0b236), and Meterstream's
plans (httpx), on the real stack (`meterstream up`). Every number is compared with an independent ground
truth (tests/helpers/limits_truth.py, from the events sent and the grants made) and with the query API.

One stack for the module, started with a processor lateness of ~460 days so events can be sent at past
dates around DST changes, and with a default plan key whose plan is created (via the API) only by the last
test. The staged fixtures of the "cur" subject (grants -> void -> resets -> override) run in file order.
"""

from __future__ import annotations

import datetime as dt
import random
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from corehttp.exceptions import HttpResponseError, ResourceExistsError, ResourceNotFoundError
from openmeter import Client

from tests.helpers import limits_truth as lt
from tests.helpers.events import iso
from tests.helpers.openmeter_entitlements import subject_entitlements
from tests.helpers.stack import LocalStack
from tests.helpers.truth import Sent, sent_from_canonical

pytestmark = pytest.mark.e2e

UTC = dt.UTC
US = dt.timedelta(microseconds=1)
S = dt.timedelta(seconds=1)
M = dt.timedelta(minutes=1)
H = dt.timedelta(hours=1)
D = dt.timedelta(days=1)
BUD, NYC = "Europe/Budapest", "America/New_York"
DEFAULT_PLAN = "starter"

NOW = dt.datetime.now(UTC)
NOW0 = lt.minute(NOW)

# -- Europe: the latest spring-forward (2026-03-29 01:00Z when written) ---------------------------------
EU_DST = lt.last_transition(BUD, NOW - 5 * D, forward=True)
EU_DAY = EU_DST.astimezone(ZoneInfo(BUD)).date()


def eu_midnight(days: int) -> dt.datetime:
    day = EU_DAY + dt.timedelta(days=days)
    return lt.local_midnight(day.year, day.month, day.day, BUD)


#: tokens_all: daily in Budapest, anchored at local midnight of the 1st; measured from mid-day (truncated).
EU_TOKENS_PERIOD = lt.Period("DAY", lt.local_midnight(EU_DAY.year, EU_DAY.month, 1, BUD), BUD)
EU_TOKENS_FROM = eu_midnight(-2) + dt.timedelta(hours=10, minutes=17, seconds=42)
#: premium (gpt-4o only): monthly in Budapest, anchored on Jan 31 (Feb clamps to its last day), so a
#: boundary falls at local midnight of Mar 31, next to the DST change.
EU_PREMIUM_PERIOD = lt.Period("MONTH", lt.local_midnight(EU_DAY.year, 1, 31, BUD), BUD)
EU_PREMIUM_FROM = lt.local_midnight(EU_DAY.year, EU_DAY.month, 1, BUD)
EU_MONTH_END = lt.local_midnight(EU_DAY.year, 3, 31, BUD)
EU_START, EU_END = eu_midnight(-2) - 3 * H, max(eu_midnight(4), EU_MONTH_END + D)

# -- New York: the latest fall-back (2026-11-01 06:00Z when written; Nov 1 has 25 hours) -----------------
NY_DST = lt.last_transition(NYC, NOW - 5 * D, forward=False)
NY_DAY = NY_DST.astimezone(ZoneInfo(NYC)).date()


def ny_midnight(days: int) -> dt.datetime:
    day = NY_DAY + dt.timedelta(days=days)
    return lt.local_midnight(day.year, day.month, day.day, NYC)


NY_PERIOD = lt.Period("DAY", lt.local_midnight(NY_DAY.year, NY_DAY.month, 1, NYC), NYC)
NY_FROM = ny_midnight(-1)
NY_START, NY_END = ny_midnight(-1) - 2 * H, ny_midnight(2) + 2 * H
UNKNOWN_MODEL = "house-model-7"  # no price: its calls are unpricedRequests

# -- The current period: a month in New York that started 10 local days ago ----------------------------
_today_ny = NOW.astimezone(ZoneInfo(NYC)).date() - dt.timedelta(days=10)
CUR_A = lt.local_midnight(_today_ny.year, _today_ny.month, _today_ny.day, NYC)

# -- Plans: daily periods anchored two hours ago ---------------------------------------------------------
PLAN_ANCHOR = NOW0 - 2 * H

ALL_TOKENS = "tokens_all"
PREMIUM = "premium"
SPEND = "spend"
SSO = "sso"
LIMITS_CFG = "limits_cfg"


# -- events ----------------------------------------------------------------------------------------------


def _event(subject: str, n: int, t: dt.datetime, model: str, tokens_in: int, tokens_out: int) -> dict[str, Any]:
    provider = "anthropic" if model.startswith("claude") else "openai"
    return {
        "specversion": "1.0",
        "id": f"limits-{subject}-{n}",
        "source": "limits-e2e",
        "type": "llm.usage",
        "subject": subject,
        "time": iso(t),
        "data": {"provider": provider, "model": model, "input_tokens": tokens_in, "output_tokens": tokens_out},
    }


def _random_times(rng: random.Random, lo: dt.datetime, hi: dt.datetime, n: int) -> list[dt.datetime]:
    span = int((hi - lo) / US)
    return [lo + rng.randrange(span) * US for _ in range(n)]


def _edges(points: Sequence[dt.datetime]) -> list[dt.datetime]:
    """Events right at and around each point (a period boundary, a DST change)."""
    return [p + off for p in points for off in (-S, -US, dt.timedelta(0), US)]


EU_POINTS = [*(eu_midnight(d) for d in range(-1, 4)), EU_DST, EU_MONTH_END, lt.minute(EU_TOKENS_FROM)]
NY_POINTS = [ny_midnight(0), NY_DST, ny_midnight(1), ny_midnight(2), NY_FROM]


def build_events() -> list[dict[str, Any]]:
    rng = random.Random(20260329)
    out: list[dict[str, Any]] = []
    models = ["gpt-4o", "gpt-4o-mini", "claude-sonnet-4-20250514"]

    def add(subject: str, t: dt.datetime, model: str, tokens_in: int, tokens_out: int) -> None:
        out.append(_event(subject, len(out), t, model, tokens_in, tokens_out))

    # Europe: one gpt-4o call counts toward both tokens_all and premium.
    for t in _random_times(rng, EU_START, EU_END, 150):
        add("eu", t, rng.choice(models), rng.randint(50, 1500), rng.randint(10, 400))
    for i, t in enumerate(_edges(EU_POINTS)):
        add("eu", t, models[i % 2], 100 + i, 7)
    # New York, priced and unpriced calls (cost feature).
    for t in _random_times(rng, NY_START, NY_END, 70):
        model = UNKNOWN_MODEL if rng.random() < 0.12 else rng.choice(models)
        add("ny", t, model, rng.randint(200, 3000), rng.randint(20, 600))
    for i, t in enumerate(_edges(NY_POINTS)):
        add("ny", t, [UNKNOWN_MODEL, "gpt-4o", "gpt-4o-mini"][i % 3], 500 + i, 50)
    # The current period: light use, a heavy stretch that outruns every grant (an overage until g5 pays
    # it), then moderate use.
    for lo, hi, n in (
        (CUR_A - 6 * H, CUR_A + 5.3 * D, 28),
        (CUR_A + 5.3 * D, CUR_A + 7 * D, 34),
        (CUR_A + 7 * D, NOW0, 20),
    ):
        for t in _random_times(rng, lo, min(hi, NOW0 - 3 * M), n):
            add("cur", t, rng.choice(models), rng.randint(50, 400), rng.randint(5, 100))
    # Plans: 8 × 400 tokens after the plans' period start (and two calls before it, which never count).
    for subject, n in (("plan-a", 8), ("plan-b", 3), ("plan-c", 2)):
        add(subject, PLAN_ANCHOR - 30 * M, "gpt-4o-mini", 300, 100)
        for k in range(n):
            add(subject, PLAN_ANCHOR + (5 + 7 * k) * M + 123_456 * US, "gpt-4o-mini", 300, 100)
    for k in range(4):
        add("newbie", PLAN_ANCHOR + (3 + k) * M, "gpt-4o", 40, 10)
    add("events-only", NOW0 - 50 * M, "gpt-4o-mini", 10, 1)
    add("events-only", NOW0 - 40 * M, "gpt-4o-mini", 10, 1)
    return out


# -- fixtures --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    env = {
        # Events up to ~460 days old are counted, so usage can be sent at fixed past dates.
        "METERSTREAM_PROCESSOR_ALLOWED_LATENESS_S": "40000000",
        # The plan does not exist until test_default_plan creates it through the API.
        "METERSTREAM_LOCAL_DEFAULT_PLAN": DEFAULT_PLAN,
    }
    stack = LocalStack(tmp_path_factory.mktemp("limits") / "data", env=env).start()
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def client(stack: LocalStack) -> Client:
    return Client(endpoint=stack.url, retry_total=0)


@pytest.fixture(scope="module")
def se(client: Client) -> Any:
    """The subject-entitlement operations the client generates but shadows (see the helper)."""
    return subject_entitlements(client)


@pytest.fixture(scope="module")
def http(stack: LocalStack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def events(client: Client) -> list[Sent]:
    """Every event, sent once through the client and stored (polled until each subject's count shows)."""
    raw = build_events()
    for i in range(0, len(raw), 200):
        client.events.ingest_events(raw[i : i + 200])
    want: dict[str, int] = {}
    for e in raw:
        want[e["subject"]] = want.get(e["subject"], 0) + 1
    deadline = time.monotonic() + 60
    got: dict[str, int] = {}
    while time.monotonic() < deadline:
        rows = client.meters.query_json("requests", group_by=["subject"]).data
        got = {r.subject: int(r.value) for r in rows}
        if got == want:
            break
        time.sleep(0.2)
    assert got == want
    return [sent_from_canonical(e) for e in raw]


@pytest.fixture(scope="module")
def features(client: Client) -> dict[str, Any]:
    made = [
        {"key": ALL_TOKENS, "name": "All tokens", "meterSlug": "tokens_total"},
        {
            "key": PREMIUM,
            "name": "Premium tokens",
            "meterSlug": "tokens_total",
            "meterGroupByFilters": {"model": "gpt-4o"},
        },
        {"key": SPEND, "name": "Spend (USD)", "meterSlug": "cost_usd"},
        {"key": SSO, "name": "Single sign-on"},
        {"key": LIMITS_CFG, "name": "Limits configuration"},
        {"key": "plan_tokens", "name": "Plan tokens", "meterSlug": "tokens_total"},
        {"key": "plan_sso", "name": "Plan SSO"},
        {"key": "plan_cfg", "name": "Plan configuration"},
    ]
    return {f["key"]: client.features.create(f) for f in made}


# -- helpers ---------------------------------------------------------------------------------------------


def exact(response: httpx.Response) -> Any:
    assert response.status_code == 200, response.text
    return response.json(parse_float=Decimal, parse_int=Decimal)


def query_total(http: httpx.Client, ent: lt.Metered, frm: dt.datetime, to: dt.datetime) -> Decimal:
    """The query API's total for the entitlement's subject, meter and filters over ``[frm, to)``, as DAY
    windows in the period's time zone, summed."""
    params: dict[str, str] = {
        "subject": ent.subject,
        "from": iso(frm),
        "to": iso(to),
        "windowSize": "DAY",
        "windowTimeZone": ent.period.zone,
    }
    params |= {f"filterGroupBy[{k}]": v for k, v in ent.filters.items()}
    rows = exact(http.get(f"/api/v1/meters/{ent.meter}/query", params=params))["data"]
    return sum((r["value"] for r in rows), Decimal(0))


def as_float(state: lt.State) -> tuple[Any, ...]:
    return (
        state.has_access,
        float(state.balance),
        float(state.usage),
        float(state.overage),
        float(state.total_available),
    )


def check_values(
    se: Any,
    http: httpx.Client,
    ent: lt.Metered,
    ref: str,
    events: Sequence[Sent],
    times: Sequence[dt.datetime],
    *,
    decimals: bool = False,
) -> None:
    """At every time, the value (through the client; exactly through httpx too if ``decimals``) and the
    query API's usage for the period so far equal the truth."""
    bad: list[Any] = []
    for t in times:
        want = lt.value(ent, events, t)
        got = se.get_entitlement_value(ent.subject, ref, time=t)
        client_view = (got.has_access, got.balance, got.usage, got.overage, got.total_available_grant_amount)
        if client_view != as_float(want):
            bad.append((iso(t), "client", client_view, as_float(want)))
        if decimals:
            body = exact(http.get(f"/api/v1/subjects/{ent.subject}/entitlements/{ref}/value", params={"time": iso(t)}))
            exact_view = {
                k: body.get(k) for k in ("hasAccess", "balance", "usage", "overage", "totalAvailableGrantAmount")
            }
            want_view = {
                "hasAccess": want.has_access,
                "balance": want.balance,
                "usage": want.usage,
                "overage": want.overage,
                "totalAvailableGrantAmount": want.total_available,
            }
            if ent.meter == "cost_usd":
                exact_view["unpricedRequests"] = body.get("unpricedRequests")
                want_view["unpricedRequests"] = lt.unpriced(ent, events, t)
            if exact_view != want_view:
                bad.append((iso(t), "exact", exact_view, want_view))
        if t > want.period_start:
            total = query_total(http, ent, want.period_start, t)
            if total != want.usage:
                bad.append((iso(t), "query API", total, want.usage))
    assert not bad, f"{len(bad)} of {len(times)} times differ:\n" + "\n".join(map(repr, bad[:20]))


def around(points: Sequence[dt.datetime]) -> list[dt.datetime]:
    return [p + off for p in points for off in (-S, -US, dt.timedelta(0), US, S, H)]


def grid(lo: dt.datetime, hi: dt.datetime, step: dt.timedelta) -> list[dt.datetime]:
    out = []
    while lo < hi:
        out.append(lo)
        lo += step
    return out


def history_of(
    se: Any, ent: lt.Metered, ent_id: str, frm: dt.datetime, to: dt.datetime, zone: str
) -> list[tuple[Any, ...]]:
    result = se.get_entitlement_history(
        ent.subject, ent_id, window_size="DAY", from_parameter=frm, to=to, window_time_zone=zone
    )
    return [
        (w.period.from_property.astimezone(UTC), w.period.to.astimezone(UTC), w.usage, w.balance_at_start)
        for w in result.windowed_history
    ]


def history_truth(
    ent: lt.Metered, events: Sequence[Sent], frm: dt.datetime, to: dt.datetime, zone: str
) -> list[tuple[Any, ...]]:
    return [(w.start, w.end, float(w.usage), float(w.balance_at_start)) for w in lt.history(ent, events, frm, to, zone)]


def exact_history(
    http: httpx.Client, ent: lt.Metered, ent_id: str, frm: dt.datetime, to: dt.datetime, zone: str
) -> list[tuple[Any, ...]]:
    params = {"windowSize": "DAY", "windowTimeZone": zone, "from": iso(frm), "to": iso(to)}
    body = exact(http.get(f"/api/v1/subjects/{ent.subject}/entitlements/{ent_id}/history", params=params))
    return [
        (
            dt.datetime.fromisoformat(w["period"]["from"]).astimezone(UTC),
            dt.datetime.fromisoformat(w["period"]["to"]).astimezone(UTC),
            w["usage"],
            w["balanceAtStart"],
        )
        for w in body["windowedHistory"]
    ]


# -- features --------------------------------------------------------------------------------------------


def test_features(client: Client, features: dict[str, Any]) -> None:
    premium = client.features.get(PREMIUM)
    assert (premium.key, premium.meter_slug, premium.meter_group_by_filters) == (
        PREMIUM,
        "tokens_total",
        {"model": "gpt-4o"},
    )
    assert client.features.get(features[SPEND].id).meter_slug == "cost_usd"
    listed = client.features.list()
    items = listed["items"] if isinstance(listed, dict) else listed
    assert set(features) <= {f["key"] for f in items}
    with pytest.raises(ResourceExistsError):
        client.features.create({"key": ALL_TOKENS, "name": "again", "meterSlug": "tokens_total"})


# -- DST: metered entitlements at past dates --------------------------------------------------------------


@dataclass
class EuEntitlements:
    tokens: lt.Metered
    premium: lt.Metered
    ids: dict[str, str] = field(default_factory=dict)


@pytest.fixture(scope="module")
def eu(se: Any, features: dict[str, Any], events: list[Sent]) -> EuEntitlements:
    tokens = lt.Metered("eu", "tokens_total", EU_TOKENS_PERIOD, EU_TOKENS_FROM, issue_after_reset=Decimal(9000))
    premium = lt.Metered(
        "eu",
        "tokens_total",
        EU_PREMIUM_PERIOD,
        EU_PREMIUM_FROM,
        filters={"model": "gpt-4o"},
        issue_after_reset=Decimal(20000),
    )
    out = EuEntitlements(tokens, premium)
    for key, ent in ((ALL_TOKENS, tokens), (PREMIUM, premium)):
        made = se.post(
            "eu",
            {
                "type": "metered",
                "featureKey": key,
                "issueAfterReset": int(ent.issue_after_reset or 0),
                "usagePeriod": {"interval": ent.period.interval, "anchor": iso(ent.period.anchor), "timeZone": BUD},
                "measureUsageFrom": iso(ent.measure_from),
            },
        )
        assert made["usagePeriod"]["timeZone"] == BUD
        assert made["usagePeriod"]["interval"] == ent.period.interval
        assert made["usagePeriod"]["anchor"] == iso(lt.minute(ent.period.anchor))
        assert made["measureUsageFrom"] == iso(ent.start)  # truncated to the minute
        out.ids[key] = made["id"]
    return out


EU_TIMES = sorted(
    {
        *around(EU_POINTS),
        EU_TOKENS_FROM - M,
        EU_DST - 30 * M,
        EU_DST + 30 * M,
        *grid(EU_START, EU_END, dt.timedelta(hours=5, minutes=13, seconds=7, microseconds=11)),
    }
)


def test_dst_day_period_value_equals_truth_and_query(
    se: Any, http: httpx.Client, eu: EuEntitlements, events: list[Sent]
) -> None:
    # The local days around the spring-forward: 24 h, 23 h, 24 h.
    assert eu_midnight(1) - eu_midnight(0) == 23 * H
    check_values(se, http, eu.tokens, ALL_TOKENS, events, EU_TIMES)


def test_dst_month_period_premium_counts_the_same_calls(
    se: Any, http: httpx.Client, eu: EuEntitlements, events: list[Sent]
) -> None:
    # Anchored on Jan 31: February's boundary is its last day, March's is the 31st (local midnights).
    assert EU_PREMIUM_PERIOD.boundary(1).astimezone(ZoneInfo(BUD)).day in (28, 29)
    assert EU_MONTH_END in (EU_PREMIUM_PERIOD.boundary(2), EU_PREMIUM_PERIOD.containing(EU_MONTH_END)[0])
    check_values(se, http, eu.premium, eu.ids[PREMIUM], events, EU_TIMES, decimals=True)
    # One gpt-4o call counts toward both features: just after it, both usages are up by its tokens.
    times = [e.time for e in events if e.subject == "eu"]
    call = next(
        e
        for e in events
        if e.subject == "eu"
        and e.model == "gpt-4o"
        and e.time > EU_TOKENS_FROM
        and times.count(e.time) == 1
        and lt.value(eu.tokens, events, e.time).period_start == lt.value(eu.tokens, events, e.time + US).period_start
    )
    deltas = []
    for key in (PREMIUM, ALL_TOKENS):
        before = se.get_entitlement_value("eu", key, time=call.time)
        after = se.get_entitlement_value("eu", key, time=call.time + US)
        deltas.append(after.usage - before.usage)
    assert deltas == [float(call.value("tokens_total"))] * 2


def test_dst_month_history_in_budapest(se: Any, http: httpx.Client, eu: EuEntitlements, events: list[Sent]) -> None:
    frm, to = eu_midnight(-2), EU_MONTH_END + 2 * D
    want = history_truth(eu.premium, events, frm, to, BUD)
    # Local days: the spring-forward day has 23 hours, and the month boundary starts a window.
    assert 23 * H in [w[1] - w[0] for w in want]
    assert EU_MONTH_END in [w[0] for w in want]
    assert history_of(se, eu.premium, eu.ids[PREMIUM], frm, to, BUD) == want
    exact_want = [(w.start, w.end, w.usage, w.balance_at_start) for w in lt.history(eu.premium, events, frm, to, BUD)]
    assert exact_history(http, eu.premium, eu.ids[PREMIUM], frm, to, BUD) == exact_want


@pytest.fixture(scope="module")
def ny(se: Any, features: dict[str, Any], events: list[Sent]) -> tuple[lt.Metered, str]:
    ent = lt.Metered("ny", "cost_usd", NY_PERIOD, NY_FROM, issue_after_reset=Decimal("0.05"))
    made = se.post(
        "ny",
        {
            "type": "metered",
            "featureKey": SPEND,
            "issueAfterReset": 0.05,
            "usagePeriod": {"interval": "DAY", "anchor": iso(NY_PERIOD.anchor), "timeZone": NYC},
            "measureUsageFrom": iso(NY_FROM),
        },
    )
    return ent, made["id"]


def test_dst_fall_back_cost_value_exact(
    se: Any, http: httpx.Client, ny: tuple[lt.Metered, str], events: list[Sent]
) -> None:
    ent, _ = ny
    assert ny_midnight(1) - ny_midnight(0) == 25 * H
    assert any(e.subject == "ny" and e.cost is None for e in events)
    times = sorted({*around(NY_POINTS), NY_DST - 30 * M, NY_DST + 30 * M, *grid(NY_START, NY_END, 197 * M + 3 * S)})
    check_values(se, http, ent, SPEND, events, times, decimals=True)


def test_dst_fall_back_history(se: Any, http: httpx.Client, ny: tuple[lt.Metered, str], events: list[Sent]) -> None:
    ent, ent_id = ny
    frm, to = ny_midnight(-1), ny_midnight(2)
    want = history_truth(ent, events, frm, to, NYC)
    assert [w[1] - w[0] for w in want] == [24 * H, 25 * H, 24 * H]
    assert history_of(se, ent, ent_id, frm, to, NYC) == want
    exact_want = [(w.start, w.end, w.usage, w.balance_at_start) for w in lt.history(ent, events, frm, to, NYC)]
    assert exact_history(http, ent, ent_id, frm, to, NYC) == exact_want


# -- the current period: grants, void, resets, override, delete ---------------------------------------------


@dataclass
class Cur:
    ent: lt.Metered
    id: str
    grants: dict[str, lt.Grant] = field(default_factory=dict)


def _grant_body(g: lt.Grant) -> dict[str, Any]:
    body: dict[str, Any] = {
        "amount": float(g.amount),
        "priority": g.priority,
        "effectiveAt": iso(g.effective_at),
        "expiration": {"duration": g.expiration[0], "count": g.expiration[1]},
        "minRolloverAmount": float(g.min_rollover),
        "maxRolloverAmount": float(g.max_rollover),
    }
    if g.recurrence is not None:
        body["recurrence"] = {
            "interval": g.recurrence.interval,
            "anchor": iso(g.recurrence.anchor),
            "timeZone": g.recurrence.zone,
        }
    return body


#: The grant that pays the overage built up before it.
G5_AMOUNT = Decimal("12000.5")
CUR_TIMES_STEP = dt.timedelta(hours=7, minutes=3, seconds=1, microseconds=7)


def cur_times(cur: Cur, lo: dt.datetime = CUR_A) -> list[dt.datetime]:
    points = [p for g in cur.ent.all_grants() for p in (g.start, g.end) if lo <= p <= NOW0 - M]
    points += [lt.minute(r.at) for r in cur.ent.resets]
    around_points = [t for t in around(points) if lo <= t <= NOW0 - M]
    return sorted({*around_points, *grid(lo, NOW0 - M, CUR_TIMES_STEP), NOW0 - M})


@pytest.fixture(scope="module")
def cur(se: Any, features: dict[str, Any], events: list[Sent]) -> Cur:
    ent = lt.Metered(
        "cur", "tokens_total", lt.Period("MONTH", CUR_A, NYC), CUR_A, issue_after_reset=Decimal(2000), issue_priority=10
    )
    made = se.post(
        "cur",
        {
            "type": "metered",
            "featureKey": ALL_TOKENS,
            "issueAfterReset": 2000,
            "issueAfterResetPriority": 10,
            "usagePeriod": {"interval": "MONTH", "anchor": iso(CUR_A), "timeZone": NYC},
            "measureUsageFrom": iso(CUR_A),
        },
    )
    out = Cur(ent, made["id"])
    wanted = {
        # Same priority: the earlier expiry burns first.
        "g1": lt.Grant(Decimal(3000), CUR_A + D, ("DAY", 3), priority=1),
        "g2": lt.Grant(Decimal(2500), CUR_A + D, ("DAY", 5), priority=1),
        # Voided later.
        "g3": lt.Grant(Decimal(4000), CUR_A + 2 * D + 5 * H, ("MONTH", 1), priority=2),
        # Back to 500 every local noon.
        "g4": lt.Grant(
            Decimal(500),
            CUR_A + 3 * D + 12 * H,
            ("WEEK", 1),
            priority=3,
            recurrence=lt.Period("DAY", CUR_A + 3 * D + 12 * H, NYC),
        ),
        # Pays the overage that built up before it; rolls over between 200 and 1000 at a reset.
        "g5": lt.Grant(
            G5_AMOUNT,
            CUR_A + 7 * D + 30 * M + 17 * S,
            ("DAY", 10),
            priority=4,
            min_rollover=Decimal(200),
            max_rollover=Decimal(1000),
        ),
    }
    for name, g in wanted.items():
        got = se.create_grant("cur", ALL_TOKENS if name != "g2" else made["id"], _grant_body(g))
        assert got.effective_at.astimezone(UTC) == g.start
        assert got.expires_at.astimezone(UTC) == g.expires_at
        g.id = got.id
        ent.grants.append(g)
        out.grants[name] = g
    return out


def test_grants_value_equals_truth(se: Any, http: httpx.Client, cur: Cur, events: list[Sent]) -> None:
    # The scenario has what it is meant to have: an overage before g5, paid when g5 starts.
    g5 = cur.grants["g5"].start
    before, at = lt.value(cur.ent, events, g5 - US), lt.value(cur.ent, events, g5)
    assert before.overage > 0
    assert at.overage == 0
    assert at.balance == G5_AMOUNT - before.overage
    check_values(se, http, cur.ent, ALL_TOKENS, events, cur_times(cur), decimals=True)


def test_grants_history_in_new_york(se: Any, http: httpx.Client, cur: Cur, events: list[Sent]) -> None:
    to = NOW0 - M
    want = history_truth(cur.ent, events, CUR_A, to, NYC)
    assert len(want) >= 10
    assert history_of(se, cur.ent, cur.id, CUR_A, to, NYC) == want
    # Windows in another zone than the period's (a half-hour offset): the first one starts mid-day.
    kolkata = "Asia/Kolkata"
    assert history_of(se, cur.ent, cur.id, CUR_A, to, kolkata) == history_truth(cur.ent, events, CUR_A, to, kolkata)


@pytest.fixture(scope="module")
def voided(client: Client, cur: Cur) -> Cur:
    g3 = cur.grants["g3"]
    at = CUR_A + 5 * D + 7 * H + 42 * S
    client.grants.delete(g3.id, at=at)
    g3.voided_at = at
    return cur


def test_voided_grant(se: Any, client: Client, http: httpx.Client, voided: Cur, events: list[Sent]) -> None:
    cur = voided
    g3 = cur.grants["g3"]
    live = {g.id for g in client.grants.list(subject=["cur"], feature=[ALL_TOKENS])}
    listed = {g.id: g for g in client.grants.list(subject=["cur"], feature=[ALL_TOKENS], include_deleted=True)}
    assert {g.id for g in cur.grants.values()} <= set(listed)
    assert g3.id not in live
    assert listed[g3.id].voided_at.astimezone(UTC) == lt.minute(g3.voided_at or NOW)
    own = {g.id for g in se.get_grants("cur", ALL_TOKENS)}
    assert own == live
    check_values(se, http, cur.ent, ALL_TOKENS, events, cur_times(cur))
    assert history_of(se, cur.ent, cur.id, CUR_A, NOW0 - M, NYC) == history_truth(cur.ent, events, CUR_A, NOW0 - M, NYC)


R1 = NOW0 - 2 * D - 3 * H - 13 * M + 27 * S
R2 = NOW0 - 20 * H + 5 * S


@pytest.fixture(scope="module")
def reset(se: Any, voided: Cur) -> Cur:
    cur = voided
    se.reset("cur", cur.id, {"effectiveAt": iso(R1)})  # re-anchors the month at R1
    cur.ent.resets.append(lt.Reset(R1))
    return cur


def _assert_period(se: Any, cur: Cur, events: Sequence[Sent]) -> None:
    state = lt.value(cur.ent, events, NOW)
    got = se.get("cur", cur.id)
    manual = [lt.minute(r.at) for r in cur.ent.resets]
    assert got["lastReset"] == iso(max(manual, default=cur.ent.start))
    assert got["currentUsagePeriod"] == {"from": iso(state.period_start), "to": iso(state.period_end)}


def test_reset_reanchors(se: Any, http: httpx.Client, reset: Cur, events: list[Sent]) -> None:
    cur = reset
    _assert_period(se, cur, events)
    assert lt.value(cur.ent, events, NOW).period_end == lt.shift(lt.minute(R1), NYC, months=1)
    # A reset must come after the last one; a grant cannot start before the current period.
    with pytest.raises(HttpResponseError) as info:
        se.reset("cur", cur.id, {"effectiveAt": iso(R1 - H)})
    assert info.value.status_code == 400
    with pytest.raises(HttpResponseError) as info:
        se.create_grant("cur", cur.id, _grant_body(lt.Grant(Decimal(1), R1 - H, ("DAY", 1))))
    assert info.value.status_code == 400
    check_values(se, http, cur.ent, ALL_TOKENS, events, cur_times(cur, R1 - 2 * H), decimals=True)


@pytest.fixture(scope="module")
def reset_retained(se: Any, reset: Cur) -> Cur:
    cur = reset
    g6 = lt.Grant(Decimal(700), R1 + H, ("HOUR", 30), priority=1)
    g6.id = se.create_grant("cur", cur.id, _grant_body(g6)).id
    cur.ent.grants.append(g6)
    cur.grants["g6"] = g6
    se.reset("cur", cur.id, {"effectiveAt": iso(R2), "retainAnchor": True})
    cur.ent.resets.append(lt.Reset(R2, retain_anchor=True))
    return cur


def test_reset_retaining_the_anchor(se: Any, http: httpx.Client, reset_retained: Cur, events: list[Sent]) -> None:
    cur = reset_retained
    _assert_period(se, cur, events)
    # The period still ends a month after R1, not after R2.
    assert lt.value(cur.ent, events, NOW).period_end == lt.shift(lt.minute(R1), NYC, months=1)
    check_values(se, http, cur.ent, ALL_TOKENS, events, cur_times(cur, R1 - H), decimals=True)
    for frm in (lt.minute(R1), CUR_A):  # from the reset, and across both resets
        assert history_of(se, cur.ent, cur.id, frm, NOW0 - M, NYC) == history_truth(cur.ent, events, frm, NOW0 - M, NYC)
    exact_want = [(w.start, w.end, w.usage, w.balance_at_start) for w in lt.history(cur.ent, events, CUR_A, NOW0, NYC)]
    assert exact_history(http, cur.ent, cur.id, CUR_A, NOW0, NYC) == exact_want


def test_override_and_delete(se: Any, http: httpx.Client, reset_retained: Cur, events: list[Sent]) -> None:
    cur = reset_retained
    anchor = NOW0 - 5 * H
    new = lt.Metered("cur", "tokens_total", lt.Period("DAY", anchor, NYC), anchor, issue_after_reset=Decimal(1500))
    made = se.override(
        "cur",
        ALL_TOKENS,
        {
            "type": "metered",
            "featureKey": ALL_TOKENS,
            "issueAfterReset": 1500,
            "usagePeriod": {"interval": "DAY", "anchor": iso(anchor), "timeZone": NYC},
            "measureUsageFrom": iso(anchor),
        },
    )
    assert made["id"] != cur.id
    with pytest.raises(ResourceNotFoundError):
        se.get("cur", cur.id)
    old = [e for e in se.list("cur", include_deleted=True) if e["id"] == cur.id]
    assert len(old) == 1
    assert "deletedAt" in old[0]
    # The old grants stay with the old entitlement.
    assert not {g.id for g in cur.grants.values()} & {g.id for g in se.get_grants("cur", ALL_TOKENS)}
    times = [anchor - US, anchor, *grid(anchor, NOW0 - M, 37 * M + 11 * S), NOW0 - M]
    check_values(se, http, new, ALL_TOKENS, events, times, decimals=True)

    se.delete("cur", made["id"])
    with pytest.raises(ResourceNotFoundError):
        se.get_entitlement_value("cur", ALL_TOKENS)
    assert ALL_TOKENS not in {e["featureKey"] for e in se.list("cur")}
    # Deleted: a new one may be made; measured from NOW, it has no usage yet.
    again = se.post(
        "cur", {"type": "metered", "featureKey": ALL_TOKENS, "issueAfterReset": 10, "usagePeriod": {"interval": "DAY"}}
    )
    started = dt.datetime.fromisoformat(again["measureUsageFrom"])
    assert NOW0 <= started <= lt.minute(dt.datetime.now(UTC))
    fresh = lt.Metered("cur", "tokens_total", lt.Period("DAY", started), started, issue_after_reset=Decimal(10))
    got = se.get_entitlement_value("cur", again["id"])
    assert as_float_value(got) == as_float(lt.value(fresh, events, dt.datetime.now(UTC)))


def test_boolean_and_static(se: Any, client: Client, features: dict[str, Any]) -> None:
    boolean = se.post("cur", {"type": "boolean", "featureKey": SSO})
    static = se.post("cur", {"type": "static", "featureKey": LIMITS_CFG, "config": '{"seats": 5}'})
    assert (boolean["type"], static["type"], static["config"]) == ("boolean", "static", '{"seats": 5}')
    assert se.get_entitlement_value("cur", SSO).has_access is True
    value = se.get_entitlement_value("cur", LIMITS_CFG)
    assert (value.has_access, value.config) == (True, '{"seats": 5}')
    with pytest.raises(ResourceExistsError):
        se.post("cur", {"type": "boolean", "featureKey": SSO})
    listed = client.entitlements.list(subject=["cur"], feature=[SSO, LIMITS_CFG])
    items = listed["items"] if isinstance(listed, dict) else listed
    assert {(e["featureKey"], e["type"]) for e in items} == {(SSO, "boolean"), (LIMITS_CFG, "static")}
    assert client.entitlements.get(static["id"])["config"] == '{"seats": 5}'
    # A metered entitlement needs a feature with a meter.
    with pytest.raises(HttpResponseError) as info:
        se.post("other", {"type": "metered", "featureKey": SSO, "usagePeriod": {"interval": "DAY"}})
    assert info.value.status_code == 400


# -- plans -----------------------------------------------------------------------------------------------


def _plan(key: str, entitlements: list[dict[str, Any]]) -> dict[str, Any]:
    return {"name": key.title(), "entitlements": entitlements}


PLAN_PERIOD = {"interval": "DAY", "anchor": iso(PLAN_ANCHOR)}
BASIC = _plan(
    "basic",
    [
        {"type": "metered", "featureKey": "plan_tokens", "issueAfterReset": 1000, "usagePeriod": PLAN_PERIOD},
        {"type": "boolean", "featureKey": "plan_sso"},
    ],
)
PRO = _plan(
    "pro",
    [
        {"type": "metered", "featureKey": "plan_tokens", "issueAfterReset": 5000, "usagePeriod": PLAN_PERIOD},
        {"type": "static", "featureKey": "plan_cfg", "config": '{"seats": 20}'},
    ],
)


def plan_truth(subject: str, amount: int) -> lt.Metered:
    """A plan template's entitlement: usage counts from the start of the current period."""
    period = lt.Period("DAY", PLAN_ANCHOR)
    return lt.Metered(subject, "tokens_total", period, period.containing(NOW)[0], issue_after_reset=Decimal(amount))


def assign(http: httpx.Client, subject: str, plan: str) -> dict[str, str]:
    body = exact(http.put(f"/api/v1/subjects/{subject}/plan", json={"planKey": plan}))
    assert (body["subjectKey"], body["planKey"], body["isDefault"]) == (subject, plan, False)
    return {e["featureKey"]: e["id"] for e in body["entitlements"]}


def check_plan_values(se: Any, http: httpx.Client, subject: str, amount: int, events: list[Sent]) -> None:
    times = [PLAN_ANCHOR - US, PLAN_ANCHOR, *grid(PLAN_ANCHOR, NOW0 - M, 9 * M + 1 * S), NOW0 - M]
    check_values(se, http, plan_truth(subject, amount), "plan_tokens", events, times, decimals=True)


def test_plans_assign_is_idempotent_and_a_plan_change_takes_effect_at_once(
    se: Any, http: httpx.Client, features: dict[str, Any], events: list[Sent]
) -> None:
    created = http.put("/api/v1/plans/basic", json=BASIC)
    assert created.status_code == 201, created.text
    assert created.json()["version"] == 1
    again = http.put("/api/v1/plans/basic", json=BASIC)
    assert (again.status_code, again.json()["version"]) == (200, 1)
    assert http.put("/api/v1/plans/pro", json=PRO).status_code == 201

    first = assign(http, "plan-a", "basic")
    assert set(first) == {"plan_tokens", "plan_sso"}
    assert assign(http, "plan-a", "basic") == first  # idempotent: the same entitlements
    assert {e["id"] for e in se.list("plan-a")} == set(first.values())
    check_plan_values(se, http, "plan-a", 1000, events)
    now = dt.datetime.now(UTC)
    assert lt.value(plan_truth("plan-a", 1000), events, now).has_access is False  # 3200 of 1000 used
    assert as_float_value(se.get_entitlement_value("plan-a", "plan_tokens")) == as_float(
        lt.value(plan_truth("plan-a", 1000), events, now)
    )

    # Another plan: the changed template is remade (its usage brought along), the removed one ends.
    second = assign(http, "plan-a", "pro")
    assert set(second) == {"plan_tokens", "plan_cfg"}
    assert second["plan_tokens"] != first["plan_tokens"]
    assert {e["featureKey"] for e in se.list("plan-a")} == {"plan_tokens", "plan_cfg"}
    ended = {e["id"] for e in se.list("plan-a", include_deleted=True) if "deletedAt" in e}
    assert ended == {first["plan_tokens"], first["plan_sso"]}
    check_plan_values(se, http, "plan-a", 5000, events)
    now = dt.datetime.now(UTC)
    assert lt.value(plan_truth("plan-a", 5000), events, now).has_access is True
    assert as_float_value(se.get_entitlement_value("plan-a", "plan_tokens")) == as_float(
        lt.value(plan_truth("plan-a", 5000), events, now)
    )
    assert se.get_entitlement_value("plan-a", "plan_cfg").config == '{"seats": 20}'
    with pytest.raises(ResourceNotFoundError):
        se.get_entitlement_value("plan-a", "plan_sso")


def test_plan_new_version_reaches_its_subjects(se: Any, http: httpx.Client, events: list[Sent]) -> None:
    before = assign(http, "plan-b", "basic")
    check_plan_values(se, http, "plan-b", 1000, events)
    changed = _plan("basic", [dict(BASIC["entitlements"][0], issueAfterReset=1500), BASIC["entitlements"][1]])
    put = exact(http.put("/api/v1/plans/basic", json=changed))
    assert put["version"] == 2
    # The subject's next request sees the new version.
    check_plan_values(se, http, "plan-b", 1500, events)
    now = {e["featureKey"]: e["id"] for e in se.list("plan-b")}
    assert now["plan_sso"] == before["plan_sso"]  # unchanged template: kept
    assert now["plan_tokens"] != before["plan_tokens"]
    assignment = exact(http.get("/api/v1/subjects/plan-b/plan"))
    assert (assignment["planKey"], assignment["planVersion"]) == ("basic", 2)


def test_plan_hand_made_entitlement_wins(se: Any, http: httpx.Client, events: list[Sent]) -> None:
    own = se.post("plan-c", {"type": "boolean", "featureKey": "plan_sso"})
    ids = assign(http, "plan-c", "basic")
    assert ids["plan_sso"] == own["id"]
    assert "annotations" not in se.get("plan-c", own["id"])
    check_plan_values(se, http, "plan-c", 1500, events)


# -- subjects --------------------------------------------------------------------------------------------


def test_subjects(client: Client, events: list[Sent]) -> None:
    made = client.subjects.upsert([{"key": "acme", "displayName": "Acme", "metadata": {"tier": "gold"}}])
    assert [(s.key, s.display_name) for s in made] == [("acme", "Acme")]
    client.subjects.upsert([{"key": "acme", "displayName": "Acme Corp", "metadata": {"tier": "gold"}}])
    acme = client.subjects.get("acme")
    assert (acme.key, acme.display_name, dict(acme.metadata)) == ("acme", "Acme Corp", {"tier": "gold"})
    assert client.subjects.get(acme.id).key == "acme"
    keys = {s.key for s in client.subjects.list()}
    # Every subject that only ever appeared in usage events is listed too.
    assert {"acme", *{e.subject for e in events}} <= keys
    only_events = client.subjects.get("events-only")
    assert only_events.key == "events-only"
    client.subjects.delete("acme")
    with pytest.raises(ResourceNotFoundError):
        client.subjects.get("acme")
    assert "acme" not in {s.key for s in client.subjects.list()}


def test_subject_paths_take_its_id_or_its_key(http: httpx.Client, features: dict[str, Any], events: list[Sent]) -> None:
    """OpenMeter's ``subjectIdOrKey``: a stored subject's entitlement paths answer the same for its id as
    for its key."""

    def created(response: httpx.Response) -> Any:
        assert response.status_code == 201, response.text
        return response.json()

    (made,) = exact(http.post("/api/v1/subjects", json=[{"key": "by-id"}]))
    made_ent = created(
        http.post(f"/api/v1/subjects/{made['id']}/entitlements", json={"type": "boolean", "featureKey": SSO})
    )
    assert made_ent["subjectKey"] == "by-id"
    by_key = exact(http.get("/api/v1/subjects/by-id/entitlements"))
    assert [e["id"] for e in by_key] == [made_ent["id"]]
    assert exact(http.get(f"/api/v1/subjects/{made['id']}/entitlements")) == by_key
    assert exact(http.get(f"/api/v1/subjects/{made['id']}/entitlements/{SSO}/value"))["hasAccess"] is True
    # A key shaped like an id that no subject has stays a key.
    ulid_key = "01ARZ3NDEKTSV4RRFFQ69G5FAV"
    created(http.post(f"/api/v1/subjects/{ulid_key}/entitlements", json={"type": "boolean", "featureKey": SSO}))
    assert exact(http.get(f"/api/v1/subjects/{ulid_key}/entitlements"))[0]["subjectKey"] == ulid_key


# -- the default plan (last: once it exists it applies to every subject without a plan) --------------------


def test_default_plan_for_a_brand_new_subject(
    se: Any, stack: LocalStack, http: httpx.Client, features: dict[str, Any], events: list[Sent]
) -> None:
    starter = _plan(
        DEFAULT_PLAN,
        [
            {"type": "metered", "featureKey": "plan_tokens", "issueAfterReset": 300, "usagePeriod": PLAN_PERIOD},
            {"type": "boolean", "featureKey": "plan_sso"},
        ],
    )
    assert http.put(f"/api/v1/plans/{DEFAULT_PLAN}", json=starter).status_code == 201
    # The first requests of a brand-new subject, all at once: its entitlements are made exactly once.
    barrier = threading.Barrier(8)
    answers: list[Any] = []
    lock = threading.Lock()

    def first_request() -> None:
        own = subject_entitlements(Client(endpoint=stack.url, retry_total=0))
        barrier.wait()
        got = own.get_entitlement_value("newbie", "plan_tokens", time=NOW0 - M)
        with lock:
            answers.append(as_float_value(got))

    threads = [threading.Thread(target=first_request) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    want = as_float(lt.value(plan_truth("newbie", 300), events, NOW0 - M))
    assert answers == [want] * 8
    made = se.list("newbie", include_deleted=True)
    assert sorted(e["featureKey"] for e in made) == ["plan_sso", "plan_tokens"]
    assert all("deletedAt" not in e for e in made)
    assignment = exact(http.get("/api/v1/subjects/newbie/plan"))
    assert (assignment["planKey"], assignment["isDefault"]) == (DEFAULT_PLAN, True)
    check_plan_values(se, http, "newbie", 300, events)
    # A subject with no usage at all gets it too; a subject on a plan keeps its own.
    ghost = se.get_entitlement_value("ghost", "plan_tokens", time=NOW0 - M)
    assert as_float_value(ghost) == as_float(lt.value(plan_truth("ghost", 300), events, NOW0 - M))
    assert exact(http.get("/api/v1/subjects/plan-a/plan"))["planKey"] == "pro"
    assert {e["featureKey"] for e in se.list("plan-a")} == {"plan_tokens", "plan_cfg"}


def as_float_value(v: Any) -> tuple[Any, ...]:
    return (v.has_access, v.balance, v.usage, v.overage, v.total_available_grant_amount)
