"""The usage pages in a real browser (Debian's chromium through chromedriver) against the real local stack
with authentication on: every number a page shows equals the API's answer for the same range and zone (a
range across the end of DST in America/New_York, duplicates sent), charts are drawn, tables download as
CSV, the end user's portal page and widget show their own subject only, no console errors, phone width,
labels and contrast; a screenshot of each view is saved (METERSTREAM_SCREENSHOTS=<dir> keeps them: the
README's images are made so)."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import random
import shlex
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service as DriverService
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver

from tests.helpers.events import iso
from tests.helpers.stack import LocalStack
from tests.helpers.webhooks import Receiver, receiving

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ZONE = "America/New_York"  # DST ends 2026-11-01 at 06:00Z: that local day has 25 hours
FROM, TO = "2026-10-25", "2026-11-07"  # local dates, inclusive
RANGE = {"from": "2026-10-25T04:00:00Z", "to": "2026-11-08T05:00:00Z"}  # their midnights, by hand
METERS = (
    "requests",
    "tokens_total",
    "input_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
    "cost_usd",
    "unpriced_requests",
)
#: Names a page must show as text, never run: markup, a spreadsheet formula, a quote.
NASTY = ('<img src=x onerror="window.__xss=1">', '=HYPERLINK("http://evil.example")', "o'brien")
SUBJECTS = ("alice", "bob", *(f"user-{i:02d}" for i in range(22)), *NASTY)
MODELS = (("openai", "gpt-4o-mini"), ("openai", "gpt-4o"), ("anthropic", "claude-sonnet-4-5"), ("acme", "no-price-1"))


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with receiving() as r:
        yield r


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    env = {
        "METERSTREAM_LOCAL_AUTH__ENABLED": "true",
        "METERSTREAM_LOCAL_AUTH__FAILED_AUTH_PER_MINUTE": "0",
        "METERSTREAM_LOCAL_ALERTS__ALLOW_PRIVATE_URLS": "true",
        "METERSTREAM_PROCESSOR_ALLOWED_LATENESS_S": str(3 * 365 * 86400),
    }
    s = LocalStack(tmp_path_factory.mktemp("ui") / "data", env=env).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def admin(stack: LocalStack) -> Iterator[httpx.Client]:
    key = (stack.data_dir / "admin.key").read_text().strip()
    with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
        yield client


def event(subject: str, at: dt.datetime, rng: random.Random, event_id: str | None = None) -> dict[str, Any]:
    provider, model = rng.choice(MODELS)
    return {
        "specversion": "1.0",
        "id": event_id or uuid.uuid4().hex,
        "source": "ui-test",
        "type": "llm.usage",
        "subject": subject,
        "time": iso(at),
        "data": {
            "provider": provider,
            "model": model,
            "input_tokens": rng.randrange(1_000, 20_000),
            "output_tokens": rng.randrange(20, 2_000),
            "cache_read_tokens": rng.choice([0, 0, rng.randrange(1, 400)]),
            "cache_write_tokens": rng.choice([0, 0, 0, rng.randrange(1, 300)]),
            "reasoning_tokens": rng.choice([0, rng.randrange(1, 15)]),
        },
    }


def ingest(http: httpx.Client, events: list[dict[str, Any]]) -> None:
    r = http.post("/api/v1/events", json=events, headers={"content-type": "application/cloudevents-batch+json"})
    assert r.status_code == 204, r.text


def query(http: httpx.Client, meter: str, **params: Any) -> list[dict[str, Any]]:
    r = http.get(f"/api/v1/meters/{meter}/query", params=params)
    assert r.status_code == 200, r.text
    return list(r.json(parse_float=Decimal, parse_int=Decimal)["data"])


def windowed(http: httpx.Client, **extra: Any) -> dict[str, dict[str, str]]:
    """window start -> meter -> value as the API wrote it (its JSON text), for the overview's range in its zone."""
    out: dict[str, dict[str, str]] = {}
    for meter in METERS:
        r = http.get(
            f"/api/v1/meters/{meter}/query", params={"windowSize": "DAY", "windowTimeZone": ZONE, **RANGE, **extra}
        )
        assert r.status_code == 200, r.text
        for row in json.loads(r.text, parse_float=str, parse_int=str)["data"]:
            out.setdefault(row["windowStart"], {})[meter] = row["value"]
    return out


