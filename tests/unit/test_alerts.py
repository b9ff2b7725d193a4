"""The alerts' pure rules: when a threshold is crossed, what changes between two readings, the backoff, the
URL checks, the signing secret and the Standard Webhooks signature (verified by the library itself)."""

from __future__ import annotations

import ipaddress
import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from control.alerts.model import Crossing, Level, Threshold, backoff, is_crossed, transitions
from control.alerts.service import new_secret
from control.inputs import ChannelIn, parse
from control.webhooks.sender import sign
from control.webhooks.urls import UrlPolicy, UrlRefused, check_saved, parse_url
from schemas.problems import Problem

D = Decimal
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def level(usage: int | str, total: int | str, balance: int | str | None = None) -> Level:
    u, t = D(usage), D(total)
    return Level(u, t, D(balance) if balance is not None else max(D(0), t - u))


@pytest.mark.parametrize(
    ("threshold", "lvl", "crossed"),
    [
        (Threshold("usage_value", D(300)), level(299, 1000), False),
        (Threshold("usage_value", D(300)), level(300, 1000), True),  # reaching counts
        (Threshold("NUMBER", D(300)), level(300, 0), True),  # an absolute usage needs no grants
        (Threshold("usage_percentage", D(80)), level(799, 1000), False),
        (Threshold("usage_percentage", D(80)), level(800, 1000), True),
        (Threshold("PERCENT", D(80)), level(800, 1000), True),
        (Threshold("usage_percentage", D(80)), level(800, 0), False),  # no grants: no percentage
        (Threshold("usage_percentage", D("33.3")), level("333", 1000), True),
        (Threshold("usage_percentage", D("33.4")), level("333.9", 1000), False),
        (Threshold("balance_value", D(100)), level(899, 1000), False),
        (Threshold("balance_value", D(100)), level(900, 1000), True),
        (Threshold("balance_value", D(0)), level(1000, 1000), True),
        (Threshold("balance_value", D(0)), level(999, 1000), False),
        (Threshold("balance_value", D(100)), level(0, 0), False),
        (Threshold("usage_percentage", D(150)), level(1499, 1000), False),  # above 100 %: overage
        (Threshold("usage_percentage", D(150)), level(1500, 1000), True),
    ],
)
def test_crossed(threshold: Threshold, lvl: Level, crossed: bool) -> None:
    assert is_crossed(threshold, lvl) is crossed


def test_legacy_names_share_a_key_with_the_current_ones() -> None:
    assert Threshold("NUMBER", D("80")).key == Threshold("usage_value", D("80.0")).key == "usage_value:80"
    assert Threshold("PERCENT", D(80)).key == Threshold("usage_percentage", D(80)).key
    assert Threshold("balance_value", D(80)).key != Threshold("usage_value", D(80)).key


def crossing(t: Threshold, crossed: bool, usage: int) -> Crossing:
    return Crossing("r", "s", "f", T0, t.key, crossed, D(usage), "E")


P50, P80, P100 = (Threshold("usage_percentage", D(v)) for v in (50, 80, 100))
ABS = Threshold("usage_value", D(300))


def test_a_jump_fires_every_threshold_crossed_in_order() -> None:
    got = transitions([P100, P50, ABS, P80], level(850, 1000), {})
    assert [(t.threshold, t.crossed) for t in got] == [(ABS, True), (P50, True), (P80, True)]


def test_crossed_stays_quiet_and_resolves_only_from_the_limit_side() -> None:
    known = {P50.key: crossing(P50, True, 600)}
    assert transitions([P50], level(700, 1000), known) == []  # still crossed: no repeat
    # An older reading (less usage than when it fired) never resolves it.
    assert transitions([P50], level(400, 1000), known) == []
    # More grants: no longer crossed with the same usage: resolved.
    (t,) = transitions([P50], level(600, 2000), known)
    assert t.crossed is False
    assert t.previous == known[P50.key]


def test_resolved_fires_again_once_crossed_again() -> None:
    known = {P50.key: crossing(P50, False, 600)}
    assert transitions([P50], level(900, 2000), known) == []
    (t,) = transitions([P50], level(1000, 2000), known)
    assert t.crossed is True


def test_duplicate_thresholds_fire_once() -> None:
    got = transitions([Threshold("PERCENT", D(50)), P50], level(600, 1000), {})
    assert len(got) == 1


