"""Bounded HTTP calls for talking to authorization servers (used by :mod:`datasources.authserver.oauth`).

``requests`` timeouts apply to each socket operation, so a server that sends one byte every
few seconds can hold a call for ever, and ``response.content`` reads whatever size is sent.
Here a call has a total deadline, kept by a watchdog that shuts the call's socket down when the
deadline passes (whatever the call is doing then: reading the status line, the headers or the
body), and its answer is read in chunks up to a size cap, never buffering the excess.
"""

from __future__ import annotations

import contextlib
import email.utils
import socket
import threading
import time
from datetime import datetime
from typing import Any

import requests
import urllib3
from requests.adapters import HTTPAdapter

_local = threading.local()


class DeadlineExceeded(Exception):
    """The call did not finish (answer included) before its deadline."""


class TooLarge(Exception):
    """The answer is larger than allowed; it was not read further."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(f"larger than {limit} bytes")


class Deadline:
    """``with Deadline(seconds):`` — calls made through :class:`BoundedAdapter` in this thread
    inside the block end when the deadline passes."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> Deadline:
        self._previous = getattr(_local, "deadline", None)
        _local.deadline = self
        self._timer.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._timer.cancel()
        _local.deadline = self._previous
        with self._lock:
            self._sock = None

    def watch(self, sock: socket.socket | None) -> None:
        """The socket the call is about to read its answer from."""
        with self._lock:
            self._sock = sock
            if self.expired:
                _shutdown(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            _shutdown(self._sock)


def _shutdown(sock: socket.socket | None) -> None:
    """Make a blocked read on ``sock`` return at once (in whichever thread it is)."""
    if sock is None:
        return
    # socket.socket's own method, also for an SSLSocket: the TLS object stays in place for the
    # reading thread, which then sees the connection end.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _Watched:
    def getresponse(self, *args: Any, **kwargs: Any):
        deadline = getattr(_local, "deadline", None)
        if deadline is not None:
            deadline.watch(self.sock)
        return super().getresponse(*args, **kwargs)


class _HTTPConnection(_Watched, urllib3.connection.HTTPConnection):
    pass


class _HTTPSConnection(_Watched, urllib3.connection.HTTPSConnection):
    pass


class _HTTPConnectionPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSConnectionPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


class BoundedAdapter(HTTPAdapter):
    """requests' adapter whose connections report their socket to the current Deadline."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": _HTTPConnectionPool,
            "https": _HTTPSConnectionPool,
        }


def request(
    session: requests.Session,
    method: str,
    url: str,
    *,
    timeout: float,
    max_bytes: int,
    **kwargs: Any,
) -> requests.Response:
    """One call that ends within ``timeout`` seconds in all and reads at most ``max_bytes`` of
    answer (its ``content`` is then set). Raises DeadlineExceeded, TooLarge or requests'
    exceptions; never follows redirects."""
    started = time.monotonic()
    with Deadline(timeout) as deadline:
        try:
            response = session.request(
                method, url, timeout=timeout, allow_redirects=False, stream=True, **kwargs
            )
            read_body(response, max_bytes)
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError):
            if deadline.expired or time.monotonic() - started >= timeout:
                raise DeadlineExceeded(f"no complete answer within {timeout:g} s") from None
            raise
        if deadline.expired:  # the watchdog fired just as the last byte arrived
            response.close()
            raise DeadlineExceeded(f"no complete answer within {timeout:g} s")
    return response


def read_body(response: requests.Response, max_bytes: int) -> None:
    """Read a streamed answer into ``response.content``, at most ``max_bytes``; TooLarge (and
    the connection closed) beyond that."""
    if response._content is not False:  # already read, e.g. by an adapter that buffers
        if len(response._content or b"") > max_bytes:
            raise TooLarge(max_bytes)
        return
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        response.close()
        raise TooLarge(max_bytes)
    chunks: list[bytes] = []
    received = 0
    try:
        # 8 KiB of raw bytes at a time: even a compressed answer decodes in small steps.
        for chunk in response.iter_content(8192):
            received += len(chunk)
            if received > max_bytes:
                raise TooLarge(max_bytes)
            chunks.append(chunk)
    except BaseException:
        response.raw.close()
        raise
    response._content = b"".join(chunks)
    response._content_consumed = True
    response.close()  # fully read: the connection goes back to the pool


def parse_retry_after(value: str | None, now: datetime | float | None = None) -> float | None:
    """``Retry-After`` in seconds from ``now`` (default: the current time): delta-seconds or an
    HTTP date (RFC 9110 §10.2.3). A date in the past is 0; anything unreadable is None.

    The one parser for every answer we read it from: authorization servers (here) and upstream
    APIs (:mod:`datasources.calls.retries`, which may import this layer; this layer may not
    import that one). It never raises on what a server sends: a malformed date is None.
    """
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if now is None:
        now = time.time()
    reference = now.timestamp() if isinstance(now, datetime) else now
    return max(0.0, when.timestamp() - reference)
