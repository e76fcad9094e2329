"""The fast lane's upstream client: HTTP/1.1 over asyncio, responses parsed by httptools (the
parser uvicorn itself uses), one keep-alive pool per origin and process.

Why our own rather than aiohttp or httpx: the proxy needs very little of an HTTP client (one
request, one answer, no redirects, no cookies, no proxies from the environment, no decoding,
no retries) and everything it does must match what :mod:`.transport` does with urllib3 on the
thread path: the same framing headers (``Host``, ``Accept-Encoding: identity`` and urllib3's
``User-Agent`` unless the caller sent them, ``Content-Length``), the same exceptions (urllib3's
classes, so :mod:`.attempts` and the refusal mapping stay one), the same timeouts. This is about
250 lines on a parser that is already a dependency, and measured faster than the alternatives
(docs/benchmarks.md).

HTTPS: TCP first, then TLS on it (``loop.start_tls``) with the datasource's context (its CA
bundle and client certificate, :func:`datasources.security.tls.context_for`) or :func:`default_context`
(what urllib3 builds when given none). The pools are keyed by the context object, so a
connection made with one datasource's client certificate or trust store never serves another
context's calls. TLS failures are urllib3's exceptions as urllib3 raises them for the same
event on the thread path (:meth:`Pool._start_tls`).

Answers stream: the parser hands body pieces to a bounded buffer; past ``HIGH_WATER`` bytes the
socket stops being read until the relay has sent them on (backpressure), so a 1 GB answer never
sits in memory.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import ssl
from collections.abc import AsyncIterator, Iterator

import httptools
import urllib3
from urllib3.util.request import _METHODS_NOT_EXPECTING_BODY
from urllib3.util.ssl_ import ALPN_PROTOCOLS, create_urllib3_context

logger = logging.getLogger(__name__)

#: Body bytes buffered from the socket before it stops being read.
HIGH_WATER = 256 * 1024
_USER_AGENT = urllib3.connection._get_default_user_agent()


@functools.cache
def default_context() -> ssl.SSLContext:
    """The context for an HTTPS upstream without a context of its own: the one urllib3 builds
    for every connection of the view's default pool (system CAs, TLS 1.2+, certificate and
    host name verified, no common-name fallback), built once. ALPN offers only HTTP/1.1: that
    is what this client speaks."""
    context = create_urllib3_context(cert_reqs=ssl.CERT_REQUIRED)
    context.load_default_certs()
    context.set_alpn_protocols(ALPN_PROTOCOLS)
    return context


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.tls = False
        self.closed = False
        self.parser = httptools.HttpResponseParser(self)
        self._reset()

    def _reset(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.head: asyncio.Future[None] = self.loop.create_future()
        self.pieces: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.complete = False
        self.error: BaseException | None = None
        self.wakeup: asyncio.Future[None] | None = None
        self.paused = False
        self.keep_alive = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as err:
            self._fail(urllib3.exceptions.ProtocolError("Invalid response from upstream", err))
            self.close()

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.complete:
            if self.head.done() and exc is None and self._close_delimited():
                # An answer without a length ends when the connection does.
                self.complete = True
            if not self.complete:
                self._fail(
                    urllib3.exceptions.ProtocolError(
                        "Connection aborted.",
                        exc or ConnectionResetError("the upstream closed the connection"),
                    )
                )
        self._wake()

    def _close_delimited(self) -> bool:
        names = {name.lower() for name, _ in self.headers}
        return b"content-length" not in names and b"transfer-encoding" not in names

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()  # (reset once the message ends)
        if not self.head.done():
            self.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.pieces.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self._wake()

    # helpers
    def _fail(self, error: BaseException) -> None:
        self.error = error
        if not self.head.done():
            self.head.set_exception(error)
            self.head.exception()  # retrieved: no "never retrieved" warning if unawaited
        self._wake()

    def _wake(self) -> None:
        if self.wakeup is not None and not self.wakeup.done():
            self.wakeup.set_result(None)

    def timed_out(self, target: str, timeout: float) -> None:
        """No answer (status line and headers) within the read timeout."""
        if not self.head.done():
            self._fail(
                urllib3.exceptions.ReadTimeoutError(
                    None, target, f"Read timed out. (read timeout={timeout})"
                )
            )

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            if self.tls:
                # No close_notify exchange (urllib3 closes its TLS sockets without one either):
                # HTTP/1.1 framing ends each answer, and a TLS close would wait for the peer.
                self.transport.abort()
            else:
                self.transport.close()

    def reusable(self) -> bool:
        return (
            self.complete
            and not self.closed
            and self.error is None
            and self.keep_alive
            and not self.pieces
        )

    async def next_piece(self, timeout: float) -> bytes | None:
        """The next body piece, or None at the end of the answer."""
        while True:
            if self.pieces:
                piece = self.pieces.popleft()
                self.buffered -= len(piece)
                if self.paused and self.buffered <= HIGH_WATER // 2 and not self.closed:
                    self.paused = False
                    self.transport.resume_reading()  # type: ignore[union-attr]
                return piece
            if self.complete:
                return None
            if self.error is not None:
                raise self.error
            self.wakeup = self.loop.create_future()
            try:
                await asyncio.wait_for(self.wakeup, timeout)
            except TimeoutError:
                raise urllib3.exceptions.ReadTimeoutError(
                    None, "", f"Read timed out. (read timeout={timeout})"
                ) from None
            finally:
                self.wakeup = None


class Headers:
    """An answer's headers, read as urllib3's ``HTTPHeaderDict`` reads them (the relay and
    :mod:`.attempts` use the same calls on both serving paths): any case, repeated headers
    joined with ``", "``, names as first sent."""

    __slots__ = ("_index",)

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        index: dict[str, tuple[str, str]] = {}
        for name_bytes, value_bytes in raw:
            name, key = _names(name_bytes)
            value = value_bytes.decode("latin1")
            found = index.get(key)
            index[key] = (name, value) if found is None else (found[0], f"{found[1]}, {value}")
        self._index = index

    def get(self, name: str, default: str | None = None) -> str | None:
        found = self._index.get(name.lower())
        return default if found is None else found[1]

    def __getitem__(self, name: str) -> str:
        return self._index[name.lower()][1]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._index

    def __len__(self) -> int:
        return len(self._index)

    def itermerged(self) -> Iterator[tuple[str, str]]:
        return iter(self._index.values())


@functools.lru_cache(maxsize=1024)
def _names(name_bytes: bytes) -> tuple[str, str]:
    """(name, lower-case name) of a raw header name: an upstream's answers repeat the same
    names, so each is decoded once."""
    name = name_bytes.decode("latin1")
    return (name, name.lower())


class Response:
    """An upstream answer: status and headers read, body still on the connection."""

    def __init__(self, pool: Pool, key: tuple, conn: _Connection, read_timeout: float) -> None:
        self._pool, self._key, self._conn = pool, key, conn
        self.status: int = conn.parser.get_status_code()
        self.headers = Headers(conn.headers)
        self._timeout = read_timeout
        self._released = False

    async def pieces(self) -> AsyncIterator[bytes]:
        """The body as it arrives (raw: a compressed body stays compressed)."""
        while (piece := await self._conn.next_piece(self._timeout)) is not None:
            if piece:
                yield piece

    async def read(self) -> bytes:
        conn = self._conn
        if conn.complete and not conn.paused:
            # The whole answer arrived with its head (the usual small answer): take it as is.
            data = b"".join(conn.pieces)
            conn.pieces.clear()
            conn.buffered = 0
            return data
        return b"".join([piece async for piece in self.pieces()])

    async def peek(self, limit: int) -> bytes | None:
        """The body when it ends within ``limit`` bytes, else None; either way the pieces
        read stay in front of the connection's buffer, so :meth:`read` and :meth:`pieces` relay
        every byte. The usual small answer arrived with its head and is joined, not awaited;
        ``limit`` is below ``HIGH_WATER``, so the pieces kept never stop the socket's reading
        for long. An error while reading closes the connection and is raised (urllib3's
        exceptions, as for the rest of the answer)."""
        conn = self._conn
        if conn.complete:
            size = conn.buffered
            return b"".join(conn.pieces) if size <= limit else None
        taken: list[bytes] = []
        size = 0
        try:
            while size <= limit:
                piece = await conn.next_piece(self._timeout)
                if piece is None:
                    break
                taken.append(piece)
                size += len(piece)
        except BaseException:
            conn.close()
            self.release()
            raise
        conn.pieces.extendleft(reversed(taken))
        conn.buffered += size
        return b"".join(taken) if size <= limit else None

    async def discard(self) -> None:
        """Throw the answer away (it is replaced by another attempt); its connection is reused
        when the rest of the body is small, closed otherwise."""
        try:
            while not self._conn.complete and self._conn.buffered < HIGH_WATER:
                if await self._conn.next_piece(self._timeout) is None:
                    break
        except (urllib3.exceptions.HTTPError, OSError):
            pass
        self._conn.pieces.clear()
        self.release()

    def release(self) -> None:
        """Give the connection back to the pool (or close it if the answer was not read)."""
        if self._released:
            return
        self._released = True
        self._pool.put(self._key, self._conn)


class Pool:
    """Idle keep-alive connections per (scheme, host, port, TLS context), at most ``maxsize``
    each. The key holds the context object itself (not its id, which a new context could
    reuse once the old one is gone)."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._idle: dict[tuple, list[_Connection]] = {}

    def put(self, key: tuple, conn: _Connection) -> None:
        idle = self._idle.setdefault(key, [])
        if conn.reusable() and len(idle) < self.maxsize:
            conn._reset()
            idle.append(conn)
        else:
            conn.close()

    async def close(self) -> None:
        """Close every idle connection (a test's event loop ends with each call)."""
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports finish closing

    def _get(self, key: tuple) -> _Connection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        if idle is not None:
            del self._idle[key]  # a replaced context is not kept alive by an empty list
        return None

    async def _connect(
        self,
        host: str,
        port: int,
        context: ssl.SSLContext | None,
        timeout: float,
    ) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            transport, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(loop), host, port), timeout
            )
        except TimeoutError:
            raise urllib3.exceptions.ConnectTimeoutError(
                None, f"Connection to {host} timed out. (connect timeout={timeout})"
            ) from None
        except OSError as err:
            raise urllib3.exceptions.NewConnectionError(
                None, f"Failed to establish a new connection: {err}"
            ) from err
        if context is not None:
            await self._start_tls(conn, transport, host, context, timeout)
        return conn

    @staticmethod
    async def _start_tls(
        conn: _Connection,
        transport: asyncio.BaseTransport,
        host: str,
        context: ssl.SSLContext,
        timeout: float,
    ) -> None:
        """The TLS handshake on a connected socket, within ``timeout`` (urllib3 gives the
        handshake the connect timeout too), failing as urllib3 fails on the thread path:

        * the certificate or the handshake refused: ``SSLError`` around ssl's error;
        * the server closed the connection during the handshake (asyncio says
          ``ConnectionResetError()`` without an errno): ``SSLError`` around the
          ``SSLEOFError`` a socket handshake gets (:func:`_eof_error`);
        * a reset or another socket error: ``ProtocolError("Connection aborted.")``;
        * no handshake in time: ``ReadTimeoutError`` (urllib3's socket timeout during the
          handshake is reported as a read timeout).

        ``server_hostname`` is the host (SNI and the name checked); ssl sends no SNI for an
        IP address and checks the address instead."""
        loop = conn.loop
        conn.tls = True
        try:
            conn.transport = await asyncio.wait_for(  # type: ignore[assignment]
                loop.start_tls(transport, conn, context, server_hostname=host), timeout
            )
        except BaseException as err:
            transport.abort()  # (start_tls closes it too; a cancelled wait may not have)
            if isinstance(err, TimeoutError):
                raise urllib3.exceptions.ReadTimeoutError(
                    None, host, f"Read timed out. (read timeout={timeout})"
                ) from None
            if isinstance(err, ssl.SSLError):
                raise urllib3.exceptions.SSLError(err) from err
            if isinstance(err, ConnectionResetError) and err.errno is None:
                raise urllib3.exceptions.SSLError(_eof_error(context, host)) from err
            if isinstance(err, OSError):
                raise urllib3.exceptions.ProtocolError("Connection aborted.", err) from err
            raise

    async def request(
        self,
        method: str,
        scheme: str,
        host: str,
        port: int | None,
        target: str,
        headers: dict[str, str],
        body: bytes | None,
        *,
        context: ssl.SSLContext | None,
        connect_timeout: float,
        read_timeout: float,
    ) -> Response:
        """Send one request; the answer once its status line and headers have arrived.
        Raises urllib3's exceptions, as :func:`.transport.send` does."""
        port = port or (443 if scheme == "https" else 80)
        # "[::1]" from a URL is the address ::1 (urllib3 strips the brackets too).
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if scheme != "https":
            context = None
        elif context is None:
            context = default_context()
        key = (scheme, host, port, context)
        conn = self._get(key) or await self._connect(host, port, context, connect_timeout)
        conn.transport.write(_head(method, host, port, scheme, target, headers, body))  # type: ignore[union-attr]
        timer = conn.loop.call_later(read_timeout, conn.timed_out, target, read_timeout)
        try:
            await conn.head
        except BaseException:
            conn.close()
            raise
        finally:
            timer.cancel()
        if logger.isEnabledFor(logging.DEBUG):
            # The request line as urllib3 logs it, never with its query (a token may be there).
            path, query, _ = target.partition("?")
            logger.debug(
                '%s://%s:%s "%s %s HTTP/1.1" %s',
                scheme,
                host,
                port,
                method,
                path + ("?[redacted]" if query else ""),
                conn.parser.get_status_code(),
            )
        if method == "HEAD":
            # httptools cannot be told the request was HEAD: the answer ends with its headers,
            # and the connection is not reused (the parser would wait for a body).
            conn.complete = True
            conn.closed = True
            conn.close()
        return Response(self, key, conn, read_timeout)


