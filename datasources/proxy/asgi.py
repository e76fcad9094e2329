"""The proxy's thread-pool serving path under an ASGI server, and the ASGI pieces both paths
share (header lists, the wait for a disconnect, the WSGI-like path).

:class:`ProxyHandler` serves what the fast lane (:mod:`.lane`) hands over, or every proxy call
with PROXY_FAST_LANE off; :class:`.router.Router` sends the proxy's URLs here or to the lane and
everything else (admin, authorization flow, API-key pages) to Django's own ASGI handler, so one
command serves both.

Why not Django's ASGI handler for the proxy too: it runs a sync view and every sync middleware
through ``sync_to_async(thread_sensitive=True)``, i.e. one thread per process and several hops
between the event loop and that thread per request, and it consumes a streamed answer's
iterator whole before sending it (a 1 GB answer would sit in memory). :class:`ProxyHandler`
runs the same request cycle (the project's middleware, URL resolving, the same view, the same
signals and error handling: :class:`django.core.handlers.base.BaseHandler` in its sync mode) in
one hop to a thread pool, and moves bodies both ways in bounded pieces: a large request body is
read from the connection as the view reads it, a streamed answer is sent chunk by chunk. What
is decided (who may call, which headers, which answer) is the view's, on both serving paths;
this module only does I/O.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from django.core import signals
from django.core.exceptions import RequestDataTooBig
from django.core.handlers.asgi import ASGIHandler, ASGIRequest, get_script_prefix
from django.core.handlers.base import BaseHandler
from django.http import HttpResponse, HttpResponseBadRequest
from django.urls import set_script_prefix

from ..calls import target
from ..conf import app_settings
from . import answers
from .route import ROUTE, app_path

logger = logging.getLogger("django.request")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


class _ReceivedBody(io.RawIOBase):
    """A request body read from the ASGI connection as the view reads it (in a pool thread),
    so a large upload streams upstream with bounded memory instead of being spooled first."""

    def __init__(self, receive: Receive, loop: asyncio.AbstractEventLoop) -> None:
        self._receive = receive
        self._loop = loop
        self._buffer = b""
        self._more = True
        self.disconnected = False

    def readable(self) -> bool:
        return True

    def _next(self) -> None:
        message = asyncio.run_coroutine_threadsafe(self._received(), self._loop).result()
        if message["type"] == "http.disconnect":
            self.disconnected, self._more = True, False
            return
        self._buffer += message.get("body", b"")
        self._more = message.get("more_body", False)

    async def _received(self) -> dict:
        # A coroutine for run_coroutine_threadsafe: some servers' receive (granian's) returns
        # another kind of awaitable.
        return await self._receive()

    def read(self, size: int = -1) -> bytes:
        while self._more and (size < 0 or len(self._buffer) < size):
            self._next()
        if size < 0 or size >= len(self._buffer):
            data, self._buffer = self._buffer, b""
        else:
            data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class Tracked:
    """An ASGI ``send`` that remembers whether the answer has started: after that an error can
    only abort the connection; before it, the caller still gets a JSON answer."""

    __slots__ = ("send", "started")

    def __init__(self, send: Send) -> None:
        self.send = send
        self.started = False

    async def __call__(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        await self.send(message)


async def answering_failures(
    scope: Scope, send: Send, serve: Callable[[Send], Awaitable[None]]
) -> None:
    """``serve(send)``, with an unexpected error turned into the answer the view gives for it
    (:func:`.answers.failure_refusal`: 503 database_unavailable, else a JSON 500), logged once
    with the datasource's slug and the path, when no answer has started; once one has, the
    error goes to the server, which aborts the connection. Without this, the server answers
    its own plain-text 500 and logs "Exception in ASGI application" with a traceback."""
    tracked = Tracked(send)
    try:
        await serve(tracked)
    except Exception as err:
        if tracked.started:
            raise
        path = scope.get("path", "")
        route = ROUTE.match(app_path(scope)) if path else None
        refused = answers.failure_refusal(err)
        slug = route["slug"] if route else ""
        response = answers.failure_response(None, refused, err, slug, path)
        await send(
            {
                "type": "http.response.start",
                "status": response.status_code,
                "headers": asgi_headers(response),
            }
        )
        await send({"type": "http.response.body", "body": response.content})


class ProxyHandler(ASGIHandler):
    """Django's request cycle in its sync mode, one hop to a thread pool per request."""

    def __init__(self, threads: int | None = None) -> None:
        BaseHandler.__init__(self)
        self.load_middleware(is_async=False)
        self.executor = ThreadPoolExecutor(
            max_workers=threads or app_settings.PROXY_ASGI_THREADS,
            thread_name_prefix="proxy",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await answering_failures(scope, send, lambda send: self._serve(scope, receive, send))

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        body: io.RawIOBase | io.BytesIO
        if _small_body(scope):
            chunks = []
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    break
            body = io.BytesIO(b"".join(chunks))
            receiving = False
        else:
            body = _ReceivedBody(receive, loop)
            receiving = True
        response = await loop.run_in_executor(self.executor, self._respond, scope, body)
        try:
            if receiving:
                # What the view did not read stays unread; the server closes the connection.
                body.close()
            await self._send(response, receive, send, loop, listen=not receiving)
        finally:
            await loop.run_in_executor(self.executor, response.close)

    def _respond(self, scope: Scope, body: io.IOBase) -> HttpResponse:
        """The project's middleware and view, in a pool thread (what WSGIHandler.__call__ does)."""
        set_script_prefix(get_script_prefix(scope))
        signals.request_started.send(sender=self.__class__, scope=scope)
        try:
            request = self.make_request(scope, body)
        except UnicodeDecodeError:
            logger.warning("Bad Request (UnicodeDecodeError)", extra={"status_code": 400})
            return HttpResponseBadRequest()
        except RequestDataTooBig:
            return HttpResponse("413 Payload too large", status=413)
        response = self.get_response(request)
        response._handler_class = self.__class__
        return response

    def make_request(self, scope: Scope, body: io.IOBase) -> ASGIRequest:
        return ASGIRequest(wsgi_like_path(scope), body)

    async def _send(
        self,
        response: HttpResponse,
        receive: Receive,
        send: Send,
        loop: asyncio.AbstractEventLoop,
        *,
        listen: bool,
    ) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": response.status_code,
                "headers": asgi_headers(response),
            }
        )
        if not response.streaming:
            await send({"type": "http.response.body", "body": response.content})
            return
        # A streamed answer, a chunk at a time from a pool thread; a client that goes away
        # stops it (the upstream connection is then released by the response's close()).
        disconnected = asyncio.ensure_future(wait_for_disconnect(receive)) if listen else None
        chunks: Iterator[bytes] = iter(response.streaming_content)
        try:
            while disconnected is None or not disconnected.done():
                chunk = await loop.run_in_executor(self.executor, next, chunks, None)
                if chunk is None:
                    break
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            else:
                return
            await send({"type": "http.response.body"})
        finally:
            if disconnected is not None and not disconnected.done():
                disconnected.cancel()


