"""Local peers for the attack tests: a spy upstream API that records exactly what reached it,
and a hostile server for the authorization-server side (oversized, trickling answers).

Both listen on 127.0.0.1 on a free port, run in daemon threads and stop with the test.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler

from .localserver import LocalHTTPServer


@dataclass
class Seen:
    """One request as it reached the upstream."""

    method: str
    target: str  # the raw request target, exactly as sent
    headers: list[tuple[str, str]]
    body: bytes
    #: HTTPS: the client certificate presented (DER), and the client's address and port (one
    #: per connection: calls on a reused connection share it).
    certificate: bytes | None = None
    peer: tuple = ()
    #: HTTPS: the protocol agreed by ALPN (None: the client offered none).
    alpn: str | None = None

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return values[0] if values else None

    @property
    def header_names(self) -> set[str]:
        return {k.lower() for k, _ in self.headers}


@dataclass
class Answer:
    status: int = 200
    headers: list[tuple[str, str]] = field(
        default_factory=lambda: [("Content-Type", "application/json")]
    )
    body: bytes = b'{"ok": true}'
    #: When set, the answer waits for this event (a slow upstream, released by the test).
    hold: threading.Event | None = None


class SpyUpstream(LocalHTTPServer):
    """``spy.seen`` lists every request received; ``spy.answers[path]`` sets what a path
    answers (default: 200 ``{"ok": true}``)."""

    def __init__(self, host: str = "127.0.0.1", context: ssl.SSLContext | None = None) -> None:
        self.seen: list[Seen] = []
        self.answers: dict[str, Answer] = {}
        self._lock = threading.Lock()
        super().__init__(host, context)

    def handle(self, request: BaseHTTPRequestHandler, body: bytes) -> None:
        connection = request.connection
        tls = isinstance(connection, ssl.SSLSocket)
        certificate = connection.getpeercert(binary_form=True) if tls else None
        with self._lock:
            self.seen.append(
                Seen(
                    request.command,
                    request.path,
                    list(request.headers.items()),
                    body,
                    certificate,
                    request.client_address,
                    connection.selected_alpn_protocol() if tls else None,
                )
            )
        answer = self.answers.get(request.path.split("?")[0], Answer())
        if answer.hold is not None:
            answer.hold.wait(30)
        self.reply(request, answer.status, answer.headers, answer.body)

    def start(self) -> SpyUpstream:
        return super().start()

    def stop(self) -> None:
        for answer in self.answers.values():
            if answer.hold is not None:
                answer.hold.set()
        super().stop()

    def targets(self) -> list[str]:
        return [seen.target for seen in self.seen]

    def json_answer(self, path: str, payload, **kwargs) -> None:
        self.answers[path] = Answer(body=json.dumps(payload).encode(), **kwargs)


class HostileServer:
    """An HTTP server that answers every request the same hostile way:

    * ``huge``: a 200 JSON answer of ``size`` bytes (declared, or chunked without a length);
    * ``trickle-body``: headers at once, then one body byte every ``interval`` seconds;
    * ``trickle-headers``: the status line, then one header byte every ``interval`` seconds.

    It records the requests it received and how many bytes it managed to send.
    """

    def __init__(
        self, behaviour: str, *, size: int = 200 * 1024 * 1024, interval: float = 0.2
    ) -> None:
        self.behaviour = behaviour
        self.size = size
        self.interval = interval
        self.requests: list[bytes] = []
        self.sent = 0
        self.stopped = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> HostileServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopped.set()
        self.listener.close()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                self.requests.append(_read_request(conn))
                getattr(self, "_" + self.behaviour.replace("-", "_"))(conn)
            except OSError:
                pass  # the client gave up: that is the point

    def _send(self, conn: socket.socket, data: bytes) -> None:
        conn.sendall(data)
        self.sent += len(data)

    def _huge(self, conn: socket.socket) -> None:
        chunk = b" " * 65536
        self._send(
            conn,
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {self.size}\r\n\r\n".encode(),
        )
        left = self.size
        while left > 0 and not self.stopped.is_set():
            part = chunk[: min(left, len(chunk))]
            self._send(conn, part)
            left -= len(part)

    def _huge_chunked(self, conn: socket.socket) -> None:
        chunk = b" " * 65536
        self._send(
            conn,
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
        )
        left = self.size
        while left > 0 and not self.stopped.is_set():
            self._send(conn, b"%x\r\n%s\r\n" % (len(chunk), chunk))
            left -= len(chunk)
        self._send(conn, b"0\r\n\r\n")

    def _trickle_body(self, conn: socket.socket) -> None:
        self._send(
            conn,
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n",
        )
        for _ in range(1000):
            if self.stopped.wait(self.interval):
                return
            self._send(conn, b" ")

    def _trickle_headers(self, conn: socket.socket) -> None:
        self._send(conn, b"HTTP/1.1 200 OK\r\n")
        for byte in b"X-Slow: " + b"a" * 1000:
            if self.stopped.wait(self.interval):
                return
            self._send(conn, bytes([byte]))


def _read_request(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        part = conn.recv(65536)
        if not part:
            return data
        data += part
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        part = conn.recv(65536)
        if not part:
            break
        body += part
    return head + b"\r\n\r\n" + body
