"""A real flaky upstream API for the resilience tests: a local HTTP server that answers each path
from a script (503, 429 with or without Retry-After, a reset connection, a hang past the proxy's
read timeout) and then 200, counting every request that reached it.

It also serves a token endpoint (``/token``) that issues a new access token per call and counts
the calls, so refresh-and-retry can be observed at both ends.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Step:
    """One scripted answer: ``status`` with ``headers``, or a ``reset`` (RST, no answer), or a
    ``hang`` (no answer until the server stops: a read timeout at the caller)."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b'{"ok": true}'
    reset: bool = False
    hang: bool = False
    delay: float = 0.0  # seconds the server waits before answering


def status(code: int, **headers: str) -> Step:
    return Step(code, {name.replace("_", "-"): value for name, value in headers.items()})


RESET = Step(reset=True)
HANG = Step(hang=True)


@dataclass
class Hit:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes


class FlakyUpstream:
    def __init__(self) -> None:
        self.scripts: dict[str, list[Step]] = {}
        self.always: dict[str, Step] = {}
        self.hits: list[Hit] = []
        self.token_calls = 0
        self.stopped = threading.Event()
        self._lock = threading.Lock()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def __getattr__(self, name: str):
                if name.startswith("do_"):
                    return self._handle
                raise AttributeError(name)

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                path = self.path.split("?")[0]
                if path == "/token":
                    return self._token()
                with upstream._lock:
                    upstream.hits.append(Hit(self.command, self.path, dict(self.headers), body))
                    script = upstream.scripts.get(path)
                    step = script.pop(0) if script else upstream.always.get(path, Step())
                if step.reset:
                    # SO_LINGER 0: close() sends an RST, the caller sees "connection reset".
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                    self.connection.close()
                    self.close_connection = True
                    return None
                if step.hang:
                    upstream.stopped.wait(30)
                    self.close_connection = True
                    return None
                if step.delay:
                    upstream.stopped.wait(step.delay)
                self.send_response(step.status)
                self.send_header("Content-Type", "application/json")
                for name, value in step.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(step.body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(step.body)
                return None

            def _token(self) -> None:
                with upstream._lock:
                    upstream.token_calls += 1
                    number = upstream.token_calls
                payload = json.dumps(
                    {
                        "access_token": f"fresh-access-token-{number}-" + "f" * 24,
                        "token_type": "Bearer",
                        "expires_in": 3600,
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address) -> None:
                pass  # resets and callers that gave up are the point here

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FlakyUpstream:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopped.set()
        self.server.shutdown()
        self.server.server_close()

    def script(self, path: str, *steps: Step) -> None:
        with self._lock:
            self.scripts[path] = list(steps)

    def count(self, path: str) -> int:
        """Requests for ``path`` (query ignored) that reached the upstream."""
        with self._lock:
            return sum(1 for hit in self.hits if hit.target.split("?")[0] == path)

    def last(self, path: str) -> Hit:
        with self._lock:
            return [hit for hit in self.hits if hit.target.split("?")[0] == path][-1]
