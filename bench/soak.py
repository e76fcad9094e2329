"""Soak: the production recipe as real processes under steady load and a schedule of faults
(issue #30), then a markdown report and the invariants checked.

Run it (about --minutes plus a minute of setup and shutdown)::

    .venv/bin/python bench/soak.py --minutes 30
    .venv/bin/python bench/soak.py --minutes 4      # a trial: the same faults, compressed

What it needs: ``make .venv/.installed-test postgres oidc`` (the venv with the test extra: uvicorn
with uvloop and httptools, psycopg, the Standard Webhooks verifier; Node.js and panva's
oidc-provider under tests/oidc), Debian's PostgreSQL server binaries (tests/pgcluster.py: an own
cluster in a temporary directory, run as the ``postgres`` user when started as root; ``PG_BIN``
names another bin directory), a Redis on 127.0.0.1:6379 (``--redis-db``, default 11, is flushed at
the start and at the end; the shared Redis is never stopped or paused: the broker outage cuts a TCP
relay in front of it) and free loopback ports. Everything it starts runs under one temporary
directory (``--keep`` keeps it: every process's log is there).

What runs, each a process of its own: uvicorn with the README's ``web:`` command (2 workers, the
fast lane), a Celery worker and beat with the README's commands, the own PostgreSQL, and
oidc-provider (refresh tokens rotated, access tokens living ``--token-ttl`` seconds) as the
authorization server of ``--datasources`` authorization-code datasources. The one setting changed
from its default is ``DATASOURCES_SWEEP_INTERVAL`` (``--sweep-interval``, 10 s, not 60), so
background refreshes, and with them the token endpoint's faults, come every few seconds. In this
process, in threads: a relay in front of the provider's token endpoint (the fault switch: slow,
503, 429, down; it also records every token issued and every refresh token presented, for the reuse
and secret checks), a TCP relay in front of Redis (the broker outage), the upstream API (each
call's bearer token checked at the provider, ``/_test/resource``: a token of another datasource's
client, or none the provider knows, is counted), a webhook receiver (signatures verified), the
callers (``--rate`` calls/s over every datasource with API keys: keep-alive sessions and callers
that open a new connection per call) and the fault schedule (faults spaced evenly over the run;
each fault's start and end are logged and timed). A run shorter than 30 minutes shortens every
fault by one factor so that together they take at most 45 % of it; the 30-minute run gives each its
full length (Redis 30 s, beat 3 min, token endpoint 503/429 20 s each, its outage 60 s, slow 60 s,
PostgreSQL stopped 15 s) with equal gaps between them to recover.

The report (markdown on stdout): calls and answers by status, longest stall per caller, per fault
its failed calls and recovery time (fault end -> first 200 for every caller), usage counts and
call-log rows written (after uvicorn's graceful SIGTERM) against the answers the callers got,
tokens of another datasource, secrets found in any log, refresh tokens reused at the provider,
grants lost, webhook events, and each datasource's status at the end. Exit status 1 when an
invariant fails: a wrong token, a secret in a log, a 500, counts that do not add up, a refresh
token presented twice.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CALLBACK_PATH = "/api/v1/datasources/authorize"
REDIRECT_URI = f"http://testserver{CALLBACK_PATH}"
STARTED = time.monotonic()


def log(message: str) -> None:
    stamp = time.strftime("%H:%M:%S", time.gmtime())
    print(f"[{stamp} +{time.monotonic() - STARTED:7.1f}s] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def poll(what: str, check, deadline_s: float, interval: float = 0.2) -> float:
    """Call ``check`` until it is true; the seconds it took. Fails after ``deadline_s``."""
    started = time.monotonic()
    last: Exception | None = None
    while time.monotonic() - started < deadline_s:
        try:
            if check():
                return time.monotonic() - started
        except Exception as err:
            last = err
        time.sleep(interval)
    raise RuntimeError(f"{what}: not within {deadline_s:.0f} s ({last!r})")


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with suppress(OSError):
            found += [int(p) for p in (task / "children").read_text().split()]
    return found


# --- relays ---------------------------------------------------------------------------------


class TcpRelay:
    """127.0.0.1:port -> target, cut() closes every connection and refuses new ones."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self.cut_now = threading.Event()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._stopped = False
        self.listen()

    def listen(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for sock in (a, b):
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        assert self._listener is not None
        self._listener.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for sock in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            except OSError:
                pass

    def restore(self) -> None:
        self.listen()

    def stop(self) -> None:
        self.cut()


def digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:16]


