"""The proxy's fast lane: the hot path served on the ASGI server's event loop.

A call to ``/api/v1/datasources/<slug>/proxy/...`` with an API key and a small body is served
here without a Django request cycle and without a thread hop: the caller, datasource and token
come from the process caches (:mod:`.cache`, or from the database in a pool thread when they
are not cached), the token is used as it is when the token rules say so
(:func:`datasources.tokens.usable_as_is`), the health gate admits from its cached record, and
the call goes upstream through an asyncio client (:mod:`.upstream`). Every decision is made by
the same functions the view uses (the call's steps in :mod:`datasources.calls.call`,
:mod:`.callers`, :mod:`datasources.calls.transport`, :mod:`.health`; refusals rendered by
:mod:`.answers`); the lane imports nothing from the view. The parts of Django's middleware that
touch a proxy answer are Django's own classes, called directly.

Everything else is handed to the thread-pool path (:class:`.asgi.ProxyHandler`, the Django view)
*before anything was sent upstream* (:func:`hand_over_reason` says why, for the log and the
tests): signed-in sessions, refusals, a token to refresh or to wait for, a health gate that is
not a plain PASS, DPoP, chunked or large bodies, middleware the lane does not know, and every
call while tracing is on (the view records the spans). Once a call went upstream it is finished
here: the refresh-and-retry after an "expired" answer, the opt-in retries, counting and logging.

HTTPS upstreams are served here with the contexts the view's urllib3 pools use: the
datasource's own (:func:`datasources.security.tls.context_for`: its CA bundle, its client certificate),
built in a pool thread the first time, or the client's default (urllib3's).

Tracing: while it is on, the lane hands every call to the view, whose spans are the documented
ones (docs/tracing.md); spans of the lane's own would go in :meth:`Lane.serve` (the call) and
:meth:`Lane._send_upstream` (one attempt).
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import ssl
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

from django.conf import settings
from django.core.handlers.asgi import ASGIRequest
from django.core.signals import setting_changed
from django.db import close_old_connections
from django.dispatch import receiver
from django.http import HttpResponse, StreamingHttpResponse
from django.middleware.clickjacking import XFrameOptionsMiddleware
from django.middleware.common import CommonMiddleware
from django.middleware.security import SecurityMiddleware
from django.views.decorators.debug import sensitive_variables

from .. import tokens
from ..calls import binding, health, limits, retries, transport
from ..calls import call as steps
from ..calls.attempts import URLLIB3
from ..conf import app_settings
from ..models import Token
from ..ops import tracing
from ..security import tls
from . import answers, cache, callers, calllog, usage
from .asgi import (
    ProxyHandler,
    Receive,
    Scope,
    Send,
    answering_failures,
    asgi_headers,
    wait_for_disconnect,
)
from .callers import Refused
from .incoming import Headers, Incoming
from .route import PROXY_PATH, ROUTE
from .upstream import Headers as AnswerHeaders
from .upstream import Pool, Response, default_context

logger = logging.getLogger(__name__)

#: The middleware whose effect on a proxy answer the lane reproduces (by calling it); with any
#: other middleware configured every call takes the thread-pool path.
KNOWN_MIDDLEWARE = frozenset(
    {
        "django.middleware.security.SecurityMiddleware",
        "whitenoise.middleware.WhiteNoiseMiddleware",
        "django.contrib.sessions.middleware.SessionMiddleware",
        "django.middleware.common.CommonMiddleware",
        "django.middleware.csrf.CsrfViewMiddleware",
        "django.contrib.auth.middleware.AuthenticationMiddleware",
        "django.contrib.messages.middleware.MessageMiddleware",
        "django.middleware.clickjacking.XFrameOptionsMiddleware",
    }
)


class HandOver(enum.StrEnum):
    """Why a call is handed to the thread-pool path (before anything went upstream)."""

    MIDDLEWARE = "middleware"  # middleware the lane does not reproduce
    CHUNKED = "chunked"  # a body without Content-Length
    LARGE_BODY = "large_body"  # a body above PROXY_REPLAY_MAX_BYTES: streamed by the view
    NOT_API_KEY = "not_api_key"  # a session (cookie) caller, or no credentials
    REFUSED = "refused"  # the view answers refusals (401, 403, 404, 405, 400, 409, 429, 503)
    REQUEST = "request"  # something Django's request handling answers (host, encoding)
    DPOP = "dpop"  # proofs are made by the view
    TOKEN = "token"  # the token needs a refresh, a wait, or is unusable
    GATE = "gate"  # rate limited, circuit open, or this call would be the probe
    TRACED = "traced"  # tracing is on: the view records the spans (datasources/ops/tracing.py)


def hand_over_reason(
    *,
    middleware_known: bool = True,
    chunked: bool = False,
    length: int = 0,
    api_key: bool = True,
    traced: bool = False,
    dpop: bool = False,
    token_usable: bool = True,
    gate: limits.Verdict = limits.Verdict.PASS,
) -> HandOver | None:
    """The one rule for "may the fast lane serve this call?": None (yes) or why not. Asked in
    steps as the facts become known (each fact not given defaults to "fine")."""
    if not middleware_known:
        return HandOver.MIDDLEWARE
    if traced:
        return HandOver.TRACED
    if chunked:
        return HandOver.CHUNKED
    if length > app_settings.PROXY_REPLAY_MAX_BYTES:
        return HandOver.LARGE_BODY
    if not api_key:
        return HandOver.NOT_API_KEY
    if dpop:
        return HandOver.DPOP
    if not token_usable:
        return HandOver.TOKEN
    if gate is not limits.Verdict.PASS:
        return HandOver.GATE
    return None


class _Middleware:
    """Django's middleware classes whose request checks and response headers apply to a proxy
    call, built from the current settings."""

    #: Admissions remembered per process (beyond it, each call asks the middleware again).
    MAX_ADMISSIONS = 1024

    def __init__(self) -> None:
        def unused(request: Any) -> HttpResponse:  # pragma: no cover - never called
            raise AssertionError

        self.known = set(settings.MIDDLEWARE) <= KNOWN_MIDDLEWARE
        self.security = SecurityMiddleware(unused)
        self.common = CommonMiddleware(unused)
        self.xframe = XFrameOptionsMiddleware(unused)
        self._admitted: dict[tuple, list[tuple[str, bytes, bytes]]] = {}
        # What the middleware's request checks read besides the settings (see _admission_key).
        ssl_header = settings.SECURE_PROXY_SSL_HEADER
        ssl_meta = ssl_header[0] if isinstance(ssl_header, tuple | list) and ssl_header else ""
        self._ssl_header = ssl_meta.removeprefix("HTTP_") if ssl_meta else None
        self._cacheable = not ssl_meta or ssl_meta.startswith("HTTP_")
        self._by_agent = bool(settings.DISALLOWED_USER_AGENTS)
        self._by_path = bool(settings.SECURE_SSL_REDIRECT or settings.PREPEND_WWW)

    def admit(self, incoming: Incoming) -> list[tuple[str, bytes, bytes]] | None:
        """None when Django's middleware would not let the call reach the view (host not
        allowed, user agent refused, HTTPS or www redirect); else the headers its response
        side adds to an answer (:meth:`added`, as lower-case name, name, value). Remembered
        per combination of the facts the checks read, so Django's code runs once per host,
        not once per call."""
        key = self._admission_key(incoming)
        found = self._admitted.get(key) if key is not None else None
        if found is not None:
            return found
        request = incoming.request()
        if not self.admits(request):
            return None
        found = [
            (name.lower(), name.encode("latin1"), value.encode("latin1"))
            for name, value in self.added(request)
        ]
        if key is not None and len(self._admitted) < self.MAX_ADMISSIONS:
            self._admitted[key] = found
        return found

    def _admission_key(self, incoming: Incoming) -> tuple | None:
        """Everything :meth:`admits` and :meth:`added` read of a request: the host (Host,
        X-Forwarded-Host, else the server's name and port), whether it is secure (the scheme,
        SECURE_PROXY_SSL_HEADER's header), the user agent when some are disallowed, the path
        when a redirect could depend on it. None: not remembered."""
        if not self._cacheable:
            return None
        headers, scope = incoming.headers, incoming.scope
        server = scope.get("server")
        return (
            scope.get("scheme"),
            tuple(server) if server else None,
            headers.get("host"),
            headers.get("x-forwarded-host"),
            headers.get("x-forwarded-port"),
            headers.get(self._ssl_header) if self._ssl_header else None,
            headers.get("user-agent") if self._by_agent else None,
            incoming.path if self._by_path else None,
        )

    def admits(self, request: ASGIRequest) -> bool:
        """The request passes the checks Django's middleware makes before the view (allowed
        host, user agent, HTTPS redirect, www prefix)."""
        try:
            return (
                self.security.process_request(request) is None
                and self.common.process_request(request) is None
            )
        except Exception:  # DisallowedHost, PermissionDenied: Django's answer, not ours
            return False

    def finish(self, request: ASGIRequest, response: HttpResponse) -> HttpResponse:
        """What the response middleware adds, in Django's order (the reverse of MIDDLEWARE)."""
        response = self.xframe.process_response(request, response)
        response = self.common.process_response(request, response)
        return self.security.process_response(request, response)

    def added(self, request: ASGIRequest) -> list[tuple[str, str]]:
        """The headers :meth:`finish` adds to a streamed answer that has none of them: each is
        added only where the answer lacks it (these middleware never replace a header), so
        the relayed answers' headers are built without a response object."""
        blank = StreamingHttpResponse(())
        del blank["Content-Type"]
        return list(self.finish(request, blank).items())


