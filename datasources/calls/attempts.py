"""Sending one call upstream until its answer stands: the one place that drives the "expired"
refresh-and-retry and the opt-in retries, for the proxy, the admin's Test and the Python client.

Each of them sends differently (urllib3 or requests, streamed or buffered), so they hand in a
``send(token)`` function and a :class:`Wire` that reads their answers; the rules are shared:

* an "expired" answer (the datasource's statuses, 401 by default, or one of its JSON-body
  conditions, read from a small JSON answer by a ``PEEK`` step) on a replayable call: the token rules
  (:func:`datasources.tokens.refresh_after_rejection`) say whether to refresh; if so the call is
  sent once more with the new token. Never a second time, whatever the next answer is;
* any other answer or a connection error: :func:`.retries.decide_retry` says whether and when
  to send it again (the datasource's opt-in retries);
* every answer and connection error is shown to ``observe`` (the shared rate-limit memory and
  circuit breaker learn from it).
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Awaitable, Callable, Generator
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import urllib3

from .. import tokens
from ..conf import app_settings
from ..ops import tracing
from . import binding, challenge, retries

if TYPE_CHECKING:
    from ..models import Datasource, Token

R = TypeVar("R")


class HeaderReader(Protocol):
    """What :mod:`.attempts`, :mod:`datasources.calls.binding` and the health record read of an
    answer's headers (urllib3's, requests' and the fast lane's all have it)."""

    def get(self, name: str, default: str | None = None) -> str | None: ...


class Wire(Protocol[R]):
    """How one transport's answers are read."""

    #: Exceptions meaning "no answer": refused, reset, timed out.
    connection_errors: tuple[type[BaseException], ...]

    def status(self, response: R) -> int: ...

    def headers(self, response: R) -> HeaderReader:
        """The answer's headers: ``get(name)`` in any case, None when absent."""

    def discard(self, response: R) -> None:
        """Throw an answer away (it is being replaced by another attempt)."""

    def peek(self, response: R, limit: int) -> tuple[bytes | None, R]:
        """Read the start of an answer's body to inspect it: (the body as sent, still
        content-encoded, when it ends within ``limit`` bytes, else None; an answer that relays
        every byte, the ones read included, as ``response`` would have). Asked only for
        datasources with body conditions and small JSON answers (the drivers of
        :meth:`Attempts.run_async` await it)."""


class Urllib3Wire:
    """urllib3's answers (the proxy's transport); a discarded answer's connection is reused."""

    connection_errors = (
        urllib3.exceptions.NewConnectionError,
        urllib3.exceptions.TimeoutError,
        urllib3.exceptions.ProtocolError,  # reset, or closed without an answer
    )

    @staticmethod
    def status(response: urllib3.BaseHTTPResponse) -> int:
        return response.status

    @staticmethod
    def headers(response: urllib3.BaseHTTPResponse) -> HeaderReader:
        return response.headers

    @staticmethod
    def discard(response: urllib3.BaseHTTPResponse) -> None:
        response.drain_conn()
        response.release_conn()

    @staticmethod
    def peek(
        response: urllib3.BaseHTTPResponse, limit: int
    ) -> tuple[bytes | None, urllib3.BaseHTTPResponse]:
        """Up to ``limit + 1`` raw bytes read, then given back: an answer that ended within
        ``limit`` is replaced by one over those bytes (its connection goes back to the pool at
        once); a longer one by one that relays them and then streams the rest."""
        head = response.read(limit + 1, decode_content=False) or b""
        if len(head) <= limit:
            response.release_conn()
            return head, Peeked(head, response, rest=False)
        return None, Peeked(head, response, rest=True)


class _Chain:
    """A file over bytes already read, then the rest of an answer (raw)."""

    def __init__(self, head: bytes, rest: urllib3.BaseHTTPResponse | None) -> None:
        self._head = io.BytesIO(head)
        self._rest = rest
        self.closed = False

    def read(self, size: int | None = -1) -> bytes:
        if self.closed:
            return b""
        whole = size is None or size < 0
        data = self._head.read(-1 if whole else size)
        if self._rest is None or (data and not whole):
            return data
        return data + (self._rest.read(None if whole else size, decode_content=False) or b"")

    def close(self) -> None:
        self.closed = True


class Peeked(urllib3.HTTPResponse):
    """An answer whose first bytes were read to inspect them, as urllib3's own answer type (the
    view's relay, the admin's Test and requests read it as they read any): the same status and
    headers, the bytes read, then (``rest``) the remainder from the original's connection,
    which it releases or closes as the original would."""

    def __init__(self, head: bytes, original: urllib3.BaseHTTPResponse, *, rest: bool) -> None:
        super().__init__(
            body=_Chain(head, original if rest else None),
            headers=original.headers,
            status=original.status,
            version=original.version,
            reason=original.reason,
            preload_content=False,
            decode_content=False,
            enforce_content_length=False,
            request_url=original.url,
        )
        self._original = original

    def release_conn(self) -> None:
        self._original.release_conn()

    def drain_conn(self) -> None:
        self._original.drain_conn()

    def close(self) -> None:
        super().close()
        self._original.close()


