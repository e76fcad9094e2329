"""Shared upstream health: the rules as tables (rate limit from headers, circuit breaker
transitions), the stores' atomic updates (the database always, Redis when REDIS_URL is set),
and the proxy, the Python client, metrics and admin against a real flaky upstream."""

from __future__ import annotations

import email.utils
import os
import threading
import time
from datetime import UTC, datetime

import pytest
from django.test import Client

from datasources.calls import health
from datasources.calls.limits import (
    CLEAN,
    BreakerPolicy,
    Health,
    Verdict,
    after_failure,
    after_rate_limit,
    after_success,
    claim_probe,
    gate,
    rate_limited_until,
)
from datasources.exceptions import UpstreamRefused
from datasources.proxy.apikeys import create_api_key

from .flaky import status
from .test_retries import flaky_datasource

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("serving")]

T = 1_800_000_000.0  # "now", Unix seconds
POLICY = BreakerPolicy(threshold=3, window=60, cooldown=30, probe_seconds=70)


def headers(**values: str):
    table = {name.replace("_", "-").lower(): value for name, value in values.items()}
    return lambda name: table.get(name.lower())


# --- the rules -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("why", "status_code", "answer", "expected"),
    [
        ("429 + Retry-After seconds", 429, headers(Retry_After="120"), T + 120),
        (
            "429 + Retry-After date",
            429,
            headers(
                Retry_After=email.utils.format_datetime(
                    datetime.fromtimestamp(T + 90, UTC), usegmt=True
                )
            ),
            T + 90,
        ),
        ("429 without any hint: nothing to remember", 429, headers(), None),
        ("503 + Retry-After is not a rate limit", 503, headers(Retry_After="30"), None),
        (
            "RateLimit-Remaining 0 + Reset",
            200,
            headers(RateLimit_Remaining="0", RateLimit_Reset="30"),
            T + 30,
        ),
        (
            "RateLimit-Remaining 5",
            200,
            headers(RateLimit_Remaining="5", RateLimit_Reset="30"),
            None,
        ),
        (
            "X-RateLimit-Reset as a Unix time (GitHub)",
            403,
            headers(X_RateLimit_Remaining="0", X_RateLimit_Reset=str(int(T + 45))),
            T + 45,
        ),
        (
            "X-RateLimit-Reset in seconds",
            200,
            headers(X_RateLimit_Remaining="0", X_RateLimit_Reset="12"),
            T + 12,
        ),
        (
            "structured RateLimit field",
            200,
            headers(RateLimit="limit=100, remaining=0, reset=50"),
            T + 50,
        ),
        ("structured, remaining", 200, headers(RateLimit="limit=100, remaining=7, reset=50"), None),
        ("capped at the maximum", 429, headers(Retry_After="999999"), T + 3600),
        (
            "garbage",
            429,
            headers(Retry_After="later", RateLimit_Remaining="0", RateLimit_Reset="x"),
            None,
        ),
    ],
)
def test_rate_limited_until(why, status_code, answer, expected):
    assert rate_limited_until(status_code, answer, T, max_seconds=3600) == expected, why


def fail(times: int, health: Health = CLEAN, start: float = T, step: float = 1.0) -> Health:
    for n in range(times):
        health = after_failure(health, start + n * step, POLICY)
    return health


@pytest.mark.parametrize(
    ("why", "health", "now", "verdict", "retry_after"),
    [
        ("nothing known", CLEAN, T, Verdict.PASS, 0),
        ("two failures: still closed", fail(2), T + 2, Verdict.PASS, 0),
        ("three in the window: open", fail(3), T + 3, Verdict.CIRCUIT_OPEN, 29),
        ("three spread beyond the window: closed", fail(3, step=40), T + 81, Verdict.PASS, 0),
        ("cooldown over: one probe", fail(3), T + 33, Verdict.PROBE, 0),
        (
            "probe under way: others refused",
            claim_probe(fail(3), T + 33, POLICY),
            T + 34,
            Verdict.CIRCUIT_OPEN,
            1,
        ),
        (
            "probe lease lapsed: another probe",
            claim_probe(fail(3), T + 33, POLICY),
            T + 104,
            Verdict.PROBE,
            0,
        ),
        (
            "probe failed: open again",
            after_failure(fail(3), T + 33, POLICY),
            T + 34,
            Verdict.CIRCUIT_OPEN,
            29,
        ),
        ("probe succeeded: closed", after_success(fail(3)), T + 34, Verdict.PASS, 0),
        ("rate limited", after_rate_limit(CLEAN, T + 10), T, Verdict.RATE_LIMITED, 10),
        ("rate limit over", after_rate_limit(CLEAN, T + 10), T + 10, Verdict.PASS, 0),
        (
            "a later limit wins",
            after_rate_limit(after_rate_limit(CLEAN, T + 50), T + 10),
            T,
            Verdict.RATE_LIMITED,
            50,
        ),
    ],
)
def test_gate(why, health, now, verdict, retry_after):
    result = gate(health, now)
    assert (result.verdict, result.retry_after) == (verdict, pytest.approx(retry_after)), why


