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
from http.server import BaseHTTPRequestHandler

from .localserver import LocalHTTPServer


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


class FlakyUpstream(LocalHTTPServer):
    def __init__(self) -> None:
        self.scripts: dict[str, list[Step]] = {}
        self.always: dict[str, Step] = {}
        self.hits: list[Hit] = []
        self.token_calls = 0
        self.stopped = threading.Event()
        self._lock = threading.Lock()
        super().__init__()

    def handle(self, request: BaseHTTPRequestHandler, body: bytes) -> None:
        path = request.path.split("?")[0]
        if path == "/token":
            return self._token(request)
        with self._lock:
            self.hits.append(Hit(request.command, request.path, dict(request.headers), body))
            script = self.scripts.get(path)
            step = script.pop(0) if script else self.always.get(path, Step())
        if step.reset:
            # SO_LINGER 0: close() sends an RST, the caller sees "connection reset".
            request.connection.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            request.connection.close()
            request.close_connection = True
            return None
        if step.hang:
            self.stopped.wait(30)
            request.close_connection = True
            return None
        if step.delay:
            self.stopped.wait(step.delay)
        headers = [("Content-Type", "application/json"), *step.headers.items()]
        self.reply(request, step.status, headers, step.body)
        return None

    def _token(self, request: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.token_calls += 1
            number = self.token_calls
        payload = json.dumps(
            {
                "access_token": f"fresh-access-token-{number}-" + "f" * 24,
                "token_type": "Bearer",
                "expires_in": 3600,
            }
        ).encode()
        self.reply(request, 200, [("Content-Type", "application/json")], payload)

    def start(self) -> FlakyUpstream:
        return super().start()

    def stop(self) -> None:
        self.stopped.set()
        super().stop()

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
