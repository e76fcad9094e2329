"""The shipped production recipe, run: Debian's nginx with deploy/nginx.conf (TLS) in front of
each web server with the project's own settings, on loopback ports: uvicorn (ASGI, the proxy's
fast lane) and gunicorn (WSGI, the alternative), each started with the README's command.

The commands are parsed from README.md and deploy/nginx.conf is used as shipped, except for what
cannot be the same here: the listen ports, the app server's port, the certificate, the
access-log and static paths (each replaced string must occur in its file, so the test breaks if
the recipe changes shape). The checks, against both servers: the proxy's functional checks
through nginx (what reached a spy upstream, and under uvicorn that the fast lane served the
API-key calls), no authorization code or state in any log, and stalled (slowloris) connections
that leave the recipe's other callers unaffected (gunicorn alone is blocked by them, uvicorn
holds them itself). Under uvicorn, a SIGTERM writes the usage counts and call-log rows still
held in memory.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from django.contrib.auth.models import Permission
from django.test import Client

from datasources.models import DatasourceUsage, ProxyCall
from datasources.proxy.apikeys import create_api_key

from .appserver import SERVERS, free_port, server_argv, server_env, wait_for
from .helpers import ACCESS_TOKEN, ROOT, connected
from .spy import Answer
from .test_attacks import HOSTILE_HEADERS, HOSTILE_HTML

pytestmark = pytest.mark.django_db(transaction=True)

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
#: Stalled connections held open against each server alone and against the recipe. Enough to
#: take every one of gunicorn's threads (4 workers x 8; --reuse-port spreads connections over
#: the workers by a hash, so each needs several times its 8).
STALLED = 200
#: The loggers whose DEBUG line names each request sent upstream: the fast lane's asyncio
#: client (datasources/proxy/upstream.py) and urllib3, under the Django view.
LANE_LOGGER, VIEW_LOGGER = "datasources.proxy.upstream", "urllib3.connectionpool"


@dataclass
class Stack:
    server: str  # "uvicorn" or "gunicorn"
    https: str  # https://127.0.0.1:PORT (nginx)
    http: str  # http://127.0.0.1:PORT (nginx, redirects)
    app: str  # http://127.0.0.1:PORT (the web server directly, for the control)
    cert: str
    access_log: Path
    app_log: Path
    app_process: subprocess.Popen

    def get(self, path: str, **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", 10)
        return requests.get(self.https + path, verify=self.cert, **kwargs)

    def upstream_requests(self, logger: str) -> list[str]:
        """The requests (method and path, query redacted) that ``logger`` logged sending
        upstream, in order."""
        pattern = re.compile(rf' DEBUG {re.escape(logger)} \S+ "(\S+ \S+) HTTP/1\.1"')
        return pattern.findall(self.app_log.read_text())


def self_signed(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def recipe(directory: Path, *, http: int, https: int, app: int) -> Path:
    """deploy/nginx.conf with this machine's ports and paths, inside a minimal nginx.conf."""
    text = (ROOT / "deploy" / "nginx.conf").read_text()
    cert, key = self_signed(directory)
    (directory / "static").mkdir()
    (directory / "static" / "probe.txt").write_text("served by nginx")
    for old, new, count in (
        ("server 127.0.0.1:8000;", f"server 127.0.0.1:{app};", 1),
        ("listen 80;", f"listen 127.0.0.1:{http};", 1),
        ("    listen [::]:80;\n", "", 1),
        ("listen 443 ssl;", f"listen 127.0.0.1:{https} ssl;", 1),
        ("    listen [::]:443 ssl;\n", "", 1),
        ("/etc/ssl/certs/datasources.pem", str(cert), 1),
        ("/etc/ssl/private/datasources.key", str(key), 1),
        ("/var/log/nginx/datasources.access.log", str(directory / "access.log"), 2),
        ("root /srv/datasources/var;", f"root {directory};", 1),
    ):
        assert text.count(old) == count, f"deploy/nginx.conf changed shape: {old!r}"
        text = text.replace(old, new)
    (directory / "datasources.conf").write_text(text)
    temp = "\n".join(
        f"    {kind}_temp_path {directory / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    main = directory / "nginx.conf"
    main.write_text(
        ("user root;\n" if os.geteuid() == 0 else "")
        + f"worker_processes 1;\ndaemon off;\npid {directory / 'nginx.pid'};\n"
        + "events { worker_connections 1024; }\n"
        + f"http {{\n    access_log off;\n{temp}\n    include {directory / 'datasources.conf'};\n}}\n"
    )
    return main


@contextmanager
def running(server: str, directory: Path, env: dict[str, str]) -> Iterator[Stack]:
    """nginx with the recipe in front of ``server`` started with the README's command, up."""
    ports = {name: free_port() for name in ("http", "https", "app")}
    main = recipe(directory, **ports)
    app_log = directory / f"{server}.log"
    with open(app_log, "wb") as log:
        app = subprocess.Popen(
            server_argv(server, ports["app"]),
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    proxy = subprocess.Popen(
        [NGINX, "-p", str(directory), "-c", str(main), "-e", str(directory / "error.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        stack = Stack(
            server=server,
            https=f"https://127.0.0.1:{ports['https']}",
            http=f"http://127.0.0.1:{ports['http']}",
            app=f"http://127.0.0.1:{ports['app']}",
            cert=str(directory / "cert.pem"),
            access_log=directory / "access.log",
            app_log=app_log,
            app_process=app,
        )
        deadline = time.monotonic() + 60
        wait_for(f"{stack.app}/healthz", deadline)
        wait_for(f"{stack.https}/healthz", deadline, verify=stack.cert)
        yield stack
    finally:
        for process in (proxy, app):
            process.terminate()
        for process in (proxy, app):
            try:
                process.wait(40)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def _stack(request, django_db_blocker, tmp_path_factory, **env: str) -> Iterator[Stack]:
    if not Path(NGINX).exists():
        pytest.skip("nginx is not installed (make test installs Debian's nginx as root)")
    directory = tmp_path_factory.mktemp(f"recipe-{request.param}")
    with running(request.param, directory, server_env(django_db_blocker, **env)) as stack:
        yield stack


@pytest.fixture(scope="module", params=SERVERS)
def stack(request, django_db_setup, django_db_blocker, tmp_path_factory) -> Iterator[Stack]:
    """The recipe with each server, shared by the module's tests."""
    yield from _stack(request, django_db_blocker, tmp_path_factory)


@pytest.fixture
def own_stack(request, django_db_setup, django_db_blocker, tmp_path_factory) -> Iterator[Stack]:
    """The recipe with the server named by the test's indirect parameter, for one test that
    stops it. Usage counts and call-log rows are written only when the server stops."""
    yield from _stack(
        request,
        django_db_blocker,
        tmp_path_factory,
        DATASOURCES_USAGE_FLUSH_INTERVAL="3600",
        DATASOURCES_CALL_LOG_FLUSH_INTERVAL="3600",
    )


def test_the_proxy_works_through_the_recipe(stack, spy, django_user_model):
    # Slugs differ per test: the server runs with the production cache (PROXY_CACHE_SECONDS).
    datasource = connected(spy, slug="recipe-functional")
    _, key = create_api_key("through-nginx", datasources=[datasource])
    auth = {"Authorization": f"Api-Key {key}"}
    proxied = f"/api/v1/datasources/{datasource.slug}/proxy/"

    # Static files come from STATIC_ROOT.
    static = stack.get("/static/probe.txt")
    assert (static.status_code, static.text) == (200, "served by nginx")

    # http:// is redirected to https://, and nothing is proxied over plain http.
    plain = requests.get(f"{stack.http}{proxied}things", headers=auth, allow_redirects=False)
    assert plain.status_code == 301 and plain.headers["Location"].startswith("https://")

    # Method, path, query and body reach the upstream as sent; the token is ours.
    response = stack.get(f"{proxied}things/42?q=1&tag=a&tag=b", headers=auth)
    assert response.status_code == 200 and response.json() == {"ok": True}
    response = requests.post(
        stack.https + proxied + "things",
        data=b'{"hello": "world"}',
        headers={**auth, "Content-Type": "application/json", "Cookie": "sessionid=x"},
        verify=stack.cert,
        timeout=10,
    )
    assert response.status_code == 200
    # A chunked body: nginx reads it whole and passes it on with a Content-Length.
    response = requests.put(
        stack.https + proxied + "things/42",
        data=iter([b'{"chunked": ', b"true}"]),
        headers=auth,
        verify=stack.cert,
        timeout=10,
    )
    assert response.status_code == 200
    get, post, put = spy.seen
    assert (get.method, get.target) == ("GET", "/api/things/42?q=1&tag=a&tag=b")
    assert get.header("Authorization") == f"Bearer {ACCESS_TOKEN}"
    assert "x-forwarded-for" not in get.header_names and "x-real-ip" not in get.header_names
    assert (post.method, post.body) == ("POST", b'{"hello": "world"}')
    assert "cookie" not in post.header_names and key not in str(post.headers)
    assert (put.method, put.body, put.header("Content-Length")) == (
        "PUT",
        b'{"chunked": true}',
        "17",
    )

    # A large answer streams through nginx's buffers intact.
    spy.answers["/api/big"] = Answer(
        headers=[("Content-Type", "application/octet-stream")], body=b"x" * 5_000_000
    )
    big = stack.get(f"{proxied}big", headers=auth)
    assert big.status_code == 200 and len(big.content) == 5_000_000

    # Refused before any upstream call, through nginx too. (nginx resolves plain and encoded
    # dot segments itself, so some of these reach Django outside the proxy's URL: 404.)
    before = len(spy.seen)
    for path in ("a%3F/../../__stats", "..;/admin", "a/%2e%2e/%2e%2e/admin", "%252e%252e/x"):
        refused = stack.get(proxied + path, headers=auth)
        assert refused.status_code in (400, 404), (path, refused.status_code)
    assert stack.get(proxied + "..;/admin", headers=auth).status_code == 400
    for method in ("TRACE", "PROPFIND", "PURGE"):
        refused = requests.request(
            method, stack.https + proxied + "things", headers=auth, verify=stack.cert, timeout=10
        )
        assert refused.status_code == 405, method
    assert stack.get(f"{proxied}things").status_code == 401
    assert stack.get("/api/v1/datasources/nope/proxy/x", headers=auth).status_code == 404
    assert len(spy.seen) == before

    # A signed-in browser gets an inert answer; cookies are neither sent nor set.
    spy.answers["/api/page"] = Answer(headers=HOSTILE_HEADERS, body=HOSTILE_HTML)
    user = django_user_model.objects.create_user("browser-user", password="x")
    user.user_permissions.add(Permission.objects.get(codename="use_datasource"))
    client = Client()
    client.force_login(user)
    session = {"Cookie": f"sessionid={client.cookies['sessionid'].value}"}
    page = stack.get(f"{proxied}page", headers=session)
    assert page.status_code == 200 and page.content == HOSTILE_HTML
    assert page.headers["Content-Security-Policy"].startswith("sandbox;")
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    for name in ("Access-Control-Allow-Origin", "Clear-Site-Data", "Set-Cookie", "Refresh"):
        assert name not in page.headers, name
    assert "cookie" not in spy.seen[-1].header_names

    # Which path sent each call upstream: under uvicorn the fast lane took the API-key calls
    # (nginx turned the chunked body into one with a Content-Length) and handed the signed-in
    # browser's to the view; under gunicorn the view sent them all.
    by_key = [
        "GET /api/things/42?[redacted]",
        "POST /api/things",
        "PUT /api/things/42",
        "GET /api/big",
    ]
    lane, view = stack.upstream_requests(LANE_LOGGER), stack.upstream_requests(VIEW_LOGGER)
    if stack.server == "uvicorn":
        assert (lane, view) == (by_key, ["GET /api/page"])
    else:
        assert (lane, view) == ([], [*by_key, "GET /api/page"])


def test_no_code_or_state_in_the_access_log(stack):
    code, state = "code-" + "c" * 20, "state-" + "s" * 20
    response = stack.get(
        f"/api/v1/datasources/authorize?code={code}&state={state}", allow_redirects=False
    )
    assert response.status_code == 302  # to the sign-in page
    deadline = time.monotonic() + 10
    while "/api/v1/datasources/authorize" not in stack.access_log.read_text():
        assert time.monotonic() < deadline, "the callback was not logged"
        time.sleep(0.05)
    for log in (stack.access_log, stack.app_log):
        text = log.read_text()
        assert code not in text and state not in text, log.name
    assert "GET /api/v1/datasources/authorize HTTP/1.1" in stack.access_log.read_text()


def _stall_plain(address: tuple[str, int], count: int) -> list[socket.socket]:
    """Connections that send part of a request line and headers, then nothing."""
    held = []
    for _ in range(count):
        sock = socket.create_connection(address, timeout=5)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        held.append(sock)
    return held


def _stall_tls(address: tuple[str, int], count: int, cert: str) -> list[socket.socket]:
    """Three kinds, in turn: a TCP connection that never starts TLS; TLS with half the headers;
    TLS with full headers of a 1 MB POST and a few bytes of its body."""
    context = ssl.create_default_context(cafile=cert)
    held = []
    for index in range(count):
        raw = socket.create_connection(address, timeout=5)
        if index % 3 == 0:
            held.append(raw)
            continue
        sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
        if index % 3 == 1:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        else:
            sock.sendall(
                b"POST /api/v1/datasources/x/proxy/y HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b'Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n{"a": '
            )
        held.append(sock)
    return held


def _still_open(sock: socket.socket) -> bool:
    """The server has neither answered nor closed the connection: it is still being held."""
    sock.setblocking(False)
    try:
        sock.recv(1)
    except (BlockingIOError, ssl.SSLWantReadError):
        return True  # nothing to read (a TLS session ticket, if any, was consumed)
    except OSError:
        return False
    return False  # an answer (e.g. 408) or EOF


def _timed(call) -> float:
    started = time.monotonic()
    response = call()
    elapsed = time.monotonic() - started
    assert response.status_code == 200, response.status_code
    return elapsed


def test_stalled_connections_leave_the_recipe_answering(stack, spy):
    datasource = connected(spy, slug="recipe-slowloris")
    _, key = create_api_key("slowloris", datasources=[datasource])
    auth = {"Authorization": f"Api-Key {key}"}
    proxied = f"/api/v1/datasources/{datasource.slug}/proxy/items"

    # Control, the server alone: gunicorn's threads each wait on a stalled connection, so
    # others wait too; uvicorn's event loop holds the stalled connections and answers others.
    app_address = ("127.0.0.1", int(stack.app.rsplit(":", 1)[1]))
    held = _stall_plain(app_address, STALLED)
    try:
        if stack.server == "gunicorn":
            with pytest.raises(requests.Timeout):
                requests.get(f"{stack.app}/healthz", timeout=2)
        else:
            assert _timed(lambda: requests.get(f"{stack.app}/healthz", timeout=2)) < 2
            assert sum(_still_open(sock) for sock in held) == STALLED
    finally:
        for sock in held:
            sock.close()
    wait_for(f"{stack.app}/healthz", time.monotonic() + 30)

    def calls() -> list[float]:
        timings = []
        for _ in range(10):
            timings.append(_timed(lambda: stack.get("/healthz", timeout=10)))
            timings.append(_timed(lambda: stack.get(proxied, headers=auth, timeout=10)))
        return timings

    baseline = calls()
    https_address = ("127.0.0.1", int(stack.https.rsplit(":", 1)[1]))
    started = time.monotonic()
    held = _stall_tls(https_address, STALLED, stack.cert)
    try:
        during = calls()
        stalled_for = time.monotonic() - started
        still_held = sum(_still_open(sock) for sock in held)
    finally:
        for sock in held:
            sock.close()
    print(
        f"\n{stack.server}: {STALLED} stalled connections held {stalled_for:.1f} s ({still_held} still open at "
        f"the end); other callers: median {statistics.median(during) * 1000:.0f} ms, max "
        f"{max(during) * 1000:.0f} ms (without stalled connections: median "
        f"{statistics.median(baseline) * 1000:.0f} ms, max {max(baseline) * 1000:.0f} ms)"
    )
    # Every call answered, none waited for the stalled connections (client_header_timeout and
    # client_body_timeout are 10 s; a blocked call would take at least that).
    assert max(during) < 5, during
    assert still_held == STALLED, "nginx dropped stalled connections before the calls ended"
    assert len(spy.seen) == 20  # the 20 proxied calls, and nothing from the stalled POSTs


@pytest.mark.parametrize("own_stack", ["uvicorn", "gunicorn"], indirect=True)
def test_graceful_shutdown_writes_the_usage_counts(own_stack, spy):
    """Each worker keeps its usage counts and call-log rows in memory between writes
    (USAGE_FLUSH_INTERVAL, an hour here); what it holds when it is stopped is written at the
    lifespan's shutdown under uvicorn (datasources/proxy/asgi.py: uvicorn runs no exit hooks
    after SIGTERM), by the exit hooks of gunicorn's workers (usage.py, calllog.py)."""
    datasource = connected(spy, slug="recipe-shutdown")
    _, key = create_api_key("shutdown", datasources=[datasource])
    auth = {"Authorization": f"Api-Key {key}"}
    calls = 40
    for index in range(calls):
        response = own_stack.get(
            f"/api/v1/datasources/{datasource.slug}/proxy/n/{index}", headers=auth
        )
        assert response.status_code == 200
    served_by = LANE_LOGGER if own_stack.server == "uvicorn" else VIEW_LOGGER
    assert len(own_stack.upstream_requests(served_by)) == calls
    # Nothing written yet: every count and row is still in the workers' memory.
    assert not DatasourceUsage.objects.filter(datasource=datasource).exists()
    assert not ProxyCall.objects.filter(datasource=datasource).exists()

    own_stack.app_process.send_signal(signal.SIGTERM)
    assert own_stack.app_process.wait(60) == 0
    usage = DatasourceUsage.objects.get(datasource=datasource)
    assert (usage.calls, usage.errors, usage.last_status) == (calls, 0, 200)
    paths = ProxyCall.objects.filter(datasource=datasource).values_list("path", flat=True)
    assert sorted(paths) == sorted(f"n/{index}" for index in range(calls))