def local_days(days: int, zone: str) -> dict[str, str]:
    """The API range of a page's default: the last ``days`` local days in ``zone``, today included."""
    tz = ZoneInfo(zone)
    today = dt.datetime.now(tz).date()
    start = dt.datetime.combine(today - dt.timedelta(days=days - 1), dt.time(), tz)
    end = dt.datetime.combine(today + dt.timedelta(days=1), dt.time(), tz)
    return {"from": iso(start.astimezone(dt.UTC)), "to": iso(end.astimezone(dt.UTC))}


@pytest.fixture(scope="module")
def seeded(stack: LocalStack, admin: httpx.Client, receiver: Receiver) -> dict[str, Any]:
    """Usage over the range (and outside it) for 24 subjects, some events sent twice; alice and bob have a
    metered feature, an alert rule fires for alice, alice holds a reservation."""
    rng = random.Random(20)
    start = dt.datetime(2026, 10, 23, tzinfo=dt.UTC)
    events = []
    for i in range(900):
        at = start + dt.timedelta(seconds=rng.randrange(18 * 86400))
        subject = SUBJECTS[0] if i % 7 == 0 else rng.choice(SUBJECTS)
        events.append(event(subject, at, rng))
    ingest(admin, events)
    ingest(admin, rng.sample(events, 60))  # duplicates: counted once

    r = admin.post("/api/v1/features", json={"key": "tokens", "name": "LLM tokens", "meterSlug": "tokens_total"})
    assert r.status_code == 201, r.text
    channel = admin.post("/api/v1/notification/channels", json={"type": "WEBHOOK", "name": "hook", "url": receiver.url})
    assert channel.status_code == 201, channel.text
    rule = admin.post(
        "/api/v1/notification/rules",
        json={
            "type": "entitlements.balance.threshold",
            "name": "half the budget",
            "channels": [channel.json()["id"]],
            "features": ["tokens"],
            "thresholds": [{"type": "usage_percentage", "value": 50}],
        },
    )
    assert rule.status_code == 201, rule.text
    since = iso((dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)).replace(second=0, microsecond=0))
    for subject in ("alice", "bob"):
        r = admin.post(
            f"/api/v1/subjects/{subject}/entitlements",
            json={
                "type": "metered",
                "featureKey": "tokens",
                "issueAfterReset": 100_000,
                "usagePeriod": {"interval": "MONTH", "anchor": since},
                "measureUsageFrom": since,
            },
        )
        assert r.status_code == 201, r.text
    now = dt.datetime.now(dt.UTC)
    recent = [event("alice", now - dt.timedelta(minutes=5), rng) for _ in range(8)]
    for e in recent:
        e["data"] |= {"provider": "openai", "model": "gpt-4o-mini", "input_tokens": 7_000, "output_tokens": 500}
    ingest(admin, [*recent, event("bob", now - dt.timedelta(minutes=3), rng)])
    deadline = time.monotonic() + 30
    while not any(rec.payload["data"]["subject"]["key"] == "alice" for rec in receiver.received):
        assert time.monotonic() < deadline, "alice's 50% alert never arrived"
        time.sleep(0.2)
    hold = admin.post("/api/v1/subjects/alice/reservations", json={"amounts": {"tokens": 1234}, "ttlSeconds": 3600})
    assert hold.status_code in (200, 201), hold.text

    keys = {}
    for scope in ("read", "ingest"):
        r = admin.post("/api/v1/keys", json={"name": f"ui-{scope}", "scopes": [scope]})
        assert r.status_code == 201, r.text
        keys[scope] = r.json()["key"]
    r = admin.post("/api/v1/portal/tokens", json={"subject": "alice"})
    assert r.status_code == 200, r.text
    keys["portal"] = r.json()["token"]
    # Every event is stored before the pages are read (the query API is the judge, so it must be settled).
    total = len({e["id"] for e in events}) + len(recent) + 1
    deadline = time.monotonic() + 60
    while sum(row["value"] for row in query(admin, "requests")) != total:
        assert time.monotonic() < deadline, "the seeded events were never all stored"
        time.sleep(0.3)
    return keys


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        if os.environ.get("CI"):
            pytest.fail("chromium and chromedriver are missing: `make browser` installs them (Debian packages)")
        pytest.skip("chromium and chromedriver are not installed: `make browser` installs them")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp("chromium-profile")
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        # A loaded machine must not make Chrome treat its one window as hidden (occluded) or throttle it.
        "--disable-backgrounding-occluded-windows",
        "--disable-renderer-backgrounding",
        "--disable-background-timer-throttling",
        "--window-size=1280,1000",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # The browser's own zone is UTC (the portal page shows days in it); the operator pages are told theirs.
    service = DriverService(CHROMEDRIVER, env={**os.environ, "TZ": "UTC"})
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Callable[[WebDriver, str], Path]:
    folder = tmp_path_factory.mktemp("screenshots")
    keep = os.environ.get("METERSTREAM_SCREENSHOTS")

    def take(driver: WebDriver, name: str) -> Path:
        path = folder / f"{name}.png"
        assert driver.save_screenshot(str(path)), f"no screenshot of {name}"
        assert path.stat().st_size > 5_000
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(keep) / path.name)
        return path

    return take


