"""The fast lane's one rule (may it serve this call?) as a table, and proof that a hot-path call
is served by the lane itself while a session call is handed over before anything went upstream."""

from __future__ import annotations

import pytest

from datasources.calls.limits import Verdict
from datasources.proxy.lane import HandOver, hand_over_reason

FINE = dict(middleware_known=True, chunked=False, length=10, api_key=True)


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        ({}, None),
        ({"dpop": False, "token_usable": True}, None),
        ({"gate": Verdict.PASS}, None),
        ({"middleware_known": False}, HandOver.MIDDLEWARE),
        ({"middleware_known": False, "api_key": False}, HandOver.MIDDLEWARE),
        ({"chunked": True}, HandOver.CHUNKED),
        ({"length": 1024 * 1024}, None),  # PROXY_REPLAY_MAX_BYTES: still buffered
        ({"length": 1024 * 1024 + 1}, HandOver.LARGE_BODY),
        ({"api_key": False}, HandOver.NOT_API_KEY),
        ({"dpop": True}, HandOver.DPOP),
        ({"token_usable": False}, HandOver.TOKEN),
        ({"gate": Verdict.PROBE}, HandOver.GATE),
        ({"gate": Verdict.RATE_LIMITED}, HandOver.GATE),
        ({"gate": Verdict.CIRCUIT_OPEN}, HandOver.GATE),
        ({"chunked": True, "api_key": False}, HandOver.CHUNKED),
        ({"traced": True}, HandOver.TRACED),
        ({"traced": True, "chunked": True, "api_key": False}, HandOver.TRACED),
        ({"traced": True, "middleware_known": False}, HandOver.MIDDLEWARE),
    ],
)
def test_hand_over_reason(facts, expected):
    assert hand_over_reason(**{**FINE, **facts}) is expected


# --- what the lane remembers per process ------------------------------------------------------

pytestmark_db = pytest.mark.django_db(transaction=True)


@pytest.fixture
def lane_client(monkeypatch, spy):
    """An API-key client whose proxy calls go through the ASGI application (the lane)."""
    from django.test import Client

    from datasources.proxy.apikeys import create_api_key

    from .helpers import connected
    from .serving import serve_proxy_through_asgi

    serve_proxy_through_asgi(monkeypatch)
    datasource = connected(spy)
    _, key = create_api_key("app")
    return Client(HTTP_AUTHORIZATION=f"Api-Key {key}"), datasource


@pytestmark_db
def test_an_admitted_host_does_not_admit_another(lane_client, spy, settings):
    """Django's host check runs once per host and is remembered: a host that is not allowed is
    still answered by Django (400) after an allowed one was served, and nothing goes upstream."""
    from .serving import LANE

    client, datasource = lane_client
    settings.ALLOWED_HOSTS = ["api.example"]
    url = f"/api/v1/datasources/{datasource.slug}/proxy/items"
    served = LANE.served
    for _ in range(2):
        assert client.get(url, HTTP_HOST="api.example").status_code == 200
    assert LANE.served == served + 2
    assert client.get(url, HTTP_HOST="evil.example").status_code == 400
    assert (
        client.get(url, HTTP_HOST="api.example", HTTP_X_FORWARDED_HOST="evil.example").status_code
        == 200
    )
    assert len(spy.seen) == 3  # the X-Forwarded-Host one: not trusted, so api.example served
    settings.USE_X_FORWARDED_HOST = True
    response = client.get(url, HTTP_HOST="api.example", HTTP_X_FORWARDED_HOST="evil.example")
    assert response.status_code == 400
    assert len(spy.seen) == 3


@pytestmark_db
def test_hsts_follows_each_calls_scheme(lane_client, settings):
    """Whether a call came over HTTPS (here: the proxy's X-Forwarded-Proto) is part of what is
    remembered: the HSTS header goes on the secure calls' answers only."""
    client, datasource = lane_client
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    settings.SECURE_HSTS_SECONDS = 3600
    url = f"/api/v1/datasources/{datasource.slug}/proxy/items"
    plain = client.get(url)
    secure = client.get(url, HTTP_X_FORWARDED_PROTO="https")
    again = client.get(url, HTTP_X_FORWARDED_PROTO="http")
    assert [r.status_code for r in (plain, secure, again)] == [200, 200, 200]
    assert "Strict-Transport-Security" not in plain
    assert secure["Strict-Transport-Security"] == "max-age=3600"
    assert "Strict-Transport-Security" not in again