def test_breaker_counts_runs_and_can_be_off():
    assert fail(2).failures == 2 and after_success(fail(2)).failures == 0
    assert after_failure(fail(2, step=61), T + 200, POLICY).failures == 1  # window passed: anew
    off = BreakerPolicy(threshold=0)
    assert after_failure(CLEAN, T, off) == CLEAN
    assert claim_probe(CLEAN, T, POLICY) is None  # nothing to probe
    assert claim_probe(fail(3), T + 1, POLICY) is None  # still cooling down


# --- the stores ------------------------------------------------------------------------------


def stores():
    kinds = ["database"]
    if os.environ.get("REDIS_URL"):
        kinds.append("redis")  # (a run without Redis deselects it by not generating it)
    return kinds


@pytest.fixture(params=stores())
def store_kind(request, settings):
    settings.DATASOURCES = {**settings.DATASOURCES, "HEALTH_STORE": request.param}
    health.reset()
    yield request.param
    health.store().clear()
    health.reset()


def test_store_updates_are_atomic_across_threads(store_kind, flaky):
    datasource = flaky_datasource(flaky)
    store = health.store()
    assert isinstance(store, health.RedisStore if store_kind == "redis" else health.DatabaseStore)
    start = threading.Barrier(8)
    big = BreakerPolicy(threshold=1000, window=600)

    def add_failures():
        start.wait()
        for _ in range(10):
            store.update(datasource.pk, lambda h: after_failure(h, time.time(), big))

    threads = [threading.Thread(target=add_failures) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert store.read(datasource.pk).failures == 80  # no lost update

    store.update(datasource.pk, lambda h: fail(3, start=time.time()))
    half_open = time.time() + 100  # as if the cooldown were over
    claims = []
    start = threading.Barrier(8)

    def probe():
        start.wait()
        claims.append(store.update(datasource.pk, lambda h: claim_probe(h, half_open, POLICY)))

    threads = [threading.Thread(target=probe) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len([c for c in claims if c is not None]) == 1  # exactly one probe

    store.update(datasource.pk, lambda h: after_success(h))
    assert store.read(datasource.pk) == CLEAN
    assert store.read_many([datasource.pk]) == {}  # a clean record is not kept


# --- end to end ------------------------------------------------------------------------------


@pytest.fixture
def call(flaky):
    _, key = create_api_key("app")
    client = Client(HTTP_AUTHORIZATION=f"Api-Key {key}")

    def send(path: str, slug: str = "flaky", **kwargs):
        return client.get(f"/api/v1/datasources/{slug}/proxy/{path}", **kwargs)

    return send


def test_a_429_with_retry_after_is_remembered(flaky, call):
    flaky_datasource(flaky)
    flaky.script("/api/things", status(429, Retry_After="120"))
    first = call("things")
    assert first.status_code == 429 and flaky.count("/api/things") == 1
    for _ in range(3):
        again = call("things")
        assert again.status_code == 429
        assert again.json()["error"] == "rate_limited"
        assert 110 <= int(again["Retry-After"]) <= 120
    assert flaky.count("/api/things") == 1  # the upstream was not called again


def test_remaining_zero_is_remembered_until_the_reset(flaky, call, settings):
    settings.DATASOURCES = {**settings.DATASOURCES, "HEALTH_CACHE_SECONDS": 0}
    flaky_datasource(flaky)
    flaky.script("/api/things", status(200, RateLimit_Remaining="0", RateLimit_Reset="1"))
    assert call("things").status_code == 200  # this answer is fine; the next must wait
    refused = call("things")
    assert refused.status_code == 429 and refused["Retry-After"] == "1"
    assert flaky.count("/api/things") == 1
    deadline = time.monotonic() + 10
    while (response := call("things")).status_code == 429:  # the limit lifts by itself
        assert time.monotonic() < deadline, "the rate limit never lifted"
    assert response.status_code == 200 and flaky.count("/api/things") == 2


def test_the_circuit_opens_probes_once_and_closes(flaky, call, settings):
    settings.DATASOURCES = {
        **settings.DATASOURCES,
        "BREAKER_THRESHOLD": 3,
        "BREAKER_COOLDOWN": 0.5,
        "HEALTH_CACHE_SECONDS": 0,
    }
    flaky_datasource(flaky)
    flaky.always["/api/x"] = status(503)
    for _ in range(3):
        assert call("x").status_code == 503
    assert flaky.count("/api/x") == 3
    refused = call("x")
    assert refused.status_code == 503 and refused.json()["error"] == "circuit_open"
    assert refused["Retry-After"] == "1"
    assert flaky.count("/api/x") == 3  # open: not called

    deadline = time.monotonic() + 10
    while flaky.count("/api/x") == 3:  # after the cooldown, one probe goes through
        assert time.monotonic() < deadline, "no probe after the cooldown"
        call("x")
    assert flaky.count("/api/x") == 4
    assert call("x").json()["error"] == "circuit_open"  # the probe failed: open again
    assert flaky.count("/api/x") == 4

    flaky.always["/api/x"] = status(200)  # the upstream recovers
    while call("x").status_code != 200:
        assert time.monotonic() < deadline, "the circuit never closed"
    assert flaky.count("/api/x") == 5
    for _ in range(3):
        assert call("x").status_code == 200
    assert flaky.count("/api/x") == 8  # closed: every call goes through


def test_connection_errors_open_the_circuit_too(flaky, call, settings):
    settings.DATASOURCES = {**settings.DATASOURCES, "BREAKER_THRESHOLD": 2, "BREAKER_COOLDOWN": 60}
    flaky_datasource(flaky, base_url="http://127.0.0.1:9/api/")  # nothing listens on port 9
    assert call("x").status_code == 502
    assert call("x").status_code == 502
    assert call("x").json()["error"] == "circuit_open"


def test_the_python_client_is_refused_too(flaky):
    datasource = flaky_datasource(flaky)
    flaky.script("/api/me", status(429, Retry_After="60"))
    with datasource.session() as api:
        assert api.get("me").status_code == 429
        with pytest.raises(UpstreamRefused) as refused:
            api.get("me")
    assert refused.value.status == 429 and 50 < refused.value.retry_after <= 60
    assert flaky.count("/api/me") == 1


def test_metrics_and_admin_show_limits_and_circuit(flaky, call, staff_client, settings):
    settings.DATASOURCES = {**settings.DATASOURCES, "BREAKER_THRESHOLD": 2, "BREAKER_COOLDOWN": 60}
    limited = flaky_datasource(flaky, slug="limited")
    failing = flaky_datasource(flaky, slug="failing", name="Failing API")
    flaky.script("/api/a", status(429, Retry_After="300"))
    flaky.always["/api/b"] = status(500)
    call("a", slug="limited")
    call("b", slug="failing")
    call("b", slug="failing")

    metrics = staff_client.get("/metrics").content.decode()
    lines = {
        line.rsplit(" ", 1)[0]: line.rsplit(" ", 1)[1]
        for line in metrics.splitlines()
        if not line.startswith("#")
    }
    assert 290 <= float(lines['datasources_rate_limited_seconds{datasource="limited"}']) <= 300
    assert lines['datasources_rate_limited_seconds{datasource="failing"}'] == "0"
    assert lines['datasources_circuit_open{datasource="failing"}'] == "1"
    assert lines['datasources_circuit_open{datasource="limited"}'] == "0"
    assert lines['datasources_upstream_consecutive_failures{datasource="failing"}'] == "2"

    listing = staff_client.get("/admin/datasources/datasource/").content.decode()
    assert "rate-limited" in listing and "circuit open" in listing
    page = staff_client.get(limited.get_admin_url()).content.decode()
    assert "datasource-banner-rate-limited" in page
    page = staff_client.get(failing.get_admin_url()).content.decode()
    assert "datasource-banner-circuit-open" in page and "2 failures in a row" in page