def errors_in_console(driver: WebDriver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]


def wait_state(driver: WebDriver, state: str = "ready", timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (got := driver.execute_script("return document.body.dataset.state")) != state:
        status = driver.execute_script(
            "return `${(document.getElementById('status') || {}).textContent} (${document.visibilityState}, "
            "sign-in shown: ${!!document.getElementById('sign-in') && !document.getElementById('sign-in').hidden})`"
        )
        assert time.monotonic() < deadline, f"page state {got!r}, not {state!r}: {status}"
        time.sleep(0.05)


def open_signed_in(driver: WebDriver, url: str, key: str) -> None:
    """An operator page, signed in with ``key`` if the tab holds no key yet (tests may run in any order)."""
    driver.get(url)
    if driver.find_element(By.ID, "sign-in").is_displayed():
        sign_in(driver, key)
    wait_state(driver)


def sign_in(driver: WebDriver, key: str) -> None:
    box = driver.find_element(By.ID, "key")
    assert box.is_displayed(), "a page with authentication on asks for a key first"
    assert box == driver.switch_to.active_element, "the key field has the focus"
    box.send_keys(key + Keys.ENTER)


def shown_number(value: str, money: bool) -> str:
    """How a page writes an exact number: the integer part grouped by thousands, every fraction digit kept."""
    whole, _, fraction = value.lstrip("-").partition(".")
    text = f"{int(whole):,}" + (f".{fraction}" if fraction else "")
    return ("-" if value.startswith("-") else "") + ("$" if money else "") + text


def texts(driver: WebDriver, table_id: str) -> list[dict[str, str]]:
    """Each row of a table as column key -> the text a person reads in the cell."""
    rows: list[dict[str, str]] = driver.execute_script(
        """return [...document.querySelectorAll(`#${arguments[0]} tbody tr`)].map(tr =>
             Object.fromEntries([...tr.querySelectorAll('td')].map(td => [td.dataset.key, td.textContent])));""",
        table_id,
    )
    return rows


def table(driver: WebDriver, table_id: str) -> list[dict[str, str]]:
    """Each row of a table as column key -> the raw value the page holds for the cell (data-value)."""
    rows: list[dict[str, str]] = driver.execute_script(
        """return [...document.querySelectorAll(`#${arguments[0]} tbody tr`)].map(tr =>
             Object.fromEntries([...tr.querySelectorAll('td')].map(td => [td.dataset.key, td.dataset.value])));""",
        table_id,
    )
    return rows


def charts_drawn(driver: WebDriver) -> list[int]:
    """Coloured pixels on each chart's canvas (a blank canvas has none)."""
    counts: list[int] = driver.execute_script(
        """return [...document.querySelectorAll('.chart canvas')].map(c => {
             const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
             let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n; });"""
    )
    return counts


CONTRAST = """
const channel = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; };
const lum = (rgb) => { const [r, g, b] = rgb.map(channel); return 0.2126 * r + 0.7152 * g + 0.0722 * b; };
const parse = (c) => c.match(/[\\d.]+/g).map(Number);
const background = (el) => { for (; el; el = el.parentElement) { const c = parse(getComputedStyle(el).backgroundColor);
  if (c.length < 4 || c[3] > 0.5) return c.slice(0, 3); } return [255, 255, 255]; };
const low = [];
for (const el of document.querySelectorAll('body *')) {
  if (!el.offsetParent || el.closest('.uplot .u-axis')) continue;
  if (![...el.childNodes].some(n => n.nodeType === 3 && n.textContent.trim())) continue;
  const fg = lum(parse(getComputedStyle(el).color)), bg = lum(background(el));
  const ratio = (Math.max(fg, bg) + 0.05) / (Math.min(fg, bg) + 0.05);
  const text = el.textContent.trim().slice(0, 30);
  if (ratio < 4.5) low.push(`${el.tagName}.${el.className} "${text}" ${ratio.toFixed(2)}`);
}
return low;
"""

UNLABELLED = """
return [...document.querySelectorAll('input:not([type=hidden]), select, button')].filter(el => el.offsetParent &&
  !(el.labels && el.labels.length) && !el.getAttribute('aria-label') && !el.textContent.trim()).map(el => el.outerHTML);
"""


def check_page(driver: WebDriver) -> None:
    assert errors_in_console(driver) == []
    assert driver.execute_script(CONTRAST) == [], "text below WCAG AA contrast"
    assert driver.execute_script(UNLABELLED) == [], "controls without a label"


def overview_url(stack: LocalStack, **extra: str) -> str:
    return f"{stack.url}/ui/?" + urlencode({"from": FROM, "to": TO, "window": "DAY", "tz": ZONE, **extra})


def test_the_overview_shows_the_query_apis_answers(
    stack: LocalStack, admin: httpx.Client, seeded: dict[str, str], browser: WebDriver, shots: Any, tmp_path: Path
) -> None:
    browser.get(overview_url(stack))
    browser.execute_script("sessionStorage.clear()")  # signed out, whatever ran before
    browser.get(overview_url(stack))
    sign_in(browser, seeded["read"])
    wait_state(browser)
    shots(browser, "overview")

    api = windowed(admin)
    assert len(api) == 14, "fourteen local days, one of them 25 hours long"
    assert {w[-6:] for w in api} == {"-04:00", "-05:00"}, "windows start at local midnight on both sides of DST"
    rows = table(browser, "windows")
    assert [r["windowStart"] for r in rows] == sorted(api, key=dt.datetime.fromisoformat)
    for row, read in zip(rows, texts(browser, "windows"), strict=True):
        for meter in METERS:
            assert row[meter] == api[row["windowStart"]].get(meter, "0"), "exactly as the API wrote it"
            assert read[meter] == shown_number(row[meter], meter == "cost_usd"), "and shown with every digit"
    cards = browser.execute_script(
        "return Object.fromEntries([...document.querySelectorAll('[data-total]')].map(c => "
        "[c.dataset.total, c.dataset.value]))"
    )
    for meter, shown in cards.items():
        (total,) = query(admin, meter, windowTimeZone=ZONE, **RANGE)  # the unwindowed answer: one row
        assert Decimal(shown) == total["value"], meter
    assert Decimal(cards["unpriced_requests"]) > 0
    assert "warn" in browser.find_element(By.CSS_SELECTOR, '[data-total="unpriced_requests"]').get_attribute("class")

    by_model: dict[tuple[str, str], dict[str, Decimal]] = {}
    for meter in ("requests", "tokens_total", "cost_usd", "unpriced_requests"):
        for r in query(admin, meter, groupBy=["provider", "model"], **RANGE):
            by_model.setdefault((r["groupBy"]["provider"], r["groupBy"]["model"]), {})[meter] = r["value"]
    shown_models = table(browser, "models")
    assert {(r["provider"], r["model"]) for r in shown_models} == set(by_model) == set(MODELS)
    for r in shown_models:
        for meter in ("requests", "tokens_total", "cost_usd", "unpriced_requests"):
            assert Decimal(r[meter]) == by_model[(r["provider"], r["model"])][meter]
        assert (r["priced"] == "yes") == (r["model"] != "no-price-1"), "the unpriced model is flagged"

    costs = {r["subject"]: r["value"] for r in query(admin, "cost_usd", groupBy=["subject"], **RANGE)}
    shown_subjects = table(browser, "subjects")
    assert len(shown_subjects) == 20
    assert [r["subject"] for r in shown_subjects] == sorted(costs, key=lambda s: -costs[s])[:20]
    total_cost = sum(costs.values())
    for r in shown_subjects:
        assert Decimal(r["cost_usd"]) == costs[r["subject"]]
        share = costs[r["subject"]] / total_cost * 100
        assert r["share"].endswith("%") and abs(Decimal(r["share"][:-1]) - share) <= Decimal("0.05"), r["share"]

    assert len(charts_drawn(browser)) == 2
    assert all(n > 500 for n in charts_drawn(browser)), "both charts are drawn"
    check_page(browser)

    # The CSV download holds what the table shows, every subject included.
    browser.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(tmp_path)})
    browser.find_element(By.CSS_SELECTOR, "#subjects-table button.csv").click()
    target = tmp_path / "usage-by-subject.csv"
    deadline = time.monotonic() + 10
    while not target.exists():
        assert time.monotonic() < deadline, "no CSV was downloaded"
        time.sleep(0.1)
    downloaded = list(csv.DictReader(io.StringIO(target.read_text())))
    # A name a spreadsheet would run as a formula is written with a leading ' (and only such a name).
    unformula = {("'" + n if n.startswith("=") else n): n for n in costs}
    assert {unformula[r["subject"]]: Decimal(r["cost_usd"]) for r in downloaded} == costs
    assert "'" + NASTY[1] in {r["subject"] for r in downloaded}
    assert browser.execute_script("return window.__xss") is None
    assert browser.find_elements(By.CSS_SELECTOR, "td img") == [], "markup in a name is shown as text"