@functools.lru_cache(maxsize=1024)
def _encoded(name: str) -> tuple[str, bytes]:
    """(lower-case name, bytes) of an answer's header name for :func:`relayed_headers`:
    answers repeat their names, so each is worked out once."""
    return (name.lower(), name.encode("latin1"))


def relayed_headers(
    headers: list[tuple[str, str]], length: int | None, added: list[tuple[str, bytes, bytes]]
) -> list[tuple[bytes, bytes]]:
    """An answer's headers with the middleware's additions ``added`` (and, for a buffered
    answer of ``length`` bytes, CommonMiddleware's Content-Length), as ASGI sends them."""
    present = set()
    out = []
    for name, value in headers:
        lowered, encoded = _encoded(name)
        present.add(lowered)
        out.append((encoded, value.encode("latin1")))
    if length is not None and "content-length" not in present:
        out.append((b"Content-Length", str(length).encode("ascii")))
    for lowered, name, value in added:
        if lowered not in present:
            out.append((name, value))
    return out


@functools.cache
def _middleware() -> _Middleware:
    return _Middleware()


@receiver(setting_changed)
def _settings_changed(**kwargs: Any) -> None:
    _middleware.cache_clear()


_pools: dict[asyncio.AbstractEventLoop, Pool] = {}


def pool() -> Pool:
    """This event loop's keep-alive pool (one loop per server process)."""
    loop = asyncio.get_running_loop()
    found = _pools.get(loop)
    if found is None:
        for old in [other for other in _pools if other.is_closed()]:
            del _pools[old]
        found = _pools[loop] = Pool(app_settings.PROXY_POOL_SIZE)
    return found


