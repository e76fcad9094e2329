"""OpenTelemetry spans (datasources/ops/tracing.py) recorded by the SDK's in-memory exporter during
real flows: a proxy call to the spy upstream, an "expired" answer refreshed at the flaky
upstream's token endpoint, a refresh and a dead grant at django-oauth-toolkit, a lease wait
between two threads. Asserted: span names, parents, attributes, and that no secret (client
secret, access or refresh token, API key, query value, path) is in any span; with tracing off,
nothing is exported and nothing extra reaches the upstream; the documented OTLP setup exports."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from datetime import timedelta
from http.server import BaseHTTPRequestHandler

import pytest
from django.db import connection
from django.test import Client
from django.utils import timezone

from datasources.models import Token
from datasources.ops import tracing
from datasources.proxy.apikeys import create_api_key
from datasources.tokens import lease

from .conftest import SECRET, make_datasource
from .flaky import status
from .helpers import subprocess_env
from .localserver import LocalHTTPServer
from .spy import SpyUpstream
from .test_retries import ACCESS_TOKEN, flaky_datasource

pytestmark = [pytest.mark.django_db(transaction=True)]

sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
from opentelemetry import trace  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)

QUERY_VALUE = "query-value-" + "q" * 20
PATH_SECRET = "path-secret-" + "p" * 20

_EXPORTER = InMemorySpanExporter()


def _provider_with_memory() -> None:
    """One SDK provider for the test process (OpenTelemetry allows setting it once)."""
    current = trace.get_tracer_provider()
    if getattr(current, "_datasources_test", False):
        return
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
    provider._datasources_test = True
    trace.set_tracer_provider(provider)
    assert trace.get_tracer_provider() is provider, "another tracer provider was set first"


def _turn(settings, **switches) -> None:
    settings.DATASOURCES = {**settings.DATASOURCES, **switches}
    tracing.reset()


@pytest.fixture
def spans(settings):
    _provider_with_memory()
    _EXPORTER.clear()
    _turn(settings, TRACING=True)
    yield _EXPORTER
    _EXPORTER.clear()
    tracing.reset()


def by_name(exporter) -> dict[str, list]:
    found: dict[str, list] = {}
    for span in exporter.get_finished_spans():
        found.setdefault(span.name, []).append(span)
    return found


def assert_no_secret(exporter, *secrets: str) -> None:
    """No secret in any span's name, attributes, events or links."""
    for span in exporter.get_finished_spans():
        texts = [span.name, *(str(v) for v in span.attributes.values())]
        for event in span.events:
            texts += [event.name, *(str(v) for v in event.attributes.values())]
        blob = "\n".join(texts)
        for secret in secrets:
            assert secret and secret not in blob, (span.name, secret)


def spy_datasource(spy: SpyUpstream):
    return flaky_datasource(spy, slug="spied", name="Spied API")  # same shape: token stored


# --- the proxy call and its upstream attempt ----------------------------------------------------


def test_proxy_call_span_and_its_upstream_attempt(spans, spy, serving):
    spy_datasource(spy)
    _, key = create_api_key("app")
    response = Client(HTTP_AUTHORIZATION=f"Api-Key {key}").get(
        f"/api/v1/datasources/spied/proxy/{PATH_SECRET}/items?token={QUERY_VALUE}"
    )
    assert response.status_code == 200
    found = by_name(spans)
    assert sorted(found) == ["GET", tracing.PROXY]
    (proxy,), (upstream,) = found[tracing.PROXY], found["GET"]
    assert upstream.parent.span_id == proxy.context.span_id
    assert upstream.context.trace_id == proxy.context.trace_id
    assert proxy.kind == trace.SpanKind.INTERNAL and upstream.kind == trace.SpanKind.CLIENT
    assert dict(proxy.attributes) == {
        "http.request.method": "GET",
        "datasources.datasource": "spied",
        "datasources.caller": "api_key",
        "http.response.status_code": 200,
        "datasources.retries": 0,
        "datasources.refreshed": False,
    }
    assert dict(upstream.attributes) == {
        "http.request.method": "GET",
        "server.address": "127.0.0.1",
        "server.port": spy.port,
        "url.scheme": "http",
        "datasources.attempt": 1,
        "http.response.status_code": 200,
    }
    assert proxy.status.is_ok and upstream.status.is_ok
    assert_no_secret(spans, key, ACCESS_TOKEN, SECRET, QUERY_VALUE, PATH_SECRET)
    # Propagation is off by default: the upstream got no trace context from us.
    (seen,) = spy.seen
    assert not {"traceparent", "tracestate"} & seen.header_names