@pytestmark_db
def test_a_cached_token_is_read_again_after_the_cache_time_however_busy(
    lane_client, spy, settings, monkeypatch
):
    """Using a cached token does not extend its life: a token replaced by another process
    (a queryset update sends no signal) is picked up PROXY_CACHE_SECONDS after it was cached,
    while calls keep coming."""
    from django.utils import timezone

    from datasources.models import Token
    from datasources.proxy import cache

    client, datasource = lane_client
    settings.DATASOURCES = {**settings.DATASOURCES, "PROXY_CACHE_SECONDS": 10}
    clock = [1000.0]
    monkeypatch.setattr(cache.time, "monotonic", lambda: clock[0])
    url = f"/api/v1/datasources/{datasource.slug}/proxy/items"
    assert client.get(url).status_code == 200  # cached at t=1000 until 1010
    Token.objects.filter(datasource=datasource).update(
        access_token="replaced-elsewhere", last_refreshed_at=timezone.now()
    )
    for now in (1004.0, 1008.0, 1012.0):
        clock[0] = now
        assert client.get(url).status_code == 200
    sent = [seen.header("Authorization") for seen in spy.seen]
    assert sent[:3] == [sent[0]] * 3 and sent[0] != "Bearer replaced-elsewhere"
    assert sent[3] == "Bearer replaced-elsewhere"


@pytestmark_db
def test_a_body_the_lane_read_goes_upstream_from_the_view_after_a_hand_over(lane_client, spy):
    """The lane reads a small body before it knows whether it serves the call; when it hands
    the call over (here: the circuit is half-open, so this call is the view's probe) the view
    reads the same body again and sends it."""
    import time
    from dataclasses import replace

    from datasources.calls import health

    from .serving import LANE

    client, datasource = lane_client
    now = time.time()
    health._update(
        datasource.pk,
        lambda known: replace(known, failures=5, opened_at=now - 60, open_until=now - 1),
    )
    handed_over = LANE.handed_over.get(HandOver.GATE, 0)
    body = b'{"name": "sent once, read twice"}'
    response = client.post(
        f"/api/v1/datasources/{datasource.slug}/proxy/items",
        data=body,
        content_type="application/json",
    )
    assert response.status_code == 200
    assert LANE.handed_over.get(HandOver.GATE, 0) == handed_over + 1
    [seen] = spy.seen
    assert (seen.method, seen.body) == ("POST", body)


# --- the same path on both serving paths ------------------------------------------------------


@pytestmark_db
@pytest.mark.parametrize("sent", ["raw", "percent-encoded"])
@pytest.mark.parametrize("lane", ["wsgi", "asgi"])
def test_raw_non_ascii_path_characters_reach_the_upstream_percent_encoded_on_both_paths(
    spy, monkeypatch, lane, sent
):
    """A path with characters outside ASCII (here U+3031, which NFKC does not turn into a
    slash or dot) is one path however the caller's request line carries it (raw UTF-8 bytes, as
    some clients send them, or percent-encoded): both serving paths decode it to the same
    string and forward it percent-encoded by the same rule (calls/target.py), as the README
    says, instead of the ASGI path reading the raw bytes as Latin-1 and refusing a 400."""
    from django.test import Client

    from datasources.proxy.apikeys import create_api_key

    from . import serving
    from .test_attacks import connected

    datasource = connected(spy)
    _, key = create_api_key("app")
    if lane == "asgi":
        serving.serve_proxy_through_asgi(monkeypatch)
        if sent == "raw":
            # What a server puts in the scope for a request line with raw UTF-8 bytes.
            plain = serving.scope_from_environ

            def raw_bytes(environ: dict) -> dict:
                return {**plain(environ), "raw_path": environ["PATH_INFO"].encode("latin1")}

            monkeypatch.setattr(serving, "scope_from_environ", raw_bytes)
    served = serving.LANE.served
    path = "〱google.com/x" if sent == "raw" else "%E3%80%B1google.com/x"
    response = Client().get(
        f"/api/v1/datasources/{datasource.slug}/proxy/{path}",
        HTTP_AUTHORIZATION=f"Api-Key {key}",
    )
    assert response.status_code == 200, response.content
    assert [seen.target for seen in spy.seen] == ["/api/%E3%80%B1google.com/x"]
    if lane == "asgi":
        assert serving.LANE.served == served + 1  # the lane itself, not a hand-over


@pytestmark_db
def test_an_answer_dropped_before_the_lane_answered_is_a_502_not_a_500(monkeypatch, spy):
    """A small answer is read whole before the lane answers; when the upstream drops the
    connection in the middle of it, the caller gets the proxy's 502 (the upstream failed),
    never a 500 (an error of ours) nor a truncated 200."""
    import socket
    import threading

    from django.test import Client

    from datasources.proxy.apikeys import create_api_key

    from .helpers import connected_at
    from .serving import LANE, serve_proxy_through_asgi

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def answer_half() -> None:
        with listener:
            connection, _ = listener.accept()
            with connection:
                connection.recv(65536)
                connection.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b'Content-Length: 100\r\n\r\n{"partial": '
                )

    server = threading.Thread(target=answer_half, daemon=True)
    server.start()
    serve_proxy_through_asgi(monkeypatch)
    datasource = connected_at(f"http://127.0.0.1:{port}")
    _, key = create_api_key("app")
    served = LANE.served
    answer = Client(HTTP_AUTHORIZATION=f"Api-Key {key}").get(
        f"/api/v1/datasources/{datasource.slug}/proxy/items"
    )
    server.join(10)
    assert LANE.served == served + 1  # the lane itself answered
    assert answer.status_code == 502
    assert answer.json()["error"] == "upstream_unreachable"
