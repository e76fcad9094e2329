"""The call log and the latency histograms after a known load through the proxy, against the
real flaky upstream: one row per call with what it did, never a query value, header or body;
batched writes; retention; the read-only admin list and its filters; /metrics histograms."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from datasources import tasks
from datasources.models import ProxyCall
from datasources.proxy import calllog
from datasources.proxy.apikeys import create_api_key

from .flaky import Step, status
from .test_retries import ACCESS_TOKEN, flaky_datasource

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("serving")]

SECRET_QUERY_VALUE = "query-secret-" + "q" * 20


@pytest.fixture(autouse=True)
def fresh_log(settings):
    settings.DATASOURCES = {
        **settings.DATASOURCES,
        "RETRY_BACKOFF_BASE": 0.01,
        "RETRY_BACKOFF_MAX": 0.02,
        "CALL_LOG_FLUSH_INTERVAL": 3600,  # only the tests' own flush() writes
    }
    calllog.discard()
    yield
    calllog.discard()


def metric_lines(text: str) -> dict[str, float]:
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def test_a_known_load_in_the_log_and_the_histogram(flaky, staff_client):
    datasource = flaky_datasource(flaky, retry_count=2)
    api_key, key = create_api_key("reporting-app")
    app = Client(HTTP_AUTHORIZATION=f"Api-Key {key}")
    base = f"/api/v1/datasources/{datasource.slug}/proxy/"
    started = timezone.now()

    for n in range(5):
        assert app.get(f"{base}items/{n}?token={SECRET_QUERY_VALUE}").status_code == 200
    flaky.script("/api/slow", Step(delay=0.3), Step(delay=0.3))
    assert app.get(f"{base}slow").status_code == 200
    assert app.get(f"{base}slow").status_code == 200
    flaky.script("/api/flaky", status(503))
    assert app.get(f"{base}flaky").status_code == 200  # one retry
    flaky.script("/api/me", status(401))
    assert app.get(f"{base}me").status_code == 200  # refreshed once
    response = app.post(f"{base}orders", data=b'{"n": 1}', content_type="application/json")
    assert response.status_code == 200
    flaky.script("/api/broken", status(500))
    assert app.get(f"{base}broken").status_code == 500
    flaky.script("/api/limited", status(429, Retry_After="60"))
    assert app.get(f"{base}limited").status_code == 429
    refused = app.get(f"{base}limited")  # remembered: not sent
    assert refused.status_code == 429

    assert ProxyCall.objects.count() == 0  # batched: nothing written yet
    assert calllog.flush() == 13
    rows = list(ProxyCall.objects.order_by("id"))
    assert len(rows) == 13
    assert {row.datasource_id for row in rows} == {datasource.pk}
    assert {row.api_key_id for row in rows} == {api_key.pk}
    assert all(started <= row.called_at <= timezone.now() for row in rows)
    assert [row.called_at for row in rows] == sorted(row.called_at for row in rows)
    assert [row.path for row in rows[:5]] == [f"items/{n}" for n in range(5)]
    by_path = {row.path: row for row in rows}
    assert (by_path["flaky"].retries, by_path["flaky"].refreshed) == (1, False)
    assert (by_path["me"].retries, by_path["me"].refreshed) == (0, True)
    assert (by_path["orders"].method, by_path["orders"].request_bytes) == ("POST", 8)
    assert by_path["items/0"].response_bytes == len(b'{"ok": true}')
    assert by_path["broken"].status == 500 and by_path["broken"].error == ""
    assert [(r.status, r.error) for r in rows[-2:]] == [(429, ""), (429, "rate_limited")]
    assert all(r.latency_ms >= 300 for r in rows if r.path == "slow")
    # Never a query value, a token or a body.
    stored = repr(list(ProxyCall.objects.values()))
    assert SECRET_QUERY_VALUE not in stored and "token=" not in stored
    assert ACCESS_TOKEN not in stored and '{"n": 1}' not in stored

    metrics = metric_lines(staff_client.get("/metrics").content.decode())
    label = f'datasource="{datasource.slug}"'
    buckets = [
        value
        for name, value in metrics.items()
        if name.startswith(f"datasources_proxy_duration_seconds_bucket{{{label}")
    ]
    assert buckets == sorted(buckets)  # cumulative
    assert metrics[f'datasources_proxy_duration_seconds_bucket{{{label},le="+Inf"}}'] == 13
    assert metrics[f"datasources_proxy_duration_seconds_count{{{label}}}"] == 13
    # The two slow calls took at least 300 ms: not in the buckets up to 250 ms.
    assert metrics[f'datasources_proxy_duration_seconds_bucket{{{label},le="0.25"}}'] <= 11
    assert metrics[f"datasources_proxy_duration_seconds_sum{{{label}}}"] >= 0.6


def test_the_log_can_be_switched_off(flaky, settings):
    settings.DATASOURCES = {**settings.DATASOURCES, "CALL_LOG": False}
    datasource = flaky_datasource(flaky)
    _, key = create_api_key("app")
    Client(HTTP_AUTHORIZATION=f"Api-Key {key}").get(
        f"/api/v1/datasources/{datasource.slug}/proxy/x"
    )
    assert calllog.flush() == 0 and ProxyCall.objects.count() == 0


def test_the_log_outlives_deleted_datasources_and_keys(flaky, staff_client):
    kept = flaky_datasource(flaky, slug="kept")
    gone = flaky_datasource(flaky, slug="gone", name="Gone")
    key_row, key = create_api_key("app")
    app = Client(HTTP_AUTHORIZATION=f"Api-Key {key}")
    for slug in ("kept", "gone", "kept"):
        assert app.get(f"/api/v1/datasources/{slug}/proxy/x").status_code == 200
    calllog.flush()
    gone_id = gone.pk
    response = staff_client.post(
        f"/admin/datasources/datasource/{gone.pk}/delete/", {"post": "yes"}
    )
    assert response.status_code == 302  # the log does not stand in the way
    key_id = key_row.pk
    key_row.delete()
    assert app.get("/api/v1/datasources/kept/proxy/y").status_code == 401
    assert calllog.flush() == 0  # refused before a datasource was known: not a datasource's call
    assert list(ProxyCall.objects.order_by("id").values_list("datasource_id", "api_key_id")) == [
        (kept.pk, key_id),
        (gone_id, key_id),
        (kept.pk, key_id),
    ]
    listing = staff_client.get("/admin/datasources/proxycall/").content.decode()
    assert listing.count("deleted API key") == 3


def test_retention_prunes_old_rows(flaky, settings):
    settings.DATASOURCES = {**settings.DATASOURCES, "CALL_LOG_RETENTION_DAYS": 7}
    datasource = flaky_datasource(flaky)
    now = timezone.now()
    for age in (1, 6, 8, 30):
        ProxyCall.objects.create(
            called_at=now - timedelta(days=age),
            datasource=datasource,
            method="GET",
            path=f"age/{age}",
            status=200,
            latency_ms=1,
        )
    assert tasks.prune_call_log() == 2
    assert sorted(ProxyCall.objects.values_list("path", flat=True)) == ["age/1", "age/6"]


def test_the_admin_list_is_read_only_and_filters(flaky, staff_client, django_user_model):
    first = flaky_datasource(flaky, slug="first", name="First API")
    second = flaky_datasource(flaky, slug="second", name="Second API")
    key_row, key = create_api_key("billing-app")
    app = Client(HTTP_AUTHORIZATION=f"Api-Key {key}")
    flaky.script("/api/fails", status(502))
    app.get("/api/v1/datasources/first/proxy/fails")
    app.get("/api/v1/datasources/first/proxy/works")
    app.get("/api/v1/datasources/second/proxy/other")
    user = django_user_model.objects.create_user("session-user", password="x")
    ProxyCall.objects.create(
        called_at=timezone.now(), datasource=second, user=user, method="GET", path="by-user",
        status=404, latency_ms=2,
    )  # fmt: skip
    calllog.flush()

    url = "/admin/datasources/proxycall/"

    def paths(query: str = "") -> set[str]:
        page = staff_client.get(url + query)
        assert page.status_code == 200
        return {
            p for p in ("fails", "works", "other", "by-user") if f">{p}<" in page.content.decode()
        }

    assert paths() == {"fails", "works", "other", "by-user"}
    assert paths(f"?datasource__id__exact={first.pk}") == {"fails", "works"}
    assert paths("?status_class=5") == {"fails"}
    assert paths("?status_class=4") == {"by-user"}
    assert paths(f"?api_key__id__exact={key_row.pk}") == {"fails", "works", "other"}
    assert paths(f"?user__id__exact={user.pk}") == {"by-user"}
    listing = staff_client.get(url).content.decode()
    assert "billing-app" in listing and "session-user" in listing
    assert staff_client.get(url + "add/").status_code == 403
    row = ProxyCall.objects.get(path="works")
    change = staff_client.get(f"{url}{row.pk}/change/")
    assert change.status_code == 200 and b'name="_save"' not in change.content  # view only
    assert staff_client.post(f"{url}{row.pk}/delete/").status_code == 403


@pytest.mark.parametrize(
    ("path", "stored"),
    [
        ("v1/users", "v1/users"),
        ("a/\x00/x", "a/%00/x"),
        ("a\nb\x7f?q=secret", "a%0Ab%7F"),
        ("café/\x01", "café/%01"),
        ("café/\u2028", "café/\u2028"),
        ("x?\x00", "x"),
    ],
)
def test_the_logged_path_has_no_control_characters_or_query(path, stored):
    """PostgreSQL refuses NUL in text: a decoded ``%00`` in a (refused) path must not turn the
    call log's batch insert into a 500."""
    assert calllog.Call.begin("GET", path).path == stored