def test_a_subjects_page_shows_its_usage_entitlements_alerts_and_events(
    stack: LocalStack, admin: httpx.Client, seeded: dict[str, str], browser: WebDriver, shots: Any
) -> None:
    open_signed_in(browser, f"{stack.url}/ui/?" + urlencode({"from": FROM, "to": TO, "tz": ZONE}), seeded["read"])
    browser.find_element(By.LINK_TEXT, "alice").click()
    wait_state(browser)
    assert "subject=alice" in browser.current_url
    shots(browser, "subject")

    api = windowed(admin, subject="alice")
    rows = table(browser, "windows")
    assert len(rows) == len(api) > 0
    for row in rows:
        for meter in METERS:
            assert row[meter] == api[row["windowStart"]].get(meter, "0")

    (ent,) = table(browser, "entitlements")
    value = admin.get("/api/v1/subjects/alice/entitlements/tokens/value").json(parse_float=Decimal, parse_int=Decimal)
    assert ent["feature"] == "tokens"
    assert Decimal(ent["usage"]) == value["usage"] == 60_000
    assert Decimal(ent["reserved"]) == value["reserved"] == 1234, "the hold in flight is shown"
    assert Decimal(ent["balance"]) == value["balance"]

    alerts = table(browser, "alerts")  # the range is October's: none in it
    assert alerts == []
    open_signed_in(
        browser, f"{stack.url}/ui/subject?subject=alice&tz={ZONE}", seeded["read"]
    )  # the last 30 days: the 50% alert
    recent = local_days(30, ZONE)
    browser.execute_script("document.getElementById('entitlements-title').scrollIntoView()")
    shots(browser, "subject-limits")
    (alert,) = table(browser, "alerts")
    listed = admin.get("/api/v1/notification/events", params={"subject": "alice"}).json()["items"]
    assert alert["id"] == listed[0]["id"]
    assert alert["kind"] == "threshold crossed" and alert["threshold"] == "50 (usage_percentage)"

    events = admin.get("/api/v1/events", params={"subject": "alice", "limit": 100, **recent}).json()
    shown = table(browser, "events")
    assert [r["id"] for r in shown] == [e["event"]["id"] for e in events]
    assert len(shown) >= 8
    assert all(r["priceSource"] for r in shown), "every event says where its price came from, or that it has none"
    check_page(browser)