class TokenRelay:
    """An HTTP relay in front of the provider's token endpoint. ``mode``: ``pass``,
    ``slow`` (``delay`` seconds before forwarding), ``503`` / ``429`` (answered here, with
    Retry-After), ``down`` (the connection is reset before any answer)."""

    def __init__(self, token_url: str, delay: float) -> None:
        self.token_url = token_url
        self.delay = delay
        self.mode = "pass"
        self.lock = threading.Lock()
        self.issued: set[str] = set()  # every access and refresh token issued (values)
        self.client_of: dict[str, str] = {}  # access token -> client_id it was issued to
        self.exchanged: Counter[str] = Counter()  # refresh token digest -> 200 answers for it
        self.presented: Counter[str] = Counter()  # refresh token digest -> times presented
        self.reused = 0  # a refresh token presented again after a 200 for it
        self.answers: Counter[str] = Counter()  # "grant status[/error]" -> count
        self.by_mode: Counter[str] = Counter()
        #: (monotonic time, relay mode, grant type, status or "reset") of every request.
        self.events: list[tuple[float, str, str, str]] = []
        relay = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                relay.handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = QuietServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        from urllib.parse import parse_qs

        length = int(request.headers.get("Content-Length") or 0)
        body = request.rfile.read(length)
        form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        grant = form.get("grant_type", "?")
        mode = self.mode
        with self.lock:
            self.by_mode[mode] += 1
            self.events.append((time.monotonic(), mode, grant, "reset" if mode == "down" else mode))
        if mode == "down":
            request.connection.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            request.close_connection = True
            request.connection.close()
            return
        if mode in ("503", "429"):
            payload = b'{"error": "temporarily_unavailable"}'
            request.send_response(int(mode))
            request.send_header("Content-Type", "application/json")
            request.send_header("Retry-After", "5")
            request.send_header("Content-Length", str(len(payload)))
            request.end_headers()
            request.wfile.write(payload)
            return
        if mode == "slow":
            time.sleep(self.delay)
        refresh = form.get("refresh_token")
        if refresh:
            with self.lock:
                if self.exchanged[digest(refresh)]:
                    self.reused += 1
                self.presented[digest(refresh)] += 1
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() in ("authorization", "content-type", "accept", "dpop")
        }
        try:
            answer = requests.post(self.token_url, data=body, headers=headers, timeout=30)
        except requests.RequestException:
            request.send_response(502)
            request.send_header("Content-Length", "0")
            request.end_headers()
            return
        error = ""
        try:
            data = answer.json()
        except ValueError:
            data = {}
        if answer.status_code == 200:
            with self.lock:
                if refresh:
                    self.exchanged[digest(refresh)] += 1
                for name in ("access_token", "refresh_token", "id_token"):
                    if data.get(name):
                        self.issued.add(data[name])
                if data.get("access_token"):
                    self.client_of[data["access_token"]] = self._client(request, form)
        else:
            error = "/" + str(data.get("error", ""))
        with self.lock:
            self.answers[f"{grant} {answer.status_code}{error}"] += 1
            self.events.append((time.monotonic(), mode, grant, f"{answer.status_code}{error}"))
        request.send_response(answer.status_code)
        for name in ("Content-Type", "Cache-Control", "Pragma", "WWW-Authenticate"):
            if name in answer.headers:
                request.send_header(name, answer.headers[name])
        request.send_header("Content-Length", str(len(answer.content)))
        request.end_headers()
        request.wfile.write(answer.content)

    @staticmethod
    def _client(request: BaseHTTPRequestHandler, form: dict[str, str]) -> str:
        from urllib.parse import unquote

        auth = request.headers.get("Authorization", "")
        if auth.lower().startswith("basic "):
            return unquote(base64.b64decode(auth[6:]).decode().split(":", 1)[0])
        return form.get("client_id", "?")

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class QuietServer(ThreadingHTTPServer):
    """A client that drops its connection (a killed uvicorn worker) is no traceback here."""

    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass


class Upstream:
    """The API behind the datasources: ``/api/<slug>/...`` answers 200 for a bearer token the
    provider knows, unexpired, issued to that datasource's client; 401 (``invalid_token``)
    otherwise. A valid token of another client is counted as wrong (and refused)."""

    def __init__(self, resource_url: str, clients: dict[str, str], relay: TokenRelay) -> None:
        self.resource_url = resource_url
        self.clients = clients  # slug -> client_id
        self.relay = relay
        self.lock = threading.Lock()
        self.answered: Counter[tuple[str, int]] = Counter()
        self.wrong: list[str] = []  # "slug got client X's token"
        self.unknown = 0
        self.local = threading.local()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                upstream.handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = QuietServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _session(self) -> requests.Session:
        if not hasattr(self.local, "session"):
            self.local.session = requests.Session()
        return self.local.session

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        parts = request.path.split("/")
        slug = parts[2] if len(parts) > 2 else ""
        auth = request.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else ""
        status, body, challenge = 401, b'{"error": "invalid_token"}', True
        if token and slug in self.clients:
            try:
                seen = self._session().get(
                    self.resource_url, headers={"Authorization": f"Bearer {token}"}, timeout=10
                )
            except requests.RequestException:
                seen = None
            if seen is None:
                status, body, challenge = 502, b'{"error": "provider unreachable"}', False
            elif seen.status_code == 200:
                client = seen.json().get("client_id")
                if client == self.clients[slug]:
                    status, body, challenge = (
                        200,
                        json.dumps({"ok": True, "slug": slug}).encode(),
                        False,
                    )
                else:
                    with self.lock:
                        self.wrong.append(f"{slug} got {client}'s token")
            else:
                with self.lock:
                    self.unknown += 1
        with self.lock:
            self.answered[(slug, status)] += 1
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        if challenge:
            request.send_header("WWW-Authenticate", 'Bearer error="invalid_token"')
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- the product's processes ----------------------------------------------------------------