def test_refused_calls_are_traced_without_what_the_caller_typed(spans, spy):
    spy_datasource(spy)
    _, key = create_api_key("app")
    client = Client(HTTP_AUTHORIZATION=f"Api-Key {key}")
    assert client.get(f"/api/v1/datasources/{PATH_SECRET}/proxy/x").status_code == 404
    assert client.delete("/api/v1/datasources/spied/proxy/x").status_code == 200
    client.defaults["HTTP_AUTHORIZATION"] = "Api-Key dsk_wrong"
    assert client.get("/api/v1/datasources/spied/proxy/x").status_code == 401
    unknown, deleted, wrong_key = by_name(spans)[tracing.PROXY]
    assert unknown.attributes["http.response.status_code"] == 404
    assert "datasources.datasource" not in unknown.attributes  # an unknown slug is not kept
    assert unknown.attributes["datasources.refusal"] == "not_found"
    assert deleted.attributes["datasources.datasource"] == "spied"
    assert wrong_key.attributes["datasources.refusal"] == "unauthorized"
    assert wrong_key.attributes["datasources.caller"] == "none"
    assert "GET" not in by_name(spans) and [seen.method for seen in spy.seen] == ["DELETE"]
    assert_no_secret(spans, key, PATH_SECRET, "dsk_wrong")


def test_expired_answer_refresh_and_retry(spans, flaky, serving):
    flaky_datasource(flaky)
    flaky.script("/api/me", status(401))  # then 200 with the refreshed token
    _, key = create_api_key("app")
    response = Client(HTTP_AUTHORIZATION=f"Api-Key {key}").get(
        f"/api/v1/datasources/flaky/proxy/me?q={QUERY_VALUE}"
    )
    assert response.status_code == 200 and flaky.token_calls == 1
    found = by_name(spans)
    (proxy,), (refresh,), attempts = found[tracing.PROXY], found[tracing.REFRESH], found["GET"]
    assert [a.attributes["datasources.attempt"] for a in attempts] == [1, 2]
    assert [a.attributes["http.response.status_code"] for a in attempts] == [401, 200]
    assert attempts[0].attributes["error.type"] == "401" and not attempts[0].status.is_ok
    assert attempts[1].attributes["http.request.resend_count"] == 1
    for child in (*attempts, refresh):
        assert child.parent.span_id == proxy.context.span_id
    assert attempts[0].end_time <= refresh.start_time <= refresh.end_time <= attempts[1].start_time
    assert dict(refresh.attributes) == {
        "datasources.grant_type": "client_credentials",
        "datasources.situation": "rejected",
        "server.address": "127.0.0.1",
        "datasources.outcome": "refreshed",
    }
    assert proxy.attributes["datasources.refreshed"] is True
    fresh = Token.objects.get(datasource__slug="flaky").access_token
    assert_no_secret(spans, key, ACCESS_TOKEN, fresh, SECRET, QUERY_VALUE)


# --- refreshes at django-oauth-toolkit ---------------------------------------------------------


def test_refresh_at_the_authorization_server_and_a_dead_grant(spans, auth_server, authorize):
    auth_server.app("client-basic")
    datasource = make_datasource(auth_server)
    token = authorize(datasource)
    old_access, old_refresh = token.access_token, token.refresh_token
    Token.objects.filter(pk=token.pk).update(expires_at=timezone.now() - timedelta(seconds=5))
    _, key = create_api_key("app")
    client = Client(HTTP_AUTHORIZATION=f"Api-Key {key}")
    spans.clear()

    assert client.get("/api/v1/datasources/example/proxy/me").status_code == 200
    found = by_name(spans)
    (proxy,), (refresh,) = found[tracing.PROXY], found[tracing.REFRESH]
    assert refresh.parent.span_id == proxy.context.span_id
    assert refresh.attributes["datasources.grant_type"] == "authorization_code"
    assert refresh.attributes["datasources.situation"] == "request"
    assert refresh.attributes["server.address"] in ("localhost", "127.0.0.1")
    assert refresh.attributes["datasources.outcome"] == "refreshed" and refresh.status.is_ok
    token.refresh_from_db()
    secrets = [key, SECRET, old_access, old_refresh, token.access_token, token.refresh_token]

    # The grant dies at the server (its tokens deleted): invalid_grant, and only that code.
    from oauth2_provider.models import AccessToken, RefreshToken

    RefreshToken.objects.all().delete()
    AccessToken.objects.all().delete()
    Token.objects.filter(pk=token.pk).update(expires_at=timezone.now() - timedelta(seconds=5))
    spans.clear()
    assert client.get("/api/v1/datasources/example/proxy/me").status_code == 409
    found = by_name(spans)
    (refresh,) = found[tracing.REFRESH]
    assert refresh.attributes["error.type"] == "invalid_grant"
    assert refresh.attributes["datasources.outcome"] == "permanent"
    assert not refresh.status.is_ok and refresh.status.description is None
    (proxy,) = found[tracing.PROXY]
    assert proxy.attributes["datasources.refusal"] == "reauthorization_required"
    assert_no_secret(spans, *secrets)