def test_an_end_users_portal_page_and_widget_show_their_own_subject_only(
    stack: LocalStack, admin: httpx.Client, seeded: dict[str, str], browser: WebDriver, shots: Any
) -> None:
    token = seeded["portal"]
    browser.get(f"{stack.url}/ui/portal?subject=bob#token={token}")
    wait_state(browser)
    assert token not in browser.current_url, "the token is taken out of the address bar"
    shots(browser, "portal")
    value = admin.get("/api/v1/subjects/alice/entitlements/tokens/value").json(parse_float=Decimal, parse_int=Decimal)
    shown = browser.execute_script(
        "const q = document.querySelector('[data-feature=tokens]');"
        "return [q.querySelector('[data-balance]').dataset.balance, q.querySelector('[data-usage]').dataset.usage];"
    )
    assert [Decimal(v) for v in shown] == [value["balance"], value["usage"]]
    days = table(browser, "days")
    mine = query(
        admin, "tokens_total", subject="alice", windowSize="DAY", windowTimeZone="UTC", **local_days(30, "UTC")
    )
    assert {r["windowStart"]: Decimal(r["value"]) for r in days} == {r["windowStart"]: r["value"] for r in mine}
    assert len(days) > 0
    assert all(n > 100 for n in charts_drawn(browser))
    others = [s for s in SUBJECTS if s != "alice"]
    asked = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert any("/api/v1/portal/me" in url for url in asked)
    source = browser.page_source + " ".join(asked)
    assert not [s for s in others if s in source], "nothing of another subject on alice's page"
    check_page(browser)

    browser.set_window_size(480, 300)  # the size of an iframe in an app's settings page
    try:
        browser.get(f"{stack.url}/ui/widget#token={token}")
        wait_state(browser)
        shots(browser, "widget")
    finally:
        browser.set_window_size(1280, 1000)
    assert browser.find_element(By.CSS_SELECTOR, "[data-feature=tokens] [data-balance]").get_attribute(
        "data-balance"
    ) == str(value["balance"])
    assert not [s for s in others if s in browser.page_source]
    check_page(browser)
    framing = httpx.get(f"{stack.url}/ui/widget").headers["content-security-policy"]
    assert "frame-ancestors *" in framing, "the widget may be embedded in an app's own page"
    assert "frame-ancestors 'none'" in httpx.get(f"{stack.url}/ui/").headers["content-security-policy"]