class _AsyncWire:
    """:mod:`.attempts`' view of the lane's answers."""

    connection_errors = URLLIB3.connection_errors  # the client raises urllib3's exceptions

    @staticmethod
    def status(response: Response) -> int:
        return response.status

    @staticmethod
    def headers(response: Response) -> AnswerHeaders:
        return response.headers

    @staticmethod
    async def discard(response: Response) -> None:
        await response.discard()

    @staticmethod
    async def peek(response: Response, limit: int) -> tuple[bytes | None, Response]:
        return await response.peek(limit), response


_WIRE = _AsyncWire()


class Lane:
    """The ASGI application for the proxy's URLs: the fast lane, and ``fallback`` (the Django
    view in a thread pool) for every call it hands over. ``served`` and ``handed_over`` count
    calls (the tests check which lane served them)."""

    def __init__(self, fallback: ProxyHandler | None = None) -> None:
        self.fallback = fallback or ProxyHandler()
        self.served = 0
        self.handed_over: dict[HandOver, int] = {}
        self._flushing: asyncio.Future | None = None

    def flush_soon(self, *, counts: bool, log: bool) -> None:
        """Write the counts and/or the call log in the thread pool, not waiting for it (one
        flush at a time: calls that find the batches due meanwhile are in the next one)."""
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.ensure_future(self._flush_in_pool(counts, log))

    async def _flush_in_pool(self, counts: bool, log: bool) -> None:
        """A flush as a background task whose failure is logged here, once: nobody awaits
        the task, and an exception left in it would only surface as asyncio's "Task
        exception was never retrieved" (the batches themselves keep what was not written)."""
        try:
            await self.blocking(functools.partial(_flush, counts, log))
        except Exception as err:
            # Where, but not the message: a database error's can carry its URL and password.
            logger.error(
                "The proxy's usage/call-log flush failed (%s) at:\n%s",
                type(err).__name__,
                "".join(traceback.format_tb(err.__traceback__)).rstrip(),
            )

    async def blocking(self, fn: Callable[[], Any]) -> Any:
        """``fn`` in the thread pool (database, token endpoint), with Django's connection
        housekeeping around it as a request would have."""
        return await asyncio.get_running_loop().run_in_executor(
            self.fallback.executor, self._in_thread, fn
        )

    #: What a request's start and end do to database connections (the tests' harness keeps
    #: the test's connection instead, as Django's test client does).
    housekeeping: Callable[[], None] = staticmethod(close_old_connections)

    def _in_thread(self, fn: Callable[[], Any]) -> Any:
        self.housekeeping()
        try:
            return fn()
        finally:
            self.housekeeping()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await answering_failures(scope, send, lambda send: self._route(scope, receive, send))

    @sensitive_variables("key")
    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve the call here, or hand it over (an error before any answer started is
        answered by :func:`.asgi.answering_failures`, as the view answers it)."""
        middleware = _middleware()
        headers = Headers(scope.get("headers", ()))
        declared = (headers.get("Content-Length") or "").rpartition(",")[2]
        key = callers.api_key_of(headers)
        reason = hand_over_reason(
            middleware_known=middleware.known,
            traced=tracing.enabled(),
            chunked="Transfer-Encoding" in headers,
            length=int(declared) if declared.isdigit() else 0,
            api_key=bool(key),
        )
        if reason is not None:
            return await self._hand_over(reason, scope, receive, send)
        # A small body: read it now (the view would read it whole too).
        messages, parts = [], []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            messages.append(message)
            parts.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        outcome = await self.serve(scope, headers, key, b"".join(parts), receive, send, middleware)
        if outcome is not None:  # nothing went upstream: the view reads the body again
            await self._hand_over(outcome, scope, _Replay(messages, receive).receive, send)

    async def _hand_over(self, reason: HandOver, scope: Scope, receive: Receive, send: Send):
        self.handed_over[reason] = self.handed_over.get(reason, 0) + 1
        await self.fallback(scope, receive, send)

    @sensitive_variables("key")
    async def serve(
        self,
        scope: Scope,
        headers: Headers,
        key: str,
        body: bytes,
        receive: Receive,
        send: Send,
        middleware: _Middleware,
    ) -> HandOver | None:
        """Serve one call, or say why it is handed over (nothing was sent upstream then)."""
        try:
            incoming = Incoming(scope, headers, body)
        except UnicodeDecodeError:
            return HandOver.REQUEST
        route = ROUTE.match(incoming.path_info)
        if route is None:
            return HandOver.REQUEST
        added = middleware.admit(incoming)
        if added is None:
            return HandOver.REQUEST
        slug, path = route["slug"], route["path"] or ""
        # Who is calling (``key``: the API key the headers carry), with which token: the
        # caches, else the database in a pool thread.
        caller = callers.caller_for_key(key, cached_only=True)
        if caller is None:
            caller = await self.blocking(functools.partial(callers.caller_for_key, key))
            if caller is None:
                return HandOver.REFUSED
        end_user = headers.get(steps.END_USER_HEADER)
        try:
            token = steps.token_for(slug, caller, cache.tokens, end_user=end_user, cached_only=True)
            if token is None:
                token = await self.blocking(
                    functools.partial(
                        steps.token_for, slug, caller, cache.tokens, end_user=end_user
                    )
                )
            datasource = token.datasource
            url = steps.check_request(incoming.method, datasource, path, chunked=False)
        except Refused:
            return HandOver.REFUSED
        reason = hand_over_reason(
            length=len(body),
            dpop=datasource.use_dpop or binding.dpop_bound(datasource, token),
            token_usable=tokens.usable_as_is(datasource, token),
        )
        if reason is not None:
            return reason
        if app_settings.UPSTREAM_HEALTH:
            known = health.cached(datasource.pk)
            if known is None:
                known = await self.blocking(functools.partial(health.current, datasource.pk))
            reason = hand_over_reason(gate=limits.gate(known, time.time()).verdict)
            if reason is not None:
                return reason
        cache.tokens.keep(steps.key_of(token), token)
        self.served += 1
        await _Call(
            self, incoming, caller, token, url, path, send, receive, middleware, added
        ).run()
        return None


class _Replay:
    """The body messages the lane read, given again to the thread-pool path on a hand-over."""

    def __init__(self, messages: list[dict], receive: Receive) -> None:
        self._messages = messages
        self._receive = receive

    async def receive(self) -> dict:
        if self._messages:
            return self._messages.pop(0)
        return await self._receive()


class _Call:
    """One call on the fast lane, from the first attempt to the last byte of the answer."""

    def __init__(
        self,
        lane: Lane,
        incoming: Incoming,
        caller: callers.Caller,
        token: Token,
        url: str,
        path: str,
        send: Send,
        receive: Receive,
        middleware: _Middleware,
        added: list[tuple[str, bytes, bytes]],
    ) -> None:
        self.lane, self.incoming, self.caller, self.token = lane, incoming, caller, token
        self.datasource = token.datasource
        self.url, self.body, self.send, self.receive = url, incoming.body, send, receive
        self.middleware, self.added = middleware, added
        self.log = calllog.Call.begin(incoming.method, path, len(incoming.body))
        self.log.api_key_id, self.log.user_id = caller.api_key_id, caller.user_id
        self.log.end_user = token.end_user

    async def run(self) -> None:
        incoming, datasource = self.incoming, self.datasource
        attempts = steps.attempts_for(
            datasource,
            self.token,
            _WIRE,
            method=incoming.method,
            requested_retries=incoming.headers.get(retries.RETRIES_HEADER),
            replayable=True,
            idempotency_key=bool(incoming.headers.get(retries.IDEMPOTENCY_HEADER)),
            on_token=lambda fresh: cache.tokens.put(steps.key_of(fresh), fresh),
        )
        try:
            upstream = await attempts.run_async(
                self._send_upstream, blocking=self.lane.blocking, observe=self._observe
            )
        except Exception as err:
            self.log.retries, self.log.refreshed = attempts.retries, attempts.refreshed
            await self._answer_failure(err)
            return
        self.log.retries, self.log.refreshed = attempts.retries, attempts.refreshed
        await self._relay(upstream)

    async def _answer_failure(self, err: Exception) -> None:
        """The answer for a call that failed before its answer started, as the view gives it:
        the refusal the call's steps map ``err`` to (502/504 for the upstream, 503 for a token
        …), else an error of ours (the database away, a bug)."""
        incoming, datasource = self.incoming, self.datasource
        request = incoming.request()
        refused = steps.refusal_for(
            err, datasource, request.build_absolute_uri, end_user=self.token.end_user
        )
        if refused is None:
            refused = answers.failure_refusal(err)
            response = answers.failure_response(
                request, refused, err, datasource.slug, request.path
            )
        else:
            response = answers.refusal_response(request, refused)
        self.log.error = refused.error
        await self._answer(response, response.content)

    async def _send_upstream(self, token: Token) -> Response:
        """One attempt (a tracing span goes here)."""
        incoming, datasource = self.incoming, self.datasource
        placed = binding.auth_headers(datasource, token, incoming.method, self.url)
        headers = transport.request_headers(datasource, incoming.headers, placed, len(self.body))
        scheme, host, port, target = transport.upstream_target(
            datasource, self.url, incoming.query, token.access_token or ""
        )
        return await pool().request(
            incoming.method,
            scheme,
            host,
            port,
            target,
            headers,
            self.body or None,
            context=await self._tls_context() if scheme == "https" else None,
            connect_timeout=app_settings.PROXY_CONNECT_TIMEOUT,
            read_timeout=app_settings.PROXY_READ_TIMEOUT,
        )

    async def _tls_context(self) -> ssl.SSLContext:
        """The context :func:`.transport.send` connects with: the datasource's own (built in a
        pool thread the first time: a key file, PEM parsing; a configuration that cannot be
        built raises ``TLSConfigError``, answered as the view answers it), else the client's
        default, urllib3's."""
        datasource = self.datasource
        if not tls.wants_context(datasource, api=True):
            return default_context()
        context = tls.built_context(datasource, api=True)
        if context is None:
            context = await self.lane.blocking(
                functools.partial(tls.context_for, datasource, api=True)
            )
        return context or default_context()

    def _observe(self, datasource: Any, status: int, header: Any) -> Awaitable[Any] | None:
        """Learn from an answer on the loop when that needs no I/O; else what to await."""
        if health.observe_without_io(datasource, status, header):
            return None
        return self.lane.blocking(functools.partial(health.observe, datasource, status, header))

    async def _relay(self, upstream: Response) -> None:
        headers = transport.answer_headers(upstream.headers, browser=False)
        if transport.answered_in_one_piece(upstream.headers):
            try:
                content = await upstream.read()
            except _WIRE.connection_errors as err:  # dropped before our answer started: a 502
                await self._answer_failure(err)
                return
            finally:
                upstream.release()
            self._log_upstream_error(upstream.status)
            self.log.response_bytes = len(content)
            try:
                await self.send(
                    {
                        "type": "http.response.start",
                        "status": upstream.status,
                        "headers": relayed_headers(headers, len(content), self.added),
                    }
                )
                await self.send({"type": "http.response.body", "body": content})
            finally:
                self._done(upstream.status)  # counted once the answer is on its way
            return
        self._log_upstream_error(upstream.status)
        disconnected = asyncio.ensure_future(wait_for_disconnect(self.receive))
        try:
            await self.send(
                {
                    "type": "http.response.start",
                    "status": upstream.status,
                    "headers": relayed_headers(headers, None, self.added),
                }
            )
            async for piece in upstream.pieces():
                if disconnected.done():
                    return
                self.log.response_bytes += len(piece)
                await self.send({"type": "http.response.body", "body": piece, "more_body": True})
            await self.send({"type": "http.response.body"})
            upstream.release()
        finally:
            disconnected.cancel()
            upstream.release()  # no-op when released above; closes an unfinished answer
            self._done(upstream.status)

    def _log_upstream_error(self, status: int) -> None:
        if status >= 500:
            answers.log_upstream_error(
                self.incoming.request(), HttpResponse(status=status), self.datasource.slug
            )

    async def _answer(self, response: HttpResponse, content: bytes) -> None:
        """A refusal: counted, then sent (as the view counts before returning)."""
        response = self.middleware.finish(self.incoming.request(), response)
        self.log.response_bytes = len(content)
        self._done(response.status_code)
        await self.send(
            {
                "type": "http.response.start",
                "status": response.status_code,
                "headers": asgi_headers(response),
            }
        )
        await self.send({"type": "http.response.body", "body": content})

    def _done(self, status: int) -> None:
        """Counted and logged in memory; the batches are written off the loop when due."""
        elapsed = (time.perf_counter() - self.log.started) * 1000
        pk = self.datasource.pk
        counts_due = usage.record(pk, status, elapsed, error=status >= 500, write=False)
        log_due = calllog.record(self.log, pk, status, elapsed, write=False)
        if counts_due or log_due:
            self.lane.flush_soon(counts=counts_due, log=log_due)


def _flush(counts: bool, log: bool) -> None:
    if counts:
        usage.flush()
    if log:
        calllog.flush()


__all__ = ["PROXY_PATH", "HandOver", "Lane", "hand_over_reason"]
