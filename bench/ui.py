"""The usage pages' load time in a real browser, over the query benchmark's windows (10M events, 10,000
subjects, 30 days): from the start of the navigation to every number on the page, against the floor of the
same API calls made from Python six at a time (a browser's connections per host), in the same run."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx

from bench.common import Row, log, percentile
from bench.stack import bench_stack

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
TARGET_MS = 1000.0


def _browser() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,1000"):  # fmt: skip
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def _load(driver: Any, url: str) -> tuple[float, list[str], dict[str, float]]:
    """Milliseconds from navigation to the page's first complete answer, the API calls it made, and where
    the time went (first API call sent, last answered, ms from the navigation's start)."""
    driver.get(url)
    deadline = time.monotonic() + 60
    while driver.execute_script("return document.body.dataset.state") != "ready":
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} never became ready: {driver.execute_script('return document.body.innerText')}")
        time.sleep(0.01)
    ready = float(driver.execute_script("return Number(document.body.dataset.readyMs)"))
    api = driver.execute_script(
        "return performance.getEntriesByType('resource').filter(e => e.name.includes('/api/'))"
        ".map(e => [e.name, e.startTime, e.responseEnd])"
    )
    spans = {
        "first_call_ms": min(a[1] for a in api),
        "last_answer_ms": max(a[2] for a in api),
        "slowest_call_ms": max(a[2] - a[1] for a in api),
    }
    return ready, [a[0] for a in api], spans


def _floor(client: httpx.Client, calls: list[str]) -> float:
    """The same calls from Python, six at once: what the page could not beat."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(6) as pool:
        for r in pool.map(client.get, calls):
            r.raise_for_status()
    return (time.perf_counter() - t0) * 1000


def ui(sizes: Any, work: Path) -> list[Row]:
    from bench.scenarios import _generate_in_process

    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        log("ui: skipped (no chromium/chromedriver: `make browser` installs them)")
        return []
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    base = work / "ui"
    base.mkdir(parents=True, exist_ok=True)
    generated = _generate_in_process(
        base / "clickhouse", sizes.query_events, sizes.query_subjects, sizes.query_days, int(today.timestamp())
    )
    log(f"ui: generated {generated}")
    stack = bench_stack(base)
    stack.start_broker()
    stack.start_control()
    stack.start_sink()
    first = (today - timedelta(days=sizes.query_days)).date().isoformat()
    last = (today - timedelta(days=1)).date().isoformat()
    views = {
        "overview": "/ui/?" + urlencode({"from": first, "to": last, "window": "DAY", "tz": "UTC"}),
        "subject": "/ui/subject?" + urlencode({"subject": "user-00042", "from": first, "to": last, "tz": "UTC"}),
    }
    runs = 3 if sizes.smoke else 12
    results: dict[str, dict[str, Any]] = {}
    driver = _browser()
    try:
        with httpx.Client(timeout=120) as client:
            for name, path in views.items():
                pages: list[float] = []
                floors: list[float] = []
                firsts: list[float] = []
                lasts: list[float] = []
                slowest: list[float] = []
                calls: list[str] = []
                for i in range(runs + 2):
                    page_ms, calls, spans = _load(driver, stack.query_url + path)
                    floor_ms = _floor(client, calls)
                    if i >= 2:  # the first loads warm the caches
                        pages.append(page_ms)
                        floors.append(floor_ms)
                        firsts.append(spans["first_call_ms"])
                        lasts.append(spans["last_answer_ms"])
                        slowest.append(spans["slowest_call_ms"])
                results[name] = {
                    "page": {"p50": percentile(pages, 50), "p95": percentile(pages, 95)},
                    "floor": {"p50": percentile(floors, 50), "p95": percentile(floors, 95)},
                    "first_call_ms_p50": percentile(firsts, 50),
                    "last_answer_ms_p50": percentile(lasts, 50),
                    "slowest_call_ms_p50": percentile(slowest, 50),
                    "calls": len(calls),
                    "runs": len(pages),
                }
                log(f"ui: {name} {results[name]}")
    finally:
        driver.quit()
        stack.stop()
    stored = f"{generated['events'] / 1e6:.1f}M events' windows"
    rows = []
    for name, label in (("overview", "overview, 30 days by day"), ("subject", "a subject's page, 30 days")):
        r = results[name]
        for stat in ("p50", "p95"):
            rows.append(
                Row(
                    "ui",
                    f"{label}: navigation to every number shown, {stat} ({stored}, {r['calls']} API calls)",
                    "ms",
                    r["page"][stat],
                    r["floor"][stat],
                    "the same API calls from Python, 6 at once",
                    higher_is_better=False,
                    target=f"< {TARGET_MS:g} ms" if stat == "p95" else "",
                    met=(r["page"]["p95"] is not None and r["page"]["p95"] < TARGET_MS) if stat == "p95" else None,
                    details=r,
                )
            )
    return rows