def test_phone_width_empty_state_and_live_refresh(
    stack: LocalStack, admin: httpx.Client, seeded: dict[str, str], browser: WebDriver, shots: Any
) -> None:
    browser.set_window_size(390, 844)
    try:
        open_signed_in(browser, overview_url(stack), seeded["read"])
        wide = browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
        assert wide <= 1, "nothing wider than a phone's screen: wide tables scroll inside their panel"
        shots(browser, "overview-phone")
        check_page(browser)
    finally:
        browser.set_window_size(1280, 1000)

    open_signed_in(browser, f"{stack.url}/ui/?from=2020-01-01&to=2020-01-07&tz=UTC", seeded["read"])
    empty = browser.find_element(By.ID, "empty")
    assert empty.is_displayed() and "curl -X POST" in empty.text, "an empty range says how to send a first event"
    shots(browser, "empty")

    # Live: a new event appears without a reload (refresh=2 s here; 30 s by default).
    open_signed_in(browser, f"{stack.url}/ui/?refresh=2&tz=UTC", seeded["read"])

    def requests_shown() -> Decimal:
        # Read afresh each time: every refresh draws the cards anew.
        return Decimal(browser.execute_script("return document.querySelector('[data-total=requests]').dataset.value"))

    before = requests_shown()
    ingest(admin, [event("carol", dt.datetime.now(dt.UTC), random.Random(1))])
    deadline = time.monotonic() + 15
    while requests_shown() != before + 1:
        assert time.monotonic() < deadline, "the overview never showed the new event"
        time.sleep(0.2)