# --- the lease wait ----------------------------------------------------------------------------


def _expired_with_holder(flaky):
    datasource = flaky_datasource(flaky)
    Token.objects.filter(datasource=datasource).update(
        expires_at=timezone.now() - timedelta(seconds=5)
    )
    token = Token.objects.get(datasource=datasource)
    held = lease.acquire(token.pk)  # another holder is refreshing it
    assert held
    return token, held


def test_lease_wait_ends_with_the_holders_token(spans, flaky, monkeypatch):
    """Two threads: a proxy call waits for the lease that this thread holds, then uses the
    token this thread stores."""
    from datasources.tokens import service

    token, held = _expired_with_holder(flaky)
    waiting = threading.Event()
    reload = service.reload

    def observed_reload(*args, **kwargs):
        waiting.set()  # the caller polls: it is waiting for the holder
        return reload(*args, **kwargs)

    monkeypatch.setattr(service, "reload", observed_reload)
    _, key = create_api_key("app")
    answers: list[int] = []

    def call() -> None:
        try:
            client = Client(HTTP_AUTHORIZATION=f"Api-Key {key}")
            answers.append(client.get("/api/v1/datasources/flaky/proxy/me"))
        finally:
            connection.close()

    caller = threading.Thread(target=call)
    caller.start()
    assert waiting.wait(10), "the call never waited for the lease"
    Token.objects.filter(pk=token.pk).update(
        access_token="holders-new-access-token-" + "h" * 20,
        expires_at=timezone.now() + timedelta(hours=1),
        refresh_count=token.refresh_count + 1,
        **lease.NO_LEASE,
    )
    caller.join(20)
    assert [a.status_code for a in answers] == [200]
    assert held and flaky.token_calls == 0  # the waiting call did not refresh itself
    found = by_name(spans)
    (proxy,), (wait,) = found[tracing.PROXY], found[tracing.LEASE_WAIT]
    assert wait.parent.span_id == proxy.context.span_id
    assert wait.attributes["datasources.outcome"] == "use"
    assert wait.attributes["datasources.waited_ms"] > 0 and wait.status.is_ok
    assert tracing.REFRESH not in found
    assert_no_secret(spans, key, ACCESS_TOKEN, "holders-new-access-token-")


def test_lease_wait_that_times_out(spans, flaky, settings):
    _expired_with_holder(flaky)
    _turn(settings, TRACING=True, LEASE_WAIT=0.3)
    _, key = create_api_key("app")
    answer = Client(HTTP_AUTHORIZATION=f"Api-Key {key}").get("/api/v1/datasources/flaky/proxy/me")
    assert answer.status_code == 503
    (wait,) = by_name(spans)[tracing.LEASE_WAIT]
    assert wait.attributes["datasources.outcome"] == "timeout"
    assert wait.attributes["error.type"] == "timeout"
    assert wait.attributes["datasources.waited_ms"] >= 300


# --- switches: off, propagation, a caller's traceparent -----------------------------------------

CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"
CALLER_TRACEPARENT = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"


def test_off_nothing_is_exported_and_nothing_extra_reaches_the_upstream(spans, spy, settings):
    spy_datasource(spy)
    _, key = create_api_key("app")
    client = Client(HTTP_AUTHORIZATION=f"Api-Key {key}")
    assert client.get("/api/v1/datasources/spied/proxy/a").status_code == 200
    on_headers = {k.lower(): v for k, v in spy.seen[-1].headers}
    spans.clear()
    _turn(settings, TRACING=False, TRACING_PROPAGATE=True, TRACING_TRUST_INCOMING=True)
    assert tracing.span(tracing.PROXY) is tracing.NOOP and not tracing.enabled()
    assert client.get("/api/v1/datasources/spied/proxy/a").status_code == 200
    assert spans.get_finished_spans() == ()
    off_headers = {k.lower(): v for k, v in spy.seen[-1].headers}
    assert off_headers.keys() == on_headers.keys()
    assert "traceparent" not in off_headers
    # A caller's own traceparent passes through as any other header (as before tracing).
    client.get("/api/v1/datasources/spied/proxy/a", HTTP_TRACEPARENT=CALLER_TRACEPARENT)
    assert spy.seen[-1].header("traceparent") == CALLER_TRACEPARENT
    assert spans.get_finished_spans() == ()


