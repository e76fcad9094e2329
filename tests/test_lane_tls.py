"""HTTPS upstreams on the fast lane: served by the lane itself (its counters say so) with the TLS
of the view's urllib3 path: the default context (the system's CAs), a datasource's own CA bundle,
its client certificate (mutual TLS), the server's certificate and name always checked, one pool
per context. Every failure is run through the view (WSGI) and through the lane, and both must
give the same answer, with nothing sent upstream.

The test CA stands in for a public one by being the process's default trust store
(``SSL_CERT_FILE``, which OpenSSL reads when a context loads the default certificates).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from django.http import HttpResponse
from django.test import Client

from datasources.models import Datasource
from datasources.proxy import upstream
from datasources.proxy.apikeys import create_api_key
from datasources.security import tls

from . import certs
from .helpers import ACCESS_TOKEN, connected_at
from .serving import LANE, serve_proxy_through_asgi
from .spy import SpyUpstream

pytestmark = pytest.mark.django_db


@pytest.fixture(scope="module")
def ca() -> certs.Issued:
    return certs.make_ca("Lane TLS CA")


@pytest.fixture(autouse=True)
def _fresh_default_context(fresh_proxy_cache) -> Iterator[None]:
    """The default TLS context built anew (and the proxy's cache forgotten) for each test."""
    upstream.default_context.cache_clear()
    yield
    upstream.default_context.cache_clear()


def server_context(issued: certs.Issued, client_ca: certs.Issued | None = None) -> ssl.SSLContext:
    """The spy's side: its certificate, ALPN offering h2 first (a client that offers h2 would
    get it), and, with ``client_ca``, a client certificate required."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory() as directory:
        context.load_cert_chain(*issued.write(Path(directory), "server"))
    context.set_alpn_protocols(["h2", "http/1.1"])
    if client_ca is not None:
        context.load_verify_locations(cadata=client_ca.cert_pem)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


@pytest.fixture
def https_spy() -> Iterator[Callable[..., SpyUpstream]]:
    servers: list[SpyUpstream] = []

    def start(
        issued: certs.Issued, host: str = "127.0.0.1", client_ca: certs.Issued | None = None
    ) -> SpyUpstream:
        spy = SpyUpstream(host, server_context(issued, client_ca)).start()
        servers.append(spy)
        return spy

    yield start
    for spy in servers:
        spy.stop()


@pytest.fixture
def trusted_by_default(ca, tmp_path, monkeypatch) -> None:
    """The test CA as the system's trust store, for urllib3 (which loads it per connection)
    and for the lane's default context (built anew)."""
    bundle = tmp_path / "system-cas.pem"
    bundle.write_text(ca.cert_pem)
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    upstream.default_context.cache_clear()


def connected_secure(base: str, slug: str = "secure", **fields) -> Datasource:
    """A client-credentials datasource (``secure`` unless named) on ``base``/api/ with a token
    usable as it is: :func:`~tests.helpers.connected_at` named by its slug."""
    return connected_at(base, slug=slug, name=slug, **fields)


@pytest.fixture
def api() -> Client:
    _, key = create_api_key("app")
    return Client(HTTP_AUTHORIZATION=f"Api-Key {key}")


def on_the_lane(monkeypatch, call: Callable[[], HttpResponse]) -> HttpResponse:
    """``call()`` through the ASGI application, served by the fast lane itself."""
    with monkeypatch.context() as patched:
        serve_proxy_through_asgi(patched)
        served, handed_over = LANE.served, dict(LANE.handed_over)
        response = call()
    assert LANE.served == served + 1
    assert LANE.handed_over == handed_over  # nothing handed to the view
    return response


def both_paths(monkeypatch, call: Callable[[], HttpResponse]) -> tuple[HttpResponse, ...]:
    """The same call through the view (WSGI), then through the lane."""
    return call(), on_the_lane(monkeypatch, call)


def refusal(response: HttpResponse) -> tuple[int, dict]:
    return response.status_code, response.json()


# --- served --------------------------------------------------------------------------------


@pytest.mark.usefixtures("trusted_by_default")
def test_the_default_context_trusts_the_system_store_and_offers_only_http_1_1(
    ca, https_spy, api, monkeypatch
):
    spy = https_spy(certs.server_cert(ca))
    connected_secure(spy.base)
    view, lane = both_paths(monkeypatch, lambda: api.get("/api/v1/datasources/secure/proxy/x?a=1"))
    assert (view.status_code, view.json()) == (lane.status_code, lane.json()) == (200, {"ok": True})
    assert [seen.target for seen in spy.seen] == ["/api/x?a=1", "/api/x?a=1"]
    assert [seen.header("Authorization") for seen in spy.seen] == [f"Bearer {ACCESS_TOKEN}"] * 2
    assert [seen.header("Host") for seen in spy.seen] == [f"127.0.0.1:{spy.port}"] * 2
    # The spy prefers h2; both clients offered HTTP/1.1 only.
    assert [seen.alpn for seen in spy.seen] == ["http/1.1", "http/1.1"]
    assert [seen.certificate for seen in spy.seen] == [None, None]


def test_a_datasource_ca_bundle_by_host_name_built_off_the_loop_once(https_spy, api, monkeypatch):
    own_ca = certs.make_ca("Datasource's own CA")
    spy = https_spy(certs.server_cert(own_ca, ip=None, names=("localhost",)))
    datasource = connected_secure(f"https://localhost:{spy.port}", tls_ca_bundle=own_ca.cert_pem)
    assert tls.built_context(datasource, api=True) is None
    built_in: list[bool] = []
    real = tls.context_for

    def spied(datasource, *, api):
        # The test's thread is the lane's "pool thread" (tests/serving.py); the loop has its own.
        built_in.append(threading.current_thread() is threading.main_thread())
        return real(datasource, api=api)

    monkeypatch.setattr(tls, "context_for", spied)
    first = on_the_lane(monkeypatch, lambda: api.get("/api/v1/datasources/secure/proxy/one"))
    assert built_in == [True]  # built once, in the pool thread
    context = tls.built_context(datasource, api=True)
    assert context is not None and context is real(datasource, api=True)
    second = on_the_lane(monkeypatch, lambda: api.get("/api/v1/datasources/secure/proxy/two"))
    assert built_in == [True]  # then taken as built, on the loop
    view = api.get("/api/v1/datasources/secure/proxy/three")  # the view: the same context
    assert [r.status_code for r in (first, second, view)] == [200, 200, 200]
    assert [seen.target for seen in spy.seen] == ["/api/one", "/api/two", "/api/three"]
    assert [seen.header("Host") for seen in spy.seen] == [f"localhost:{spy.port}"] * 3
    assert [seen.alpn for seen in spy.seen] == ["http/1.1"] * 3


def test_mutual_tls_presents_the_datasources_client_certificate(ca, https_spy, api, monkeypatch):
    client_ca = certs.make_ca("Client CA")
    client = certs.client_cert(client_ca, "lane-client")
    spy = https_spy(certs.server_cert(ca), client_ca=client_ca)
    connected_secure(
        spy.base,
        tls_ca_bundle=ca.cert_pem,
        tls_client_certificate=client.cert_pem,
        tls_client_key=client.key_pem,
        certificate_bound_tokens=True,
    )
    view, lane = both_paths(monkeypatch, lambda: api.post("/api/v1/datasources/secure/proxy/m"))
    assert view.status_code == lane.status_code == 200
    der = client.cert.public_bytes(serialization.Encoding.DER)
    assert [seen.certificate for seen in spy.seen] == [der, der]
    assert [(seen.method, seen.target) for seen in spy.seen] == [("POST", "/api/m")] * 2


def test_connections_are_reused_per_context_never_across_contexts(ca, https_spy):
    """Two datasources with different CA bundles on the same host and port: each has its
    keep-alive connection, neither uses the other's."""
    spy = https_spy(certs.server_cert(ca))
    one = connected_secure(spy.base, slug="one", tls_ca_bundle=ca.cert_pem)
    two = connected_secure(
        spy.base, slug="two", tls_ca_bundle=ca.cert_pem + certs.make_ca("Other").cert_pem
    )
    contexts = [tls.context_for(one, api=True), tls.context_for(two, api=True)]
    assert contexts[0] is not contexts[1]

    async def calls() -> None:
        pool = upstream.Pool(4)
        try:
            for index in (0, 1, 0, 1, 0):
                answer = await pool.request(
                    *("GET", "https", "127.0.0.1", spy.port, f"/{index}", {}, None),
                    context=contexts[index],
                    connect_timeout=5,
                    read_timeout=5,
                )
                assert (answer.status, await answer.read()) == (200, b'{"ok": true}')
                answer.release()
        finally:
            await pool.close()

    asyncio.run(calls())
    peers = {seen.target: set() for seen in spy.seen}
    for seen in spy.seen:
        peers[seen.target].add(seen.peer)
    assert [seen.target for seen in spy.seen] == ["/0", "/1", "/0", "/1", "/0"]
    assert len(peers["/0"]) == 1 and len(peers["/1"]) == 1  # kept alive, reused
    assert peers["/0"] != peers["/1"]  # one connection per context


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_an_ipv6_loopback_upstream(ca, https_spy, api, monkeypatch):
    """``https://[::1]:port``: connected without the brackets, the address checked against the
    certificate, ``Host: [::1]:port`` as urllib3 sends it. Without IPv6 on this machine, both
    paths refuse the same way."""
    if not ipv6_loopback():
        connected_secure("https://[::1]:9", tls_ca_bundle=ca.cert_pem)
        view, lane = both_paths(monkeypatch, lambda: api.get("/api/v1/datasources/secure/proxy/"))
        assert refusal(view) == refusal(lane)
        assert refusal(lane)[1]["error"] == "upstream_unreachable"
        return
    spy = https_spy(certs.server_cert(ca, ip="::1"), host="::1")
    connected_secure(spy.base, tls_ca_bundle=ca.cert_pem)
    view, lane = both_paths(monkeypatch, lambda: api.get("/api/v1/datasources/secure/proxy/v6"))
    assert view.status_code == lane.status_code == 200
    assert [seen.header("Host") for seen in spy.seen] == [f"[::1]:{spy.port}"] * 2
    assert [seen.peer[0] for seen in spy.seen] == ["::1", "::1"]


# --- refused: the same answer as the view, nothing sent ------------------------------------


def test_a_certificate_for_another_host_name(ca, https_spy, api, monkeypatch):
    spy = https_spy(certs.server_cert(ca, ip=None, names=("api.example.test",)))
    connected_secure(f"https://localhost:{spy.port}", tls_ca_bundle=ca.cert_pem)
    view, lane = both_paths(monkeypatch, lambda: api.get("/api/v1/datasources/secure/proxy/x"))
    assert refusal(view) == refusal(lane)
    status, body = refusal(lane)
    assert (status, body["error"]) == (502, "upstream_tls_failed")
    assert "not valid for 'localhost'" in body["detail"], body
    assert spy.seen == []


@pytest.mark.usefixtures("trusted_by_default")
def test_a_certificate_for_another_address_with_the_default_context(
    ca, https_spy, api, monkeypatch
):
    spy = https_spy(certs.server_cert(ca, ip="127.0.0.2"))
    connected_secure(spy.base)
    view, lane = both_paths(monkeypatch, lambda: api.get("/api/v1/datasources/secure/proxy/x"))
    assert refusal(view) == refusal(lane)
    assert refusal(lane)[0] == 502 and "IP address mismatch" in refusal(lane)[1]["detail"]
    assert spy.seen == []


@pytest.mark.parametrize("bundle", [False, True], ids=["system-cas", "another-ca-bundle"])
def test_an_untrusted_certificate(ca, https_spy, api, monkeypatch, bundle):
    spy = https_spy(certs.server_cert(ca))
    other = certs.make_ca("Not the server's CA")
    connected_secure(spy.base, tls_ca_bundle=other.cert_pem if bundle else "")
    view, lane = both_paths(monkeypatch, lambda: api.get("/api/v1/datasources/secure/proxy/x"))
    assert refusal(view) == refusal(lane)
    status, body = refusal(lane)
    assert (status, body["error"]) == (502, "upstream_tls_failed")
    assert "the server's certificate is not trusted" in body["detail"], body
    assert spy.seen == []


class HandshakeServer:
    """A TCP server that takes a client's first bytes (its TLS ClientHello) and then closes
    (``close``), resets (``reset``) or says nothing until the test ends (``silent``)."""

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour
        self.received: list[bytes] = []
        self.held: list[socket.socket] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self.received.append(connection.recv(65536))
            if self.behaviour == "silent":
                self.held.append(connection)
                continue
            if self.behaviour == "reset":
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            connection.close()

    def stop(self) -> None:
        self.listener.close()
        for connection in self.held:
            connection.close()


@pytest.mark.parametrize(
    ("behaviour", "status", "error", "detail"),
    [
        ("close", 502, "upstream_tls_failed", "TLS failed (UNEXPECTED_EOF_WHILE_READING)"),
        ("reset", 502, "upstream_unreachable", "unreachable (ProtocolError)"),
        ("silent", 504, "upstream_timeout", "did not answer in time"),
    ],
)
def test_a_server_that_fails_the_handshake(
    ca, api, monkeypatch, settings, behaviour, status, error, detail
):
    """Closed during the handshake, reset, or no handshake within the connect timeout (the
    handshake has the connect timeout on both paths)."""
    settings.DATASOURCES = {**settings.DATASOURCES, "PROXY_CONNECT_TIMEOUT": 0.5}
    server = HandshakeServer(behaviour)
    try:
        connected_secure(f"https://127.0.0.1:{server.port}", tls_ca_bundle=ca.cert_pem)
        view, lane = both_paths(monkeypatch, lambda: api.get("/api/v1/datasources/secure/proxy/"))
    finally:
        server.stop()
    assert refusal(view) == refusal(lane)
    assert (lane.status_code, lane.json()["error"]) == (status, error)
    assert detail in lane.json()["detail"], lane.json()
    # Two connections, each sent a TLS handshake record (0x16) and nothing in clear.
    assert [data[:1] for data in server.received] == [b"\x16", b"\x16"]
    assert all(b"HTTP/1.1" not in data for data in server.received)


def test_a_configuration_that_cannot_be_built_is_refused_alike(ca, api, monkeypatch):
    client = certs.client_cert(ca, "broken")
    datasource = connected_secure(
        "https://127.0.0.1:9",
        tls_client_certificate=client.cert_pem,
        tls_client_key=client.key_pem,
        certificate_bound_tokens=True,
    )
    # A key that stopped matching after it was saved (checked on save, not on every call).
    other = certs.client_cert(ca, "other")
    Datasource.objects.filter(pk=datasource.pk).update(tls_client_key=other.key_pem)
    view, lane = both_paths(monkeypatch, lambda: api.get("/api/v1/datasources/secure/proxy/"))
    assert refusal(view) == refusal(lane)
    assert (lane.status_code, lane.json()["error"]) == (502, "upstream_tls_failed")
    assert "could not be loaded" in lane.json()["detail"]
    assert "PRIVATE" not in lane.content.decode()