def test_the_overview_works_by_keyboard(stack: LocalStack, seeded: dict[str, str], browser: WebDriver) -> None:
    """Tab reaches the skip link first, then every control, the CSV buttons and the subjects' links; a preset
    is chosen with the keyboard alone."""
    open_signed_in(browser, overview_url(stack), seeded["read"])
    browser.execute_script("document.activeElement.blur()")
    reached = []
    for _ in range(80):
        ActionChains(browser).send_keys(Keys.TAB).perform()
        reached.append(
            browser.execute_script(
                "const e = document.activeElement; return `${e.tagName}:${e.id || e.textContent.trim().slice(0, 20)}`"
            )
        )
    assert reached[0] == "A:Skip to content"
    for wanted in ("INPUT:find-subject-input", "INPUT:from", "INPUT:to", "SELECT:window", "INPUT:tz",
                   "BUTTON:Last 7 days", "BUTTON:Download CSV", "A:alice"):  # fmt: skip
        assert wanted in reached, f"{wanted} is not reachable by Tab: {reached}"
    open_signed_in(browser, overview_url(stack), seeded["read"])  # Tab starts from the top again
    for _ in range(reached.index("BUTTON:Last 7 days") + 1):
        ActionChains(browser).send_keys(Keys.TAB).perform()
    ActionChains(browser).send_keys(Keys.ENTER).perform()
    deadline = time.monotonic() + 10
    while "from=" + FROM in browser.current_url:
        assert time.monotonic() < deadline, browser.current_url
        time.sleep(0.1)
    wait_state(browser)
    today = dt.datetime.now(ZoneInfo(ZONE)).date()
    assert f"from={today - dt.timedelta(days=6)}" in browser.current_url
    assert f"to={today}" in browser.current_url


def test_a_key_is_required_and_a_wrong_one_is_refused(stack: LocalStack, browser: WebDriver) -> None:
    browser.get(overview_url(stack))
    browser.execute_script("sessionStorage.clear()")  # signed out, whatever ran before
    browser.get(overview_url(stack))
    assert browser.execute_script("return document.body.dataset.state") == "loading"
    sign_in(browser, "ms_read_01J5Z3T0E6G9K3J6V9K6Y3S8QH_" + "x" * 43)
    message = browser.find_element(By.ID, "sign-in-message")
    deadline = time.monotonic() + 10
    while "not accepted" not in message.text:
        assert time.monotonic() < deadline, message.text
        time.sleep(0.1)
    assert browser.find_element(By.ID, "content").is_displayed() is False
    with pytest.raises(WebDriverException):
        browser.find_element(By.ID, "windows")
    r = httpx.get(f"{stack.url}/api/v1/meters/requests/query")
    assert r.status_code == 401, "the pages are public, the numbers are not"


def test_one_scan_answers_each_meter_query_exactly(
    stack: LocalStack, admin: httpx.Client, seeded: dict[str, str]
) -> None:
    """``GET /api/v1/query`` (what the pages ask, one scan for many meters) equals each meter's own query, with
    minutes cut at both ends (read from the audit log), the hour DST repeats, groups and filters."""
    cases: list[dict[str, Any]] = [
        {"windowSize": "DAY", "windowTimeZone": ZONE, **RANGE},
        {"windowSize": "HOUR", "windowTimeZone": ZONE, "from": "2026-11-01T03:17:29.5Z", "to": "2026-11-01T09:02:10Z"},
        {"windowSize": "MINUTE", "from": "2026-10-30T06:00:00Z", "to": "2026-10-30T18:00:00Z", "groupBy": ["model"]},
        {"groupBy": ["provider", "model"], **RANGE},
        {"groupBy": ["subject"], "from": "2026-10-24T11:11:11.111Z"},
        {"subject": ["alice", "bob"], "windowSize": "MONTH", "windowTimeZone": ZONE},
        {"filterGroupBy[model]": "gpt-4o", "windowSize": "DAY"},
    ]
    # Inside one minute, around a stored event: all from the audit log.
    (one,) = admin.get("/api/v1/events", params={"subject": "alice", "limit": 1, **RANGE}).json()
    at = dt.datetime.fromisoformat(one["event"]["time"])
    cases.append({"from": iso(at - dt.timedelta(seconds=0.5)), "to": iso(at + dt.timedelta(seconds=0.5))})
    for i, params in enumerate(cases):
        order = list(METERS) if i % 2 else list(reversed(METERS))  # each answer under its own name, any order
        r = admin.get("/api/v1/query", params={**params, "meter": order})
        assert r.status_code == 200, r.text
        results = r.json(parse_float=Decimal, parse_int=Decimal)["results"]
        assert list(results) == order
        for meter in METERS:
            single = admin.get(f"/api/v1/meters/{meter}/query", params=params)
            assert results[meter] == single.json(parse_float=Decimal, parse_int=Decimal), (params, meter)
        assert any(results[m]["data"] for m in METERS), f"a case with no usage proves little: {params}"

    made = admin.post("/api/v1/meters", json={"slug": "api_calls", "eventType": "api_calls", "aggregation": "COUNT"})
    assert made.status_code == 201, made.text
    for params, words in (
        ({}, "name one built-in meter"),
        ({"meter": "nope"}, "nope is not a meter"),
        ({"meter": ["requests", "api_calls"]}, "api_calls is user-defined"),
        ({"meter": "requests", "windowSize": "YEAR"}, "windowSize"),
    ):
        r = admin.get("/api/v1/query", params=params)
        assert r.status_code == 400, r.text
        assert r.headers["content-type"] == "application/problem+json"
        assert words in r.text