def test_propagation_sends_our_span_upstream_only_when_asked(spans, spy, settings):
    spy_datasource(spy)
    _, key = create_api_key("app")
    client = Client(HTTP_AUTHORIZATION=f"Api-Key {key}")
    _turn(settings, TRACING=True, TRACING_PROPAGATE=True)
    client.get("/api/v1/datasources/spied/proxy/a", HTTP_TRACEPARENT=CALLER_TRACEPARENT)
    (upstream,) = by_name(spans)["GET"]
    sent = spy.seen[-1].header("traceparent")
    context = upstream.context
    assert sent == f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"
    assert CALLER_TRACE not in sent  # the caller's is replaced; not trusted by default
    assert [n for n in spy.seen[-1].header_names if n == "traceparent"] == ["traceparent"]


def test_a_callers_traceparent_is_continued_only_when_trusted(spans, spy, settings):
    spy_datasource(spy)
    _, key = create_api_key("app")
    client = Client(HTTP_AUTHORIZATION=f"Api-Key {key}")
    client.get("/api/v1/datasources/spied/proxy/a", HTTP_TRACEPARENT=CALLER_TRACEPARENT)
    (proxy,) = by_name(spans)[tracing.PROXY]
    assert proxy.parent is None and f"{proxy.context.trace_id:032x}" != CALLER_TRACE
    spans.clear()
    _turn(settings, TRACING=True, TRACING_TRUST_INCOMING=True)
    client.get("/api/v1/datasources/spied/proxy/a", HTTP_TRACEPARENT=CALLER_TRACEPARENT)
    (proxy,) = by_name(spans)[tracing.PROXY]
    assert f"{proxy.context.trace_id:032x}" == CALLER_TRACE
    assert f"{proxy.parent.span_id:016x}" == CALLER_SPAN


@pytest.mark.parametrize(
    ("code", "kept"),
    [
        ("invalid_grant", "invalid_grant"),
        ("temporarily_unavailable", "temporarily_unavailable"),
        ("Invalid Grant: token abc123", "other"),
        ("invalid_grant\nrefresh_token=xyz", "other"),
        ("x" * 65, "other"),
        (None, "other"),
        (42, "other"),
    ],
)
def test_error_code_keeps_only_plain_codes(code, kept):
    assert tracing.error_code(code) == kept


# --- the documented setup, in a fresh process --------------------------------------------------


class Collector(LocalHTTPServer):
    """An OTLP/HTTP endpoint that keeps the bodies POSTed to /v1/traces."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        super().__init__()

    def handle(self, request: BaseHTTPRequestHandler, body: bytes) -> None:
        if request.path == "/v1/traces":
            self.bodies.append(body)
        self.reply(request, 200, [("Content-Type", "application/x-protobuf")], b"")


SCRIPT = """
import sys, threading, django
django.setup()
from datasources.ops import tracing
# A fresh gunicorn gthread worker: its threads' first spans come at once.
start = threading.Barrier(8)
def first_span():
    start.wait()
    with tracing.span(tracing.PROXY, {"datasources.datasource": "crm"}):
        pass
threads = [threading.Thread(target=first_span) for _ in range(8)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print("imported" if "opentelemetry" in sys.modules else "not-imported")
if tracing.enabled():
    from opentelemetry import trace
    trace.get_tracer_provider().shutdown()  # flushes the batch
"""


def test_off_by_default_no_import_and_on_exports_over_otlp():
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
    collector = Collector().start()
    try:
        env = subprocess_env(
            DJANGO_SETTINGS_MODULE="config.settings",
            ENV_FILE="/dev/null",
            SECRET_KEY="tracing-test",
            FERNET_KEYS="tZ7s0hU3Dj1sH9bq9lq0mY3e3yqg2v3o6pQk2yq6X0E=",
            OTEL_EXPORTER_OTLP_ENDPOINT=collector.base,
            OTEL_SERVICE_NAME="datasources-test",
        )
        env.pop("DATASOURCES_TRACING", None)
        off = subprocess.run(
            [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=60
        )
        assert off.returncode == 0, off.stderr
        assert off.stdout.strip() == "not-imported"
        assert collector.bodies == []

        on = subprocess.run(
            [sys.executable, "-c", SCRIPT],
            env={**env, "DATASOURCES_TRACING": "1"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert on.returncode == 0, on.stderr
        assert "Overriding" not in on.stderr  # one provider installed, not one per thread
        deadline = time.monotonic() + 10
        while not collector.bodies:
            assert time.monotonic() < deadline, "nothing reached the OTLP endpoint"
            time.sleep(0.05)
        body = b"".join(collector.bodies)
        assert body.count(tracing.PROXY.encode()) == 8 and b"datasources-test" in body
    finally:
        collector.stop()