URLLIB3 = Urllib3Wire()


#: The kinds of step :meth:`Attempts.steps` yields (the drivers dispatch on them by identity).
SEND, OBSERVE, PEEK, REFRESH, DISCARD, SLEEP = (
    "send",
    "observe",
    "peek",
    "refresh",
    "discard",
    "sleep",
)
_SEND = (SEND,)
#: A step: its kind first, then what the driver needs to carry it out.
Step = tuple[Any, ...]

#: Runs a blocking function off the event loop (the database, the token endpoint).
Blocking = Callable[[Callable[[], "Token | None"]], Awaitable["Token | None"]]

#: observe(datasource, status or retries.CONNECTION_ERROR, header getter or None)
Observer = Callable[["Datasource", int, Callable[[str], str | None] | None], None]


class Attempts(Generic[R]):
    """One call and its attempts. After :meth:`run` (returned or raised), ``retries``,
    ``refreshed`` and ``token`` say what happened, for the call log."""

    def __init__(
        self,
        datasource: Datasource,
        token: Token,
        wire: Wire[R],
        *,
        method: str,
        policy: retries.RetryPolicy = retries.NO_RETRIES,
        replayable: bool = True,
        idempotency_key: bool = False,
        on_token: Callable[[Token], None] | None = None,
        observe: Observer | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.datasource = datasource
        self.token = token
        self.wire = wire
        self.method = method
        self.policy = policy
        self.replayable = replayable
        self.idempotency_key = idempotency_key
        self.on_token = on_token
        self.observe = observe
        self.sleep = sleep
        self.clock = clock
        self.retries = 0
        self.refreshed = False

    def steps(self) -> Generator[Step, Any, R]:
        """The decision sequence of one call, written once and knowing no transport (sans-IO):
        it yields what to do next and is sent the outcome; :meth:`run` and :meth:`run_async`
        only carry the steps out with their own I/O.

        * ``(SEND,)`` — send the call with ``self.token``: sent the answer, or thrown the
          transport's connection error;
        * ``(OBSERVE, status, header getter or None)`` — show an outcome to the health record;
        * ``(PEEK, answer, limit)`` — read the start of the answer's body (the wire's ``peek``):
          sent ``(body or None, the answer to use from now on)``. Only for a datasource with
          body conditions and a small JSON answer: any other call has no such step;
        * ``(REFRESH, fn)`` — run ``fn`` (the token rules' refresh, blocking): sent its result,
          or thrown what it raised (no token can be had: the call ends with that error);
        * ``(DISCARD, answer)`` — throw an answer away (another attempt replaces it);
        * ``(SLEEP, seconds)`` — wait before the next attempt.

        It returns the answer that stands, or raises the connection error that does."""
        started = self.clock()
        rejection_handled = False
        wire, datasource = self.wire, self.datasource
        while True:
            try:
                response = yield _SEND
            except wire.connection_errors:
                yield (OBSERVE, retries.CONNECTION_ERROR, None)
                wait = self._next_wait(retries.CONNECTION_ERROR, None, started)
                if wait is None:
                    raise
                yield (SLEEP, wait)
                continue
            status = wire.status(response)
            headers = wire.headers(response)
            yield (OBSERVE, status, headers.get)
            body_expired = False
            if datasource.expiry_body_rules and self.method != "HEAD":
                body_expired, response = yield from self._body_says_expired(response, headers)
            if binding.token_rejected(datasource, status, headers, body_expired):
                if rejection_handled or not self.replayable:
                    return response
                rejection_handled = True
                # Refresh once and retry once, unless the rules say the answer stands (a
                # rejection refreshed this token moments ago).
                fresh = yield from self._refreshed_after(response)
                if fresh is None:
                    return response
                yield (DISCARD, response)
                self.token, self.refreshed = fresh, True
                if self.on_token is not None:
                    self.on_token(fresh)
                continue
            if not self._retry_left():
                return response
            retry_after = retries.parse_retry_after(headers.get("Retry-After"), time.time())
            wait = self._next_wait(status, retry_after, started)
            if wait is None:
                return response
            yield (DISCARD, response)
            yield (SLEEP, wait)

    def _refreshed_after(self, rejected: R) -> Generator[Step, Any, Token | None]:
        """The token to retry with after the rejected answer ``rejected``, or None (it stands).
        A refresh that fails raises (no token now: the token endpoint is down; or only a
        person can help): the rejected answer is thrown away first, its connection freed, and
        the error is the call's outcome (503 token_unavailable, 409), never the upstream's 401."""
        try:
            return (yield (REFRESH, self._refresh))
        except Exception:
            yield (DISCARD, rejected)
            raise

    def _body_says_expired(
        self, response: R, headers: HeaderReader
    ) -> Generator[Step, Any, tuple[bool, R]]:
        """Whether the datasource's body conditions match a small JSON answer (a PEEK step when
        the answer may be read; the answer to use from now on is returned with it)."""
        limit = app_settings.EXPIRY_BODY_MAX_BYTES
        encoding = headers.get("Content-Encoding")
        if not challenge.inspectable(
            headers.get("Content-Type"), headers.get("Content-Length"), encoding, limit
        ):
            return False, response
        body, response = yield (PEEK, response, limit)
        rules = self.datasource.expiry_body_rules
        return challenge.body_says_expired(rules, body, encoding, max_bytes=limit), response

    def _refresh(self) -> Token | None:
        """The token rules' refresh after a rejection (None: the answer stands)."""
        return tokens.refresh_after_rejection(
            self.datasource,
            self.token.access_token,
            user=self.token.user_id,
            end_user=self.token.end_user,
        )

    def run(self, send: Callable[[Token], R]) -> R:
        """:meth:`steps` with blocking I/O: ``send``, ``self.observe``, ``self.sleep``; one
        tracing span per attempt."""
        steps = self.steps()
        step = next(steps)
        attempt = 0
        while True:
            kind, reply, error = step[0], None, None
            if kind is SEND:
                attempt += 1
                try:
                    # tracing: one HTTP client span per attempt (datasources/ops/tracing.py)
                    with tracing.upstream_attempt(
                        self.method, self.datasource.base_url, attempt
                    ) as span:
                        reply = send(self.token)
                        tracing.answered(span, self.wire.status(reply))
                except self.wire.connection_errors as err:
                    error = err
            elif kind is OBSERVE:
                if self.observe is not None:
                    self.observe(self.datasource, step[1], step[2])
            elif kind is PEEK:
                reply = self.wire.peek(step[1], step[2])
            elif kind is REFRESH:
                try:
                    reply = step[1]()
                except Exception as err:
                    error = err
            elif kind is DISCARD:
                self.wire.discard(step[1])
            elif step[1] > 0:  # SLEEP
                self.sleep(step[1])
            try:
                step = steps.send(reply) if error is None else steps.throw(error)
            except StopIteration as done:
                return done.value

    async def run_async(
        self,
        send: Callable[[Token], Awaitable[R]],
        *,
        blocking: Blocking,
        observe: Callable[
            [Datasource, int, Callable[[str], str | None] | None], Awaitable[None] | None
        ],
    ) -> R:
        """:meth:`steps` on an event loop (the fast lane): the refresh runs off the loop
        through ``blocking``, waits are ``asyncio.sleep``, the wire's ``discard`` is awaited.
        ``observe`` returns what to await when it has I/O to do (else None: most answers
        change nothing). ``self.observe``/``self.sleep`` are not used."""
        steps = self.steps()
        step = next(steps)
        while True:
            kind, reply, error = step[0], None, None
            if kind is SEND:
                try:
                    reply = await send(self.token)
                except self.wire.connection_errors as err:
                    error = err
            elif kind is OBSERVE:
                pending = observe(self.datasource, step[1], step[2])
                if pending is not None:
                    await pending
            elif kind is PEEK:
                reply = await self.wire.peek(step[1], step[2])  # type: ignore[misc]
            elif kind is REFRESH:
                try:
                    reply = await blocking(step[1])
                except Exception as err:
                    error = err
            elif kind is DISCARD:
                await self.wire.discard(step[1])  # type: ignore[func-returns-value]
            else:  # SLEEP
                await asyncio.sleep(step[1])
            try:
                step = steps.send(reply) if error is None else steps.throw(error)
            except StopIteration as done:
                return done.value

    def _retry_left(self) -> bool:
        """Whether :func:`.retries.decide_retry` could say "again" at all (its first rule), so
        an answer without a retry left (no retries configured: most datasources) is returned
        without reading its Retry-After."""
        return self.retries < self.policy.max_retries

    def _next_wait(self, status: int, retry_after: float | None, started: float) -> float | None:
        """Seconds before the next attempt (counted as a retry), or None: the outcome stands."""
        wait = retries.decide_retry(
            self.policy,
            method=self.method,
            status=status,
            retries_done=self.retries,
            elapsed=self.clock() - started,
            retry_after=retry_after,
            idempotency_key=self.idempotency_key,
            replayable=self.replayable,
        )
        if wait is not None:
            self.retries += 1
        return wait