def test_backoff_doubles_caps_and_jitters() -> None:
    rng = random.Random(1)
    for n in range(1, 40):
        wait = backoff(n, 1.0, 60.0, rng).total_seconds()
        base = min(60.0, 2.0 ** (n - 1))
        assert 0.5 * base <= wait <= min(60.0, 1.5 * base)
    assert backoff(10_000, 1.0, 60.0) <= timedelta(seconds=60)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/x",
        "http://[::1]/x",
        "http://[::ffff:127.0.0.1]/x",
        "http://10.0.0.8/x",
        "http://172.16.3.4/",
        "http://192.168.1.1/",
        "http://169.254.169.254/latest/meta-data",
        "http://[fe80::1]/",
        "http://[fc00::1]/",
        "http://100.64.0.1/",
        "http://0.0.0.0/",
        "http://localhost:8080/",
    ],
)
def test_private_addresses_are_refused_by_default(url: str) -> None:
    with pytest.raises(UrlRefused):
        check_saved(url, UrlPolicy())
    check_saved(url.replace("0.0.0.0", "127.0.0.2"), UrlPolicy(allow_private=True))


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/",
        "https://user:pw@example.com/",
        "https://example.com/#frag",
        "https:///nohost",
        "example.com",
        "https://exa mple.com/",
    ],
)
def test_malformed_urls_are_refused(url: str) -> None:
    with pytest.raises(UrlRefused):
        parse_url(url)


def test_public_and_allowed_networks() -> None:
    check_saved("https://8.8.8.8/hook", UrlPolicy())
    check_saved("https://hooks.example.com/x", UrlPolicy())  # names are checked when resolved, at each send
    policy = UrlPolicy.of(False, ["10.1.0.0/16"])
    assert policy.allows(ipaddress.ip_address("10.1.2.3"))
    assert not policy.allows(ipaddress.ip_address("10.2.0.1"))
    assert not UrlPolicy(allow_private=True).allows(ipaddress.ip_address("224.0.0.1"))  # multicast never
    assert not UrlPolicy().allows(ipaddress.ip_address("::ffff:10.0.0.1"))


def test_generated_secrets_are_openmeters_shape_and_accepted() -> None:
    secret = new_secret()
    assert secret.startswith("whsec_")
    assert len(secret) == 6 + 44
    parse(ChannelIn, {"type": "WEBHOOK", "name": "n", "url": "https://x.example", "signingSecret": secret})
    with pytest.raises(Problem):
        parse(
            ChannelIn,
            {"type": "WEBHOOK", "name": "n", "url": "https://x.example", "signingSecret": "whsec_" + "!" * 40},
        )
    with pytest.raises(Problem):  # the pattern allows it, base64 does not
        parse(ChannelIn, {"type": "WEBHOOK", "name": "n", "url": "https://x.example", "signingSecret": "a" * 33})


def test_signature_verifies_with_the_library_and_binds_id_time_and_body() -> None:
    secret = new_secret()
    body = '{"id":"E1","usage":0.1}'
    headers = sign(secret, "E1", datetime.now(UTC), body)
    assert Webhook(secret).verify(body, headers) == {"id": "E1", "usage": 0.1}
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body.replace("0.1", "0.2"), headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body, headers | {"webhook-id": "E2"})
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, headers)
    # A time in another zone is converted, not relabelled (the library would relabel it).
    from zoneinfo import ZoneInfo

    local = datetime.now(ZoneInfo("America/New_York"))
    assert Webhook(secret).verify(body, sign(secret, "E1", local, body))


def test_hosts_and_headers_that_cannot_be_sent_are_refused_when_saved() -> None:
    for url in (
        "http://a..b/hook",
        f"http://{'x' * 64}.example.com/",
        "http://2130706433/",
        "http://127.1/",
        "http://0x7f.0.0.1/",
    ):
        with pytest.raises(UrlRefused):
            check_saved(url, UrlPolicy())
    with pytest.raises(Problem):
        parse(
            ChannelIn,
            {"type": "WEBHOOK", "name": "n", "url": "https://x.example", "customHeaders": {"x-team": "équipe"}},
        )


async def test_the_sender_answers_every_url_with_an_outcome() -> None:
    """Nothing it is given makes it raise (a raise would leave a delivery SENDING for ever)."""
    from control.webhooks.sender import WebhookSender

    sender = WebhookSender(UrlPolicy(), connect_timeout_s=0.5, timeout_s=0.5, max_response_bytes=16, user_agent="t")
    try:
        for url, headers in (("http://a..b/", {}), ("http://127.0.0.1:9/", {}), ("https://8.8.8.8/", {"x": "é"})):
            out = await sender.send(url, headers, new_secret(), "E1", "{}")
            assert not out.ok
            assert out.error
    finally:
        await sender.close()