def readme_line(prefix: str) -> str:
    lines = [
        line.removeprefix(prefix)
        for line in (ROOT / "README.md").read_text().splitlines()
        if line.startswith(prefix)
    ]
    assert len(lines) == 1, f"README.md changed shape: {len(lines)} {prefix!r} lines"
    return " ".join(lines[0].split("#", 1)[0].split())


def web_argv(port: int, workers: int) -> list[str]:
    command = readme_line("web:")
    for old, new in (
        ("--port 8000", f"--port {port}"),
        ("--workers 4", f"--workers {workers}"),
    ):
        assert command.count(old) == 1, f"README.md changed shape: {old!r} in {command!r}"
        command = command.replace(old, new)
    argv = shlex.split(command)
    assert argv[0] == "uvicorn", argv
    return [sys.executable, "-m", *argv]


def celery_argv(prefix: str) -> list[str]:
    argv = shlex.split(readme_line(prefix))
    assert argv[0] == "celery", argv
    return [str(Path(sys.executable).parent / "celery"), *argv[1:]]


@dataclass
class Proc:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen | None = None
    starts: int = 0

    def start(self) -> None:
        self.starts += 1
        with open(self.log_path, "ab") as out:
            out.write(f"\n=== soak: start #{self.starts} {time.strftime('%H:%M:%S')}\n".encode())
            out.flush()
            self.process = subprocess.Popen(
                self.argv,
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self, timeout: float = 60) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
            return None

    def kill_group(self) -> None:
        if self.process is not None:
            with suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


# --- load -------------------------------------------------------------------------------------


@dataclass
class Call:
    caller: str
    slug: str
    started: float  # monotonic
    latency: float
    status: int  # 0: no answer (connection error, timeout)
    code: str = ""  # the proxy's JSON error code, or the exception's name
    wall: float = 0.0  # time.time() at the start


@dataclass
class Caller:
    name: str
    keep_alive: bool
    rate: float
    slugs: list[str]
    key: str
    base: str
    calls: list[Call] = field(default_factory=list)

    def run(self, stop: threading.Event) -> None:
        session = requests.Session()
        interval = 1 / self.rate
        next_at = time.monotonic() + secrets.randbelow(1000) / 1000 * interval
        index = 0
        while not stop.is_set():
            wait = next_at - time.monotonic()
            if wait > 0 and stop.wait(wait):
                break
            next_at = max(next_at + interval, time.monotonic())
            slug = self.slugs[index % len(self.slugs)]
            index += 1
            url = f"{self.base}/api/v1/datasources/{slug}/proxy/items/{index}"
            headers = {"Authorization": f"Api-Key {self.key}"}
            started, wall = time.monotonic(), time.time()
            try:
                if self.keep_alive:
                    response = session.get(url, headers=headers, timeout=70)
                else:
                    headers["Connection"] = "close"
                    response = requests.get(url, headers=headers, timeout=70)
                code = ""
                if response.status_code != 200:
                    try:
                        code = str(response.json().get("error", ""))
                    except ValueError:
                        code = response.text[:40]
                call = Call(
                    self.name, slug, started, time.monotonic() - started, response.status_code, code
                )
            except requests.RequestException as err:
                call = Call(
                    self.name, slug, started, time.monotonic() - started, 0, type(err).__name__
                )
                session = requests.Session()
            call.wall = wall
            self.calls.append(call)


# --- faults -----------------------------------------------------------------------------------


@dataclass
class Fault:
    name: str
    nominal: float  # seconds the fault lasts at full length (0: an instant)
    start: float = 0.0  # monotonic, filled in when it runs
    end: float = 0.0
    note: str = ""


FAULTS = [
    ("celery pool child SIGKILL", 0),
    ("uvicorn worker SIGKILL", 0),
    ("celery main worker SIGKILL + restart", 0),
    ("token endpoint slow", 60),
    # After the worker's restart, not before it: the same worker must reconnect by itself.
    ("broker (Redis) unreachable", 30),
    ("token endpoint 503", 20),
    ("database connections cut (pg_terminate_backend)", 0),
    ("beat down", 180),
    ("token endpoint 429", 20),
    ("PostgreSQL restart (pg_ctl restart)", 0),
    ("token endpoint outage (connections reset)", 60),
    ("PostgreSQL stopped", 15),
]


#: The largest share of the run the faults may take together.
SHARE = 0.45