def asgi_headers(response: HttpResponse) -> list[tuple[bytes, bytes]]:
    """A response's headers and cookies as ASGI sends them (both ASGI serving paths)."""
    headers = [(name.encode("ascii"), value.encode("latin1")) for name, value in response.items()]
    for cookie in response.cookies.values():
        headers.append((b"Set-Cookie", cookie.output(header="").encode("ascii").strip()))
    return headers


async def wait_for_disconnect(receive: Receive) -> None:
    """Return when the client has gone away (both serving paths stop a streamed answer then);
    the messages before it (body the view did not read) are dropped."""
    while (await receive())["type"] != "http.disconnect":
        pass


def wsgi_like_path(scope: Scope) -> Scope:
    """The scope with its path decoded from the raw bytes as Django's WSGI handler decodes it:
    bytes that are not UTF-8 stay percent-encoded (servers decode them to U+FFFD, which would
    hide them from the path checks in :mod:`.target`)."""
    path = wsgi_path(scope)
    return scope if path is scope["path"] else {**scope, "path": path}


def wsgi_path(scope: Scope) -> str:
    """:func:`wsgi_like_path`'s path (the scope's own when there is no raw path)."""
    raw = scope.get("raw_path")
    if not raw:
        return scope["path"]
    path = target.caller_path(raw)
    root = scope.get("root_path", "")
    return path if not root or path.startswith(root) else root + path


def _small_body(scope: Scope) -> bool:
    """Whether the request body is read before the view runs (it fits the replay buffer)."""
    length = None
    for name, value in scope.get("headers", ()):
        if name == b"transfer-encoding":
            return False
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                return True
    return length is None or length <= app_settings.PROXY_REPLAY_MAX_BYTES