def _eof_error(context: ssl.SSLContext, host: str) -> ssl.SSLError:
    """The error ssl gives a handshake whose peer closed the connection (as urllib3's socket
    handshake gets it), made by a handshake on an in-memory connection at end of file:
    OpenSSL's own error and reason (``UNEXPECTED_EOF_WHILE_READING``), not an imitation."""
    incoming = ssl.MemoryBIO()
    incoming.write_eof()
    try:
        context.wrap_bio(incoming, ssl.MemoryBIO(), server_hostname=host).do_handshake()
    except ssl.SSLError as err:
        return err
    return ssl.SSLEOFError(ssl.SSL_ERROR_EOF, "EOF occurred in violation of protocol")


def _head(
    method: str,
    host: str,
    port: int,
    scheme: str,
    target: str,
    headers: dict[str, str],
    body: bytes | None,
) -> bytes:
    """Request line, headers and body, framed as urllib3's HTTPConnection.request frames them."""
    keys = {name.lower() for name in headers}
    lines = [f"{method} {target} HTTP/1.1"]
    if "host" not in keys:
        default = 443 if scheme == "https" else 80
        name = f"[{host}]" if ":" in host else host
        lines.append(f"Host: {name}" if port == default else f"Host: {name}:{port}")
    if "accept-encoding" not in keys:
        lines.append("Accept-Encoding: identity")
    if "content-length" not in keys and "transfer-encoding" not in keys:
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        elif method.upper() not in _METHODS_NOT_EXPECTING_BODY:
            lines.append("Content-Length: 0")
    if "user-agent" not in keys:
        lines.append(f"User-Agent: {_USER_AGENT}")
    for name, value in headers.items():
        lines.append(f"{name}: {value}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin1")
    return head + body if body else head