class Soak:
    def __init__(self, args: argparse.Namespace, directory: Path) -> None:
        self.args = args
        self.dir = directory
        self.procs: dict[str, Proc] = {}
        self.faults: list[Fault] = []
        self.events: list[str] = []

    # The fault actions: each returns a note, blocks for the fault's length.
    def do_fault(self, fault: Fault, length: float) -> None:
        name = fault.name
        relay, redis_relay, pg = self.token_relay, self.redis_relay, self.pg
        if name.startswith("celery pool child"):
            pool = children(self.procs["worker"].pid)
            victim = pool[0]
            os.kill(victim, signal.SIGKILL)
            fault.note = f"pid {victim} of {len(pool)} pool children"
        elif name.startswith("uvicorn worker"):
            workers = children(self.procs["web"].pid)
            # uvicorn's own children (multiprocessing's resource tracker has no listener).
            victim = workers[-1]
            os.kill(victim, signal.SIGKILL)
            took = poll(
                "uvicorn replaces the killed worker",
                lambda: (
                    len([p for p in children(self.procs["web"].pid) if p != victim]) >= len(workers)
                ),
                60,
            )
            fault.note = f"pid {victim}; a new worker after {took:.1f} s"
        elif name.startswith("celery main"):
            worker = self.procs["worker"]
            pool = children(worker.pid)
            os.kill(worker.pid, signal.SIGKILL)
            worker.process.wait(10)
            worker.start()
            concurrency = len(pool)
            took = poll(
                "the restarted worker's pool",
                lambda: len(children(worker.pid)) >= concurrency,
                90,
            )

            def alive() -> list[int]:
                # A zombie child of the dead master is gone for this purpose.
                left = []
                for pid in pool:
                    with suppress(OSError):
                        if "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text():
                            left.append(pid)
                return left

            with suppress(RuntimeError):
                poll("orphaned pool children exit", lambda: not alive(), 10)
            orphans = alive()
            for pid in orphans:
                with suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            fault.note = (
                f"restarted, pool up after {took:.1f} s; {len(orphans)} of the dead master's "
                f"{len(pool)} pool children still alive {time.monotonic() - fault.start:.0f} s "
                "after the kill (killed then)"
            )
        elif name.startswith("broker"):
            redis_relay.cut()
            time.sleep(length)
            redis_relay.restore()
        elif name == "beat down":
            self.procs["beat"].stop()
            time.sleep(length)
            self.procs["beat"].start()
        elif name.startswith("token endpoint"):
            relay.mode = {"slow": "slow", "503": "503", "429": "429", "outage": "down"}[
                name.split()[2].split("(")[0].strip()
            ]
            time.sleep(length)
            relay.mode = "pass"
            if name.endswith("slow"):
                fault.note = f"{relay.delay:.0f} s before each answer"
        elif name.startswith("database connections"):
            fault.note = f"{pg.kill_backends('soak')} backends terminated"
        elif name.startswith("PostgreSQL restart"):
            back = pg.restart()
            fault.note = f"answering again after {back - fault.start:.1f} s"
        elif name == "PostgreSQL stopped":
            with pg.stopped(length) as outage:
                pass
            fault.note = f"down {outage.starting_at - outage.stopped_at:.1f} s"

    def schedule(self, stop: threading.Event, run_seconds: float) -> None:
        # The faults take at most SHARE of the run (a short trial shortens every fault by
        # the same factor); the gaps between them, and before the first and after the last,
        # are equal: the time each has to recover.
        nominal_total = sum(nominal for _, nominal in FAULTS)
        scale = min(1.0, SHARE * run_seconds / nominal_total)
        gap = (run_seconds - scale * nominal_total) / (len(FAULTS) + 1)
        for name, nominal in FAULTS:
            if stop.wait(gap):
                return
            length = nominal * scale
            fault = Fault(name, nominal)
            fault.start = time.monotonic()
            log(f"fault start: {name} ({length:.0f} s)")
            try:
                self.do_fault(fault, length)
            except Exception as err:
                fault.note = f"FAILED to inject: {err!r}"
            fault.end = time.monotonic()
            log(f"fault end: {name} after {fault.end - fault.start:.1f} s {fault.note}")
            self.faults.append(fault)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--rate", type=float, default=30, help="proxied calls per second")
    parser.add_argument("--datasources", type=int, default=3)
    parser.add_argument("--token-ttl", type=int, default=90, help="access token lifetime (s)")
    parser.add_argument("--keep-alive-callers", type=int, default=6)
    parser.add_argument("--new-connection-callers", type=int, default=2)
    parser.add_argument("--slow-delay", type=float, default=8, help="token endpoint delay (s)")
    parser.add_argument(
        "--sweep-interval",
        type=int,
        default=10,
        help="DATASOURCES_SWEEP_INTERVAL (default 10, not 60: refreshes, and so the token "
        "endpoint's faults, are met every few seconds)",
    )
    parser.add_argument("--redis", default="127.0.0.1:6379")
    parser.add_argument("--redis-db", type=int, default=11)
    parser.add_argument("--keep", action="store_true", help="keep the run directory")
    args = parser.parse_args()

    def interrupted(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    # SIGTERM unwinds like Ctrl-C: every process started is stopped, the cluster removed.
    signal.signal(signal.SIGTERM, interrupted)
    directory = Path(tempfile.mkdtemp(prefix="soak-"))
    os.chmod(directory, 0o755)
    log(f"run directory {directory}")
    try:
        with ExitStack() as stack:
            return run(args, directory, stack)
    finally:
        if args.keep:
            log(f"kept {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)


def run(args: argparse.Namespace, directory: Path, stack: ExitStack) -> int:
    import redis as redis_lib
    from cryptography.fernet import Fernet

    soak = Soak(args, directory)
    redis_host, redis_port = args.redis.split(":")
    direct = redis_lib.Redis(host=redis_host, port=int(redis_port), db=args.redis_db)
    direct.flushdb()
    stack.callback(direct.flushdb)

    # PostgreSQL
    from tests.pgcluster import PgCluster

    pg = PgCluster()
    soak.pg = pg
    stack.callback(pg.close)
    pg.start()
    database_url = pg.url("soak")
    pg.create_database("soak")
    log(f"PostgreSQL up: {database_url}")

    redis_relay = TcpRelay((redis_host, int(redis_port)))
    soak.redis_relay = redis_relay
    stack.callback(redis_relay.stop)

    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("DATASOURCES_", "DJANGO_"))},
        "ENV_FILE": "/dev/null",
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "DEBUG": "0",
        "SECRET_KEY": secrets.token_urlsafe(40),
        "FERNET_KEYS": Fernet.generate_key().decode(),
        "DATABASE_URL": database_url,
        "REDIS_URL": f"redis://127.0.0.1:{redis_relay.port}/{args.redis_db}",
        "CELERY_TASK_DEFAULT_QUEUE": f"soak-{uuid.uuid4().hex[:8]}",
        "DATA_DIR": str(directory / "data"),
        "LOG_LEVEL": "INFO",
        "ALLOWED_HOSTS": "127.0.0.1,localhost,testserver",
        "PYTHONUNBUFFERED": "1",
        "DATASOURCES_SWEEP_INTERVAL": str(args.sweep_interval),
    }
    os.environ.update(env)
    import django

    django.setup()
    # This process runs the product's code too (migrate, the authorization callback): its log
    # goes to a file of the run, searched for secrets with the others.
    import logging

    root_logger = logging.getLogger()
    handler = logging.FileHandler(directory / "soak-process.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root_logger.handlers = [handler]
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    log("migrated")

    # The authorization server, its token relay, the upstream, the webhook receiver.
    from tests.oidcprovider import callback_query, start_oidc_provider
    from tests.webhook_receiver import Receiver

    slugs = [f"soak-{i}" for i in range(args.datasources)]
    client_secrets = {slug: secrets.token_urlsafe(32) for slug in slugs}
    config = {
        "clients": [
            {
                "client_id": f"client-{slug}",
                "client_secret": client_secrets[slug],
                "redirect_uris": [REDIRECT_URI],
                "grant_types": ["authorization_code", "refresh_token"],
                "response_types": ["code"],
                "scope": "openid offline_access api",
            }
            for slug in slugs
        ],
        "ttl": {"AccessToken": args.token_ttl},
        "rotateRefreshToken": True,
    }
    op = stack.enter_context(start_oidc_provider(config))
    log(f"oidc-provider at {op.issuer}")
    relay = TokenRelay(op.token_url, args.slow_delay)
    soak.token_relay = relay
    stack.callback(relay.stop)
    upstream = Upstream(op.resource_url, {s: f"client-{s}" for s in slugs}, relay)
    stack.callback(upstream.stop)
    receiver = Receiver()
    stack.callback(receiver.stop)

    from django.contrib.auth import get_user_model
    from django.test import Client

    from datasources.models import Datasource, Token, WebhookEndpoint
    from datasources.proxy.apikeys import create_api_key
    from datasources.webhooks.signing import new_secret

    hook_secret = new_secret()
    receiver.secrets.append(hook_secret)
    WebhookEndpoint.objects.create(name="soak receiver", url=receiver.url, secret=hook_secret)
    datasources = []
    for slug in slugs:
        datasource = Datasource(
            name=slug,
            slug=slug,
            base_url=f"{upstream.base}/api/{slug}/",
            grant_type="authorization_code",
            authorization_url=op.authorization_url,
            access_token_url=relay.url,
            client_id=f"client-{slug}",
            client_secret=client_secrets[slug],
            scopes="openid offline_access api",
            client_authentication="basic",
        )
        datasource.full_clean()
        datasource.save()
        datasources.append(datasource)

    # The product's processes.
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    (directory / "data").mkdir(exist_ok=True)
    for name, argv in (
        ("web", web_argv(port, 2)),
        ("worker", celery_argv("worker:")),
        ("beat", celery_argv("beat:")),
    ):
        proc = Proc(name, argv, env, directory / f"{name}.log")
        soak.procs[name] = proc
        proc.start()
        stack.callback(proc.kill_group)
        log(f"{name}: {' '.join(argv[1:] if name == 'web' else argv)}")
    poll("uvicorn /healthz", lambda: requests.get(f"{base}/healthz", timeout=2).ok, 90)
    # The README's worker logs at WARNING (no "ready." line): ready when its pool is.
    concurrency = int(celery_argv("worker:")[celery_argv("worker:").index("--concurrency") + 1])
    poll(
        "celery worker's pool",
        lambda: len(children(soak.procs["worker"].pid)) >= concurrency,
        90,
    )
    log("web and worker up")

    # Authorize each datasource: the admin's authorize URL, the provider's automatic login and
    # consent, the callback (in this process, against the same database).
    admin = get_user_model().objects.create_superuser("soak", "soak@example.com", None)
    browser = Client()
    browser.force_login(admin)
    for datasource in datasources:
        start = browser.get(datasource.get_authorize_url())
        assert start.status_code == 302, start.content[:300]
        callback = op.consent(start["Location"], REDIRECT_URI)
        answer = browser.get(CALLBACK_PATH, callback_query(callback))
        assert answer.status_code == 302, answer.content[:300]
        token = Token.objects.get(datasource=datasource, user=None)
        assert token.status == "active", token.last_error
    log(f"{len(datasources)} datasources authorized")

    keys = []
    for index in range(args.keep_alive_callers + args.new_connection_callers):
        _, key = create_api_key(f"soak-caller-{index}", datasources=datasources)
        keys.append(key)
    from django.db import connections

    connections.close_all()

    callers = []
    total = args.keep_alive_callers + args.new_connection_callers
    for index in range(total):
        keep_alive = index < args.keep_alive_callers
        callers.append(
            Caller(
                name=f"{'keep-alive' if keep_alive else 'new-conn'}-{index}",
                keep_alive=keep_alive,
                rate=args.rate / total,
                slugs=slugs[index % len(slugs) :] + slugs[: index % len(slugs)],
                key=keys[index],
                base=base,
            )
        )

    # Warm-up: every datasource answers 200 before the clock starts (these calls are counted
    # with the others when the written counts are compared).
    warm: Counter[int] = Counter()

    def warm_ok(slug: str) -> bool:
        status = requests.get(
            f"{base}/api/v1/datasources/{slug}/proxy/warm",
            headers={"Authorization": f"Api-Key {keys[0]}"},
            timeout=10,
        ).status_code
        warm[status] += 1
        return status == 200

    for slug in slugs:
        poll(f"{slug} answers 200", lambda slug=slug: warm_ok(slug), 60)
    soak.warm = warm

    run_seconds = args.minutes * 60
    stop = threading.Event()
    threads = [threading.Thread(target=c.run, args=(stop,), daemon=True) for c in callers]
    load_started = time.monotonic()
    log(f"load: {args.rate}/s over {len(callers)} callers for {run_seconds:.0f} s")
    for thread in threads:
        thread.start()
    scheduler = threading.Thread(target=soak.schedule, args=(stop, run_seconds), daemon=True)
    scheduler.start()
    deadline = load_started + run_seconds
    while time.monotonic() < deadline:
        time.sleep(min(30, max(0.0, deadline - time.monotonic())))
        made = sum(len(c.calls) for c in callers)
        ok = sum(1 for c in callers for call in list(c.calls) if call.status == 200)
        log(f"progress: {made} calls, {ok} 200s")
    scheduler.join(timeout=300)  # a fault still under way ends first
    stop.set()
    for thread in threads:
        thread.join(timeout=80)
    load_ended = time.monotonic()
    log("load stopped; stopping uvicorn gracefully (SIGTERM)")

    web_status = soak.procs["web"].stop(90)
    for name in ("beat", "worker"):
        soak.procs[name].stop(60)
    log(f"uvicorn exited with {web_status}")

    report, ok = build_report(
        soak,
        callers,
        upstream,
        relay,
        receiver,
        op,
        datasources,
        client_secrets,
        keys,
        hook_secret,
        load_started,
        load_ended,
        web_status,
    )
    print(report)
    return 0 if ok else 1


# --- the report -------------------------------------------------------------------------------


def build_report(
    soak,
    callers,
    upstream,
    relay,
    receiver,
    op,
    datasources,
    client_secrets,
    keys,
    hook_secret,
    load_started,
    load_ended,
    web_status,
) -> tuple[str, bool]:
    from django.db import connections
    from django.db.models import Count, Sum

    from datasources.models import DatasourceUsage, ProxyCall, Token

    connections.close_all()
    calls = sorted((call for c in callers for call in c.calls), key=lambda c: c.started)
    by_status = Counter(call.status for call in calls)
    by_code = Counter((call.status, call.code) for call in calls if call.status != 200)
    lines = ["# Soak report", ""]
    lines.append(
        f"{soak.args.minutes:g} min of load ({load_ended - load_started:.0f} s), "
        f"{soak.args.rate:g} calls/s target over {len(datasources)} datasources, "
        f"{len(callers)} callers ({soak.args.keep_alive_callers} keep-alive, "
        f"{soak.args.new_connection_callers} new connection per call), access tokens live "
        f"{soak.args.token_ttl} s, refresh tokens rotated."
    )
    lines += ["", "## Calls", "", "| status | error | calls |", "| --- | --- | ---: |"]
    lines.append(f"| 200 | | {by_status[200]} |")
    for (status, code), count in sorted(by_code.items()):
        lines.append(f"| {status or 'no answer'} | {code} | {count} |")
    lines.append(f"| **all** | | **{len(calls)}** |")

    # Stalls per caller.
    lines += [
        "",
        "## Longest stall per caller",
        "",
        "| caller | calls | 200s | max latency (s) | longest stretch without a 200 (s) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for caller in callers:
        mine = caller.calls
        stretch, last_ok = 0.0, load_started
        for call in mine:
            if call.status == 200:
                done = call.started + call.latency
                stretch = max(stretch, done - last_ok)
                last_ok = done
        stretch = max(stretch, load_ended - last_ok)
        lines.append(
            f"| {caller.name} | {len(mine)} | {sum(c.status == 200 for c in mine)} | "
            f"{max((c.latency for c in mine), default=0):.2f} | {stretch:.1f} |"
        )

    # Faults.
    lines += [
        "",
        "## Faults",
        "",
        "| # | fault | at (s) | lasted (s) | failed calls | recovery (s)¹ | token requests "
        "(answers) | note |",
        "| ---: | --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    attributed: set[int] = set()
    for index, fault in enumerate(soak.faults, 1):
        next_start = soak.faults[index].start if index < len(soak.faults) else load_ended
        # Recovered when every caller has had a 200 from every datasource it calls (a caller's
        # first 200 may come from a datasource the fault did not touch).
        recoveries = []
        for caller in callers:
            for slug in caller.slugs:
                first = next(
                    (
                        c.started + c.latency
                        for c in caller.calls
                        if c.slug == slug and c.status == 200 and c.started >= fault.end
                    ),
                    None,
                )
                recoveries.append(None if first is None else first - fault.end)
        recovered = None if None in recoveries else max(recoveries)
        window_end = fault.end + recovered if recovered is not None else next_start
        failed = [
            c
            for c in calls
            if c.started + c.latency >= fault.start
            and c.started <= max(window_end, fault.end)
            and c.status != 200
        ]
        with relay.lock:
            during = Counter(
                f"{grant} {outcome}"
                for at, _, grant, outcome in relay.events
                if fault.start <= at <= window_end
            )
        kinds = Counter(f"{c.status or 'none'} {c.code}".strip() for c in failed)
        note = fault.note
        if kinds:
            note = (note + "; " if note else "") + ", ".join(
                f"{k}: {v}" for k, v in kinds.most_common()
            )
        lines.append(
            f"| {index} | {fault.name} | {fault.start - load_started:.0f} | "
            f"{fault.end - fault.start:.1f} | {len(failed)} | "
            f"{'not recovered' if recovered is None else f'{recovered:.1f}'} | "
            f"{sum(during.values())} ({', '.join(f'{k}: {v}' for k, v in sorted(during.items()))})"
            f" | {note} |"
        )
        attributed.update(id(c) for c in failed)
    outside = Counter(
        f"{c.status or 'none'} {c.code}".strip()
        for c in calls
        if c.status != 200 and id(c) not in attributed
    )
    lines += [
        "",
        "¹ From the fault's end to the first 200 of every caller from every datasource it calls."
        " A fault's failed calls: the non-200 answers of calls that ended after it started and"
        " began before that recovery (not recovered: before the next fault); its token requests:"
        " those the token endpoint's relay saw in the same window.",
        "",
        f"Failed calls outside every fault's window (start to recovery): {sum(outside.values())}"
        + (
            " (" + ", ".join(f"{k}: {v}" for k, v in outside.most_common()) + ")" if outside else ""
        ),
    ]

    # Counts written.
    usage = DatasourceUsage.objects.aggregate(calls=Sum("calls"), errors=Sum("errors"))
    rows = ProxyCall.objects.count()
    rows_by_status = dict(ProxyCall.objects.values_list("status").annotate(n=Count("id")))
    warm = soak.warm
    answered_by_status = Counter(c.status for c in calls if c.status != 0) + warm
    answered = sum(answered_by_status.values())
    ok_calls = answered_by_status[200]
    upstream_200 = sum(n for (slug, status), n in upstream.answered.items() if status == 200)
    upstream_all = sum(upstream.answered.values())
    # A SIGKILLed uvicorn worker takes what it held (at most USAGE_FLUSH_INTERVAL, 1 s, of its
    # calls) with it: the calls answered in the 2 s before each such kill bound the loss.
    kills = [f.start for f in soak.faults if f.name.startswith("uvicorn worker")]
    at_risk = sum(
        1
        for c in calls
        if c.status != 0 and any(k - 2 <= c.started + c.latency <= k for k in kills)
    )
    usage_calls = usage["calls"] or 0
    lines += [
        "",
        f"## Counts written (after uvicorn's graceful SIGTERM, exit status {web_status})",
        "",
        f"Calls include the {sum(warm.values())} warm-up calls made before the load started.",
        "",
        "| what | count |",
        "| --- | ---: |",
        f"| calls answered by the proxy (any status) | {answered} |",
        f"| of which 200 | {ok_calls} |",
        f"| upstream requests answered (any) / 200 | {upstream_all} / {upstream_200} |",
        f"| DatasourceUsage calls (sum) | {usage_calls} |",
        f"| DatasourceUsage errors (sum) | {usage['errors'] or 0} |",
        f"| ProxyCall rows | {rows} |",
        f"| answered calls not in DatasourceUsage | {answered - usage_calls} |",
        f"| answered calls without a ProxyCall row | {answered - rows} |",
        f"| calls answered in the 2 s before a uvicorn worker SIGKILL (may be lost) | {at_risk} |",
        "",
        "| status | answers | ProxyCall rows |",
        "| --- | ---: | ---: |",
    ]
    for status in sorted(set(answered_by_status) | set(rows_by_status)):
        lines.append(
            f"| {status} | {answered_by_status.get(status, 0)} | {rows_by_status.get(status, 0)} |"
        )
    # Where 200s and their call-log rows differ: 5-second buckets of the run (the row's time
    # and the caller's start differ by the call's latency, so a call near a bucket's edge can
    # show as +1 in one bucket and -1 in the next).
    bucket = 5
    clock = load_started - time.monotonic() + time.time()  # the load's start, wall clock
    client_buckets = Counter(int((c.wall - clock) // bucket) for c in calls if c.status == 200)
    row_buckets = Counter(
        int((called_at.timestamp() - clock) // bucket)
        for called_at in ProxyCall.objects.filter(status=200).values_list("called_at", flat=True)
    )
    differ = [
        f"{b * bucket:+d}..{(b + 1) * bucket} s: {row_buckets[b] - client_buckets[b]:+d}"
        for b in sorted(set(client_buckets) | set(row_buckets))
        if b >= 0 and row_buckets[b] != client_buckets[b]
    ]
    lines += [
        "",
        "Call-log rows minus 200 answers, per 5 s of the run where they differ: "
        + ("; ".join(differ[:20]) if differ else "none")
        + (f" (and {len(differ) - 20} more)" if len(differ) > 20 else ""),
    ]
    # Every 200 reached the upstream and must be written, bar what a SIGKILL took; nothing
    # may be written that was not answered.
    counts_ok = (
        ok_calls - at_risk <= usage_calls <= answered
        and ok_calls - at_risk <= rows <= answered
        and ok_calls - at_risk <= rows_by_status.get(200, 0) <= ok_calls
    )

    # Tokens, secrets, grants.
    with relay.lock:
        issued = set(relay.issued)
    secret_values = {
        **{f"issued token {digest(v)}": v for v in issued},
        **{f"client secret of {s}": v for s, v in client_secrets.items()},
        **{
            f"Basic credentials of {s}": base64.b64encode(f"client-{s}:{v}".encode()).decode()
            for s, v in client_secrets.items()
        },
        **{f"API key {i}": v for i, v in enumerate(keys)},
        "webhook secret": hook_secret,
        "webhook secret (base64 part)": hook_secret.removeprefix("whsec_"),
    }
    found: list[str] = []
    for path in [*sorted(soak.dir.rglob("*.log")), soak.pg.log]:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for label, value in secret_values.items():
            if value and value in text:
                found.append(f"{label} in {path.name}")
    op_log = op.log()
    refresh_answers = {k: v for k, v in relay.answers.items() if k.startswith("refresh_token")}
    statuses = {
        t.datasource.slug: (t.status, t.last_error or "")
        for t in Token.objects.select_related("datasource").filter(user=None)
    }
    grants_lost = sum(1 for status, _ in statuses.values() if status == "needs_reauthorization")
    invalid_grant = sum(v for k, v in relay.answers.items() if "invalid_grant" in k)
    events = Counter(r.json.get("type") for r in receiver.verified())
    unverified = len(receiver.requests) - len(receiver.verified())
    lines += [
        "",
        "## Tokens and secrets",
        "",
        "| check | value |",
        "| --- | ---: |",
        f"| upstream calls with another datasource's token (must be 0) | {len(upstream.wrong)} |",
        "| upstream calls with a token the provider does not accept (expired/unknown) | "
        f"{upstream.unknown} |",
        f"| secrets found in process logs (must be 0; {len(secret_values)} values searched) | "
        f"{len(found)} |",
        f"| refresh tokens reused at the provider (must be 0) | {relay.reused} |",
        f"| token endpoint answers invalid_grant | {invalid_grant} |",
        f"| grants lost (tokens needing re-authorization) | {grants_lost} |",
        f"| tokens issued (access + refresh + id) | {len(issued)} |",
        f"| provider resource checks logged | {op_log['counters'].get('resource', 0)} |",
        "",
        "Token endpoint answers (at the relay): "
        + ", ".join(f"{k}: {v}" for k, v in sorted(relay.answers.items())),
        "",
        "Token endpoint requests by relay mode: "
        + ", ".join(f"{k}: {v}" for k, v in sorted(relay.by_mode.items())),
        "",
        "Webhook events received (signature verified): "
        + (", ".join(f"{k}: {v}" for k, v in sorted(events.items())) or "none")
        + f"; unverified: {unverified}",
    ]
    for item in found:
        lines.append(f"- secret found: {item}")
    for item in upstream.wrong[:10]:
        lines.append(f"- wrong token: {item}")
    del refresh_answers
    lines += [
        "",
        "## Datasources at the end",
        "",
        "| datasource | token status | last error |",
        "| --- | --- | --- |",
    ]
    for slug, (status, error) in sorted(statuses.items()):
        lines.append(f"| {slug} | {status} | {error[:120]} |")

    five_hundreds = by_status[500]
    invariants = {
        "0 tokens of another datasource": not upstream.wrong,
        "0 secrets in logs": not found,
        "0 answers 500": five_hundreds == 0,
        "counts add up": counts_ok,
        "0 refresh tokens reused": relay.reused == 0,
    }
    lines += ["", "## Invariants", ""]
    for name, held in invariants.items():
        lines.append(f"- {'PASS' if held else 'FAIL'}: {name}")
    return "\n".join(lines) + "\n", all(invariants.values())


if __name__ == "__main__":
    sys.exit(main())
