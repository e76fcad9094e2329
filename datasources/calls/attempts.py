"""Sending one call upstream until its answer stands: the one place that drives the "expired"
refresh-and-retry and the opt-in retries, for the proxy, the admin's Test and the Python client.

Each of them sends differently (urllib3 or requests, streamed or buffered), so they hand in a
``send(token)`` function and a :class:`Wire` that reads their answers; the rules are shared:

* an "expired" status (the datasource's, 401 by default) on a replayable call: the token rules
  (:func:`datasources.tokens.refresh_after_rejection`) say whether to refresh; if so the call is
  sent once more with the new token. Never a second time, whatever the next answer is;
* any other answer or a connection error: :func:`.retries.decide_retry` says whether and when
  to send it again (the datasource's opt-in retries);
* every answer and connection error is shown to ``observe`` (the shared rate-limit memory and
  circuit breaker learn from it).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

import urllib3

from .. import tokens
from ..ops import tracing
from . import binding, retries

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


URLLIB3 = Urllib3Wire()


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

    def run(self, send: Callable[[Token], R]) -> R:
        started = self.clock()
        rejection_handled = False
        attempt = 0
        while True:
            attempt += 1
            try:
                # tracing: one HTTP client span per attempt (datasources/tracing.py)
                with tracing.upstream_attempt(
                    self.method, self.datasource.base_url, attempt
                ) as span:
                    response = send(self.token)
                    tracing.answered(span, self.wire.status(response))
            except self.wire.connection_errors:
                if self.observe is not None:
                    self.observe(self.datasource, retries.CONNECTION_ERROR, None)
                if not self._wait(retries.CONNECTION_ERROR, None, started):
                    raise
                continue
            status = self.wire.status(response)
            headers = self.wire.headers(response)
            if self.observe is not None:
                self.observe(self.datasource, status, headers.get)
            if binding.token_rejected(self.datasource, status, headers):
                if rejection_handled or not self.replayable:
                    return response
                rejection_handled = True
                # Refresh once and retry once, unless the rules say the answer stands (the token
                # is too young to blame, or a refresh failed moments ago).
                fresh = tokens.refresh_after_rejection(
                    self.datasource, self.token.access_token, user=self.token.user_id
                )
                if fresh is None:
                    return response
                self.wire.discard(response)
                self.token, self.refreshed = fresh, True
                if self.on_token is not None:
                    self.on_token(fresh)
                continue
            if not self._retry_left():
                return response
            retry_after = retries.parse_retry_after(headers.get("Retry-After"), time.time())
            if not self._wait(status, retry_after, started, response):
                return response

    async def run_async(
        self,
        send: Callable[[Token], Awaitable[R]],
        *,
        blocking: Blocking,
        observe: Callable[
            [Datasource, int, Callable[[str], str | None] | None], Awaitable[None] | None
        ],
    ) -> R:
        """:meth:`run` on an event loop (the fast lane): the same rules, the same order; the
        refresh runs off the loop through ``blocking``, waits are ``asyncio.sleep``, and the
        wire's ``discard`` is awaited. ``observe`` returns what to await when it has I/O to do
        (else None: most answers change nothing). ``self.observe``/``self.sleep`` are not
        used."""
        started = self.clock()
        rejection_handled = False
        while True:
            try:
                response = await send(self.token)
            except self.wire.connection_errors:
                pending = observe(self.datasource, retries.CONNECTION_ERROR, None)
                if pending is not None:
                    await pending
                wait = self._next_wait(retries.CONNECTION_ERROR, None, started)
                if wait is None:
                    raise
                await asyncio.sleep(wait)
                continue
            status = self.wire.status(response)
            headers = self.wire.headers(response)
            pending = observe(self.datasource, status, headers.get)
            if pending is not None:
                await pending
            if binding.token_rejected(self.datasource, status, headers):
                if rejection_handled or not self.replayable:
                    return response
                rejection_handled = True
                fresh = await blocking(
                    functools.partial(
                        tokens.refresh_after_rejection,
                        self.datasource,
                        self.token.access_token,
                        user=self.token.user_id,
                    )
                )
                if fresh is None:
                    return response
                await self.wire.discard(response)  # type: ignore[func-returns-value]
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
            await self.wire.discard(response)  # type: ignore[func-returns-value]
            await asyncio.sleep(wait)

    def _wait(
        self, status: int, retry_after: float | None, started: float, response: R | None = None
    ) -> bool:
        """Sleep before the next attempt and say True, or say False (the outcome stands)."""
        wait = self._next_wait(status, retry_after, started)
        if wait is None:
            return False
        if response is not None:
            self.wire.discard(response)
        if wait > 0:
            self.sleep(wait)
        return True

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
