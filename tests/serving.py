"""Both serving paths for the proxy's tests: Django's WSGI handler (as gunicorn runs it) and the
ASGI application (as uvicorn runs it): the fast lane (datasources/proxy/lane.py) and, for what it
hands over, the thread-pool path (datasources/proxy/asgi.py).

``serve_proxy_through_asgi`` makes every django.test.Client send the proxy's URLs through the
real ASGI application: the client's request (what a server would have parsed) is turned into an
ASGI scope, the body is delivered in 64 KiB ``http.request`` messages, and the
``http.response.*`` messages that come back become the client's response (streamed when the
application sent the body in pieces). Other URLs (admin, authorization) stay on the WSGI path.
``LANE.served`` counts the calls the fast lane served itself, ``LANE.handed_over`` the others
(by reason), so a test can prove which lane answered.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from concurrent.futures import Executor, Future
from http.cookies import SimpleCookie
from urllib.parse import quote

from django.core.handlers.wsgi import WSGIRequest
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from django.http import HttpResponse, StreamingHttpResponse
from django.test.client import ClientHandler

from datasources.proxy import lane as fast_lane
from datasources.proxy.asgi import ProxyHandler
from datasources.proxy.route import PROXY_PATH

CHUNK = 64 * 1024


class CallerThreadExecutor(Executor):
    """The fast path's thread pool, replaced by the test's own thread: its event loop runs in a
    helper thread, and the work it hands to "the pool" (the request cycle, reading a streamed
    answer) runs in the thread that called the test client. So the view sees the test's
    database connection and transaction, as it does on the WSGI test client."""

    def __init__(self) -> None:
        self.work: queue.SimpleQueue = queue.SimpleQueue()

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        self.work.put((future, fn, args, kwargs))
        return future

    def run_until_finished(self) -> None:
        while (item := self.work.get()) is not None:
            future, fn, args, kwargs = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as err:
                future.set_exception(err)

    def finished(self) -> None:
        self.work.put(None)


class _TestProxyHandler(ProxyHandler):
    """The fast path with the test client's CSRF switch (Client(enforce_csrf_checks=...))."""

    def __init__(self, enforce_csrf_checks: bool) -> None:
        super().__init__(threads=1)
        self.executor.shutdown()
        self.executor = CallerThreadExecutor()
        self.enforce_csrf_checks = enforce_csrf_checks

    def make_request(self, scope, body):
        request = super().make_request(scope, body)
        request._dont_enforce_csrf_checks = not self.enforce_csrf_checks
        return request


class _TestLane(fast_lane.Lane):
    """The fast lane over the test's thread-pool path; the test's database connection stays
    open across its pool jobs (as the test client keeps it across requests)."""

    housekeeping = staticmethod(lambda: None)

    def __init__(self) -> None:
        super().__init__(fallback=_TestProxyHandler(False))
        self.handlers = {
            False: self.fallback,
            True: _TestProxyHandler(True),
        }

    def use(self, enforce_csrf_checks: bool) -> None:
        self.fallback = self.handlers[enforce_csrf_checks]


#: The one lane every test client's proxy calls go through (its counters are the tests').
LANE = _TestLane()


def scope_from_environ(environ: dict) -> dict:
    raw_path = quote(environ["PATH_INFO"].encode("iso-8859-1"), safe="/:@!$&'()*+,;=-._~")
    headers = []
    for name, value in environ.items():
        if name.startswith("HTTP_"):
            headers.append((name[5:].replace("_", "-").lower().encode(), value.encode("latin1")))
        elif name in ("CONTENT_TYPE", "CONTENT_LENGTH") and value:
            headers.append((name.replace("_", "-").lower().encode(), str(value).encode()))
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": environ["REQUEST_METHOD"],
        "scheme": environ.get("wsgi.url_scheme", "http"),
        "path": environ["PATH_INFO"].encode("iso-8859-1").decode("utf-8", "replace"),
        "raw_path": raw_path.encode("ascii"),
        "query_string": environ.get("QUERY_STRING", "").encode("latin1"),
        "root_path": "",
        "headers": headers,
        "client": (environ.get("REMOTE_ADDR", "127.0.0.1"), 40000),
        "server": (environ.get("SERVER_NAME", "testserver"), int(environ.get("SERVER_PORT", 80))),
    }


def through_asgi(client_handler: ClientHandler, environ: dict) -> HttpResponse:
    scope = scope_from_environ(environ)
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length) if length else b""
    messages: list[dict] = []

    async def run() -> None:
        pieces = [body[i : i + CHUNK] for i in range(0, len(body), CHUNK)] or [b""]
        queue = [
            {"type": "http.request", "body": piece, "more_body": i < len(pieces) - 1}
            for i, piece in enumerate(pieces)
        ]
        finished = asyncio.Event()

        async def receive() -> dict:
            if queue:
                return queue.pop(0)
            await finished.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            messages.append(message)

        try:
            await handler(scope, receive, send)
            # Let a flush the call started (counts, call log) finish, as a server would.
            if handler._flushing is not None:
                await handler._flushing
        finally:
            await fast_lane.pool().close()
            finished.set()
            handler.fallback.executor.finished()

    LANE.use(client_handler.enforce_csrf_checks)
    handler = LANE
    failure: list[BaseException] = []

    def loop() -> None:
        try:
            asyncio.run(run())
        except BaseException as err:
            failure.append(err)

    # As the WSGI test client does: the test's database connection stays open across the call.
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        thread = threading.Thread(target=loop)
        thread.start()
        handler.fallback.executor.run_until_finished()
        thread.join()
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)
    if failure:
        raise failure[0]
    start, bodies = messages[0], messages[1:]
    assert start["type"] == "http.response.start"
    content = [message.get("body", b"") for message in bodies]
    if bodies and bodies[0].get("more_body"):
        response: HttpResponse = StreamingHttpResponse(iter(content), status=start["status"])
    else:
        response = HttpResponse(b"".join(content), status=start["status"])
    del response["Content-Type"]
    for name, value in start["headers"]:
        name, value = name.decode("ascii"), value.decode("latin1")
        if name.lower() == "set-cookie":
            cookie = SimpleCookie()
            cookie.load(value)
            response.cookies.update(cookie)
        elif name in response:
            response[name] = f"{response[name]}, {value}"
        else:
            response[name] = value
    response.wsgi_request = WSGIRequest(environ)
    return response


def serve_proxy_through_asgi(monkeypatch) -> None:
    """Route the proxy's URLs of every test client through the ASGI application."""
    original = ClientHandler.__call__

    def call(self, environ):
        if PROXY_PATH.match(environ["PATH_INFO"]):
            return through_asgi(self, environ)
        return original(self, environ)

    monkeypatch.setattr(ClientHandler, "__call__", call)