def test_called_at_is_what_djangos_adapter_makes():
    """The called_at values written are the database adapter's own (on SQLite the text is built
    by calllog itself, checked here against Django's on edge and random times)."""
    import random
    from datetime import UTC, datetime

    from django.db import connection

    adapt = connection.ops.adapt_datetimefield_value
    values = calllog._called_at_values(connection)
    # SQLite takes text, built by calllog (the adapter's datetime elsewhere).
    assert (values.__name__ == "text") == (connection.vendor == "sqlite")
    now = timezone.now().timestamp()
    edges = [0.0, 1.5, now, float(int(now)), 1767323045.0000005, 1767323045.0000015]
    edges += [1767323045.9999996, 1767323045.9999994, 951868799.999999, 4102444799.9999995]
    rng = random.Random(17)
    stamps = edges + [rng.uniform(0, 4.1e9) for _ in range(5000)]
    stamps += [int(now) + rng.randrange(1_000_000) / 1e6 for _ in range(5000)]
    for stamp in stamps:
        assert values(stamp) == adapt(datetime.fromtimestamp(stamp, UTC)), stamp


def test_called_at_round_trips(settings):
    from datetime import UTC, datetime

    settings.DATASOURCES = {**settings.DATASOURCES, "CALL_LOG_FLUSH_INTERVAL": 3600}
    stamps = [1767323045.0, 1767323045.123456, 1767323045.9999996]
    for stamp in stamps:
        call = calllog.Call.begin("GET", "/x")
        call.called_at = stamp
        calllog.record(call, None, 200, 1.0, write=False)
    assert calllog.flush() == len(stamps)
    stored = sorted(ProxyCall.objects.values_list("called_at", flat=True))
    assert stored == [datetime.fromtimestamp(stamp, UTC) for stamp in stamps]


def test_a_batch_larger_than_one_statement_is_written_whole(settings):
    """A flush of more rows than one INSERT takes (the backend's parameter limit, at most
    MAX_ROWS_PER_STATEMENT rows) writes every row once, in order, the last statement short."""
    from django.db import connection

    settings.DATASOURCES = {**settings.DATASOURCES, "CALL_LOG_FLUSH_INTERVAL": 3600}
    per_statement = calllog._rows_per_statement(connection, 10_000)
    assert 1 < per_statement <= calllog.MAX_ROWS_PER_STATEMENT
    total = 2 * per_statement + 7
    for number in range(total):
        call = calllog.Call.begin("GET", f"item/{number}", request_bytes=number)
        calllog.record(call, None, 200 + number % 300, float(number), write=False)
    assert calllog.flush() == total
    rows = list(ProxyCall.objects.order_by("id").values_list("path", "request_bytes", "status"))
    assert rows == [(f"item/{n}", n, 200 + n % 300) for n in range(total)]
    assert calllog.flush() == 0
