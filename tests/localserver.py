"""The server loop shared by the local fake upstreams (``tests/spy.py``, ``tests/flaky.py``): a
``ThreadingHTTPServer`` on 127.0.0.1 (a free port; or another loopback address, ``::1``) in a
daemon thread that hands every request, whatever its method, with its body already read, to
``handle``. Given a server-side ``ssl.SSLContext`` it speaks HTTPS (the handshake happens as a
connection is accepted; one that fails is dropped)."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class LocalHTTPServer:
    """Subclasses implement ``handle(request, body)``; ``reply`` writes a whole answer."""

    def __init__(self, host: str = "127.0.0.1", context: ssl.SSLContext | None = None) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def __getattr__(self, name: str):
                if name.startswith("do_"):
                    return self._handle
                raise AttributeError(name)

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                owner.handle(self, body)

            def log_message(self, *args) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

            def handle_error(self, request, client_address) -> None:
                pass  # resets and callers that gave up (timeout tests) are not news

        self.server = Server((host, 0), Handler)
        if context is not None:
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.host, self.scheme = host, "http" if context is None else "https"
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def handle(self, request: BaseHTTPRequestHandler, body: bytes) -> None:
        raise NotImplementedError

    @staticmethod
    def reply(
        request: BaseHTTPRequestHandler,
        status: int,
        headers: Iterable[tuple[str, str]],
        body: bytes,
    ) -> None:
        request.send_response(status)
        for name, value in headers:
            request.send_header(name, value)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        if request.command != "HEAD":
            request.wfile.write(body)

    @property
    def base(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def start(self):
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