def test_an_empty_subjects_curl_is_quoted_for_the_shell(
    stack: LocalStack, seeded: dict[str, str], browser: WebDriver
) -> None:
    """The empty state's curl for a subject named with quotes and a command substitution sends that name,
    and runs nothing."""
    name = "x'$(touch /tmp/meterstream-pwned)'\"y"
    url = f"{stack.url}/ui/subject?" + urlencode({"subject": name, "from": "2020-01-01", "to": "2020-01-02"})
    open_signed_in(browser, url, seeded["read"])
    command = browser.find_element(By.ID, "first-event").text.replace("\\\n", " ")
    words = shlex.split(command)
    payload = json.loads(words[words.index("-d") + 1])
    assert payload["subject"] == name
    assert browser.find_element(By.ID, "subject-name").text == name


ZONE_DAYS = [
    ("Africa/Cairo", dt.date(2026, 4, 24)),  # skips midnight: the day starts at 01:00
    ("Asia/Beirut", dt.date(2026, 3, 29)),
    ("America/New_York", dt.date(2026, 11, 1)),
    ("America/New_York", dt.date(2026, 3, 8)),
    ("Europe/Budapest", dt.date(2026, 10, 25)),
    ("Asia/Kolkata", dt.date(2026, 12, 2)),
    ("Australia/Lord_Howe", dt.date(2026, 4, 5)),  # a half-hour DST change
    ("America/Santiago", dt.date(2026, 9, 6)),
    ("Pacific/Kiritimati", dt.date(2026, 1, 1)),  # UTC+14
    ("Etc/GMT+12", dt.date(2026, 1, 1)),
]


def test_the_pages_find_local_midnight_in_every_zone(stack: LocalStack, browser: WebDriver) -> None:
    """The instant a local day begins, computed in the browser (what a page turns its range into), equals
    the one computed here with zoneinfo, on DST days of zones west and east of UTC."""
    browser.get(f"{stack.url}/ui/widget")  # any page of the origin: the module is imported from it
    got = browser.execute_async_script(
        """const done = arguments[arguments.length - 1];
           import('/ui/static/common.js').then(m => done(arguments[0].map(([z, y, mo, d]) =>
             m.zonedMidnight(y, mo, d, z).toISOString())));""",
        [[z, d.year, d.month, d.day] for z, d in ZONE_DAYS],
    )
    for (zone, day), shown in zip(ZONE_DAYS, got, strict=True):
        tz = ZoneInfo(zone)
        t = dt.datetime.combine(day, dt.time(), dt.UTC) - dt.timedelta(hours=15)
        while t.astimezone(tz).date() < day:  # the first minute whose local date is the day
            t += dt.timedelta(minutes=1)
        assert dt.datetime.fromisoformat(shown) == t, (zone, day)
