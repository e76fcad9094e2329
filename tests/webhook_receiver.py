"""A local webhook receiver: a small threaded HTTP server on 127.0.0.1 that verifies each
request's signature with the Standard Webhooks reference library (``standardwebhooks``, an
implementation independent of ours) and records what it got.

``script`` says how the next requests are answered, one entry each, then ``ok`` for ever:
``"ok"`` (204), an int (that status), ``"reset"`` (the connection is reset before any
answer), ``"hang"`` (no answer until :meth:`Receiver.release` or HANG_MAX), ``"hold"`` (204,
but only once released: a request that is "being sent" for as long as a test needs).
"""

from __future__ import annotations

import json
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

HANG_MAX = 60.0


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    verified: bool
    answer: str

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def event_id(self) -> str:
        return self.headers.get("webhook-id", "")


class Receiver:
    def __init__(self) -> None:
        self.secrets: list[str] = []
        self.script: list[Any] = []
        self.requests: list[Received] = []
        self._lock = threading.Lock()
        self._release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                receiver._handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def verify(self, headers: dict[str, str], body: bytes) -> bool:
        for secret in self.secrets:
            try:
                Webhook(secret).verify(body, headers)
                return True
            except WebhookVerificationError:
                continue
        return False

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length)
        headers = {k.lower(): v for k, v in handler.headers.items()}
        with self._lock:
            answer = self.script.pop(0) if self.script else "ok"
            self.requests.append(Received(headers, body, self.verify(headers, body), str(answer)))
        if answer == "reset":
            # SO_LINGER 0: close() sends a RST, as a crashing receiver's kernel would.
            handler.connection.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            handler.connection.close()
            handler.close_connection = True
            return
        if answer == "hang":
            self._release.wait(HANG_MAX)
            handler.close_connection = True
            return
        if answer == "hold":
            self._release.wait(HANG_MAX)
        status = 204 if answer in ("ok", "hold") else int(answer)
        handler.send_response(status)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    def release(self) -> None:
        self._release.set()

    def verified(self) -> list[Received]:
        with self._lock:
            return [r for r in self.requests if r.verified]

    def stop(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    started = Receiver()
    yield started
    started.stop()
