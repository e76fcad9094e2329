"""The ASGI serving path as production runs it: a real uvicorn process serving config.asgi.

One process serves the admin (Django's ASGI handler) and the proxy (datasources/proxy/asgi.py);
ASGI lifespan is answered; bodies of hundreds of megabytes stream through it both ways without
the process growing (its peak resident memory, VmHWM, is compared before and after). The proxy's
behaviours themselves are proven on this path by the suites that use the ``serving`` fixture.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from datasources.proxy.apikeys import create_api_key

from .appserver import free_port, wait_for
from .helpers import ROOT, subprocess_env
from .test_retries import ACCESS_TOKEN, flaky_datasource

pytestmark = pytest.mark.django_db(transaction=True)

SIZE = 200 * 1024 * 1024
CHUNK = b"x" * (1 << 20)


class Sink:
    """An upstream that counts a request body as it arrives and streams answers of any size."""

    def __init__(self) -> None:
        sink = self
        self.received: list[int] = []
        self.authorizations: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _answer(self, body: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                sink.authorizations.append(self.headers.get("Authorization", ""))
                left, count = int(self.headers["Content-Length"]), 0
                while left:
                    part = self.rfile.read(min(left, 1 << 20))
                    left, count = left - len(part), count + len(part)
                sink.received.append(count)
                self._answer(b'{"received": %d}' % count)

            def do_GET(self) -> None:
                sink.authorizations.append(self.headers.get("Authorization", ""))
                size = int(self.path.rsplit("/", 1)[1])
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(size))
                self.end_headers()
                while size:
                    part = CHUNK[: min(size, len(CHUNK))]
                    self.wfile.write(part)
                    size -= len(part)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def sink() -> Iterator[Sink]:
    upstream = Sink()
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def uvicorn_server(django_db_setup, django_db_blocker, tmp_path_factory) -> Iterator[tuple]:
    """uvicorn serving config.asgi (lifespan on: it fails to start unless lifespan is answered)."""
    directory = tmp_path_factory.mktemp("uvicorn")
    with django_db_blocker.unblock():
        env = subprocess_env()
    port = free_port()
    with open(directory / "uvicorn.log", "wb") as log:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "uvicorn", "config.asgi:application"),
                *("--host", "127.0.0.1", "--port", str(port), "--lifespan", "on"),
                *("--loop", "uvloop", "--http", "httptools", "--no-access-log"),
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_for(f"{url}/healthz", time.monotonic() + 60)
            yield url, process.pid
        finally:
            process.terminate()
            process.wait(10)
    assert "Application startup complete" in (directory / "uvicorn.log").read_text()


def peak_rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024


def test_one_process_serves_the_admin_and_the_proxy(uvicorn_server, sink):
    url, _ = uvicorn_server
    datasource = flaky_datasource(sink, slug="asgi")
    _, key = create_api_key("app")

    login = requests.get(f"{url}/admin/login/", timeout=30)
    assert login.status_code == 200 and "csrfmiddlewaretoken" in login.text

    anonymous = requests.get(f"{url}/api/v1/datasources/{datasource.slug}/proxy/1", timeout=30)
    assert anonymous.status_code == 401
    assert anonymous.json()["error"] == "unauthorized"
    assert anonymous.headers["WWW-Authenticate"] == 'Api-Key realm="datasources"'
    assert sink.authorizations == []

    answer = requests.get(
        f"{url}/api/v1/datasources/{datasource.slug}/proxy/5",
        headers={"Authorization": f"Api-Key {key}"},
        timeout=30,
    )
    assert (answer.status_code, answer.content) == (200, b"xxxxx")
    assert answer.headers["Content-Security-Policy"].startswith("sandbox")
    assert sink.authorizations == [f"Bearer {ACCESS_TOKEN}"]


def test_large_bodies_stream_both_ways_in_bounded_memory(uvicorn_server, sink):
    url, pid = uvicorn_server
    datasource = flaky_datasource(sink, slug="asgi-large")
    _, key = create_api_key("app")
    proxied = f"{url}/api/v1/datasources/{datasource.slug}/proxy"
    headers = {"Authorization": f"Api-Key {key}"}
    warm = requests.post(f"{proxied}/up", data=b"w" * 2_000_000, headers=headers, timeout=60)
    assert warm.json() == {"received": 2_000_000}
    before = peak_rss(pid)

    class Body:
        """SIZE bytes made as they are read (with a length: no chunked encoding)."""

        def __init__(self) -> None:
            self.left = SIZE

        def __len__(self) -> int:
            return self.left

        def read(self, amount: int = -1) -> bytes:
            amount = self.left if amount < 0 else min(amount, self.left)
            self.left -= amount
            return b"u" * amount

    up = requests.post(f"{proxied}/up", data=Body(), headers=headers, timeout=300)
    assert up.json() == {"received": SIZE}
    received = 0
    with requests.get(f"{proxied}/{SIZE}", headers=headers, stream=True, timeout=300) as down:
        assert down.status_code == 200
        for chunk in down.iter_content(1 << 20):
            received += len(chunk)
    assert received == SIZE
    assert peak_rss(pid) - before < 30 * 1024 * 1024


def test_lifespan_shutdown_writes_what_the_process_holds(monkeypatch, caplog):
    """Both batches are written before shutdown completes; one failing (the database gone)
    does not keep the other from being written, and is logged by name only."""
    from django.db import OperationalError

    from datasources.proxy import calllog, usage
    from datasources.proxy.router import Router

    written: list[str] = []

    def usage_fails() -> None:
        raise OperationalError("could not connect to postgres://user:secret@db/x")

    monkeypatch.setattr(usage, "flush", usage_fails)
    monkeypatch.setattr(calllog, "flush", lambda: written.append("call log"))
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    sent: list[str] = []

    async def receive() -> dict:
        return next(messages)

    async def send(message: dict) -> None:
        sent.append(message["type"])
        if message["type"] == "lifespan.shutdown.complete":
            assert written == ["call log"]  # written before the server is told it may exit

    asyncio.run(Router(django_app=None)({"type": "lifespan"}, receive, send))
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert "Usage counts lost at shutdown (OperationalError)" in caplog.text
    assert "secret" not in caplog.text


@pytest.mark.parametrize("started", [False, True])
def test_an_error_after_the_answer_started_aborts_before_it_is_answered_in_json(started, caplog):
    """:func:`answering_failures`: before any answer started, an error of ours becomes the view's
    JSON 500; once the start was sent, the error goes to the server (it aborts the connection)
    and nothing more is sent."""
    import json

    from datasources.proxy.asgi import answering_failures

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def serve(send) -> None:
        if started:
            await send({"type": "http.response.start", "status": 200, "headers": []})
        raise RuntimeError("broken")

    scope = {"type": "http", "path": "/api/v1/datasources/demo/proxy/x", "root_path": ""}
    if started:
        with pytest.raises(RuntimeError):
            asyncio.run(answering_failures(scope, send, serve))
        assert [m["type"] for m in sent] == ["http.response.start"]
        return
    asyncio.run(answering_failures(scope, send, serve))
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 500
    assert json.loads(sent[1]["body"])["error"] == "internal_error"
    assert (
        "Proxy call to demo failed (RuntimeError): /api/v1/datasources/demo/proxy/x" in caplog.text
    )
