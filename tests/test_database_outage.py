"""Issue 30, with the real pieces: the app's PostgreSQL server restarted, stopped and cut while
the README's web servers serve proxy calls under load, and while a Celery worker is refreshing.

The database is a server of the test's own (tests/pgcluster.py), so it can be restarted
without touching the suite's shared one; the test process reads and writes it through its
``default`` connection, pointed there for the test (:func:`on_database`). The web server is
the README's uvicorn command (2 workers, the fast lane) or its gunicorn command (WSGI), a real
subprocess with the project's own settings (tests/appserver.py). The upstream API and the
token endpoint are a fake provider (tests/fakeprovider.py) whose access tokens live 30 s, so
the request path refreshes them during the run (one refresh is made to fail, for webhook events
around the faults), and whose API answers only tokens it issued and has not seen expire.

Load: warm callers, each a thread with its own API key on a keep-alive ``requests.Session``
(one connection, so one worker, whose caches hold its key and token), calling continuously.
Faults, mid-load: ``pg_ctl restart -m fast``; the server stopped for a few seconds, then
started; every session of the app's database terminated. What is checked, from what the
callers, the upstream and the database saw:

* warm callers get 200 throughout (served from their worker's caches while the database is
  unavailable: PROXY_STALE_IF_ERROR), never with an expired token;
* a caller whose key was never used (not cached) gets ``503 {"error": "database_unavailable"}``
  with Retry-After while the database is down, and 200 once it is back: the first within 2 s
  of the database answering again;
* no 500, and nothing in the server's stderr that looks like an unhandled error;
* after a graceful SIGTERM (which writes what the workers hold), usage counts and call-log rows
  add up exactly to the calls the upstream answered;
* every token event that makes a webhook has its delivery row.

The Celery variant: a worker's refresh whose answer is held at the provider; the database is
stopped, the provider answers, the database comes back. The refresh is stored (the provider's
newest refresh token is the stored one) and done once (the provider saw one refresh).

PostgreSQL only (``postgres_only``: deselected on SQLite): the suite's PostgreSQL run is where
these run, once; they start their own server either way.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import requests
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.db import DEFAULT_DB_ALIAS, connections
from django.test import Client
from django.utils import timezone

from datasources.models import (
    DatasourceUsage,
    ProxyCall,
    Token,
    TokenEvent,
    WebhookDelivery,
)
from datasources.proxy.apikeys import create_api_key

from . import pgcluster
from .appserver import SERVERS, free_port, server_argv, server_env, wait_for
from .fakeprovider import FakeProvider, connect, fake_provider, wait_until  # noqa: F401
from .helpers import ROOT
from .test_webhooks import make_endpoint
from .test_worker import Workers

pytestmark = [pytest.mark.postgres_only]

#: The migrated database each test's database is copied from.
TEMPLATE = "outage_template"
#: The fake provider's access-token lifetime: the request path refreshes at half of it
#: (LIFETIME_FRACTION), so tokens are refreshed every ~15 s during the run, and one still has
#: more than the longest outage left when its refresh comes due.
TOKEN_LIFETIME = 30
#: How long the database is stopped in the middle of the load.
OUTAGE_SECONDS = 6.0
#: The production default of PROXY_CACHE_SECONDS: after a fault, the load goes on until every
#: warm caller's entries were read from the database again, so each fault starts warm.
CACHE_SECONDS = 5.0
#: The bound the issue sets: the first uncached call served after the database answers again.
RECOVERY_BOUND = 2.0
#: Warm callers (threads with keep-alive sessions) and the pause between one's calls.
WARM_CALLERS = 4
PAUSE = 0.05
#: The Redis database number these tests use (flushed by each), not the suite's.
REDIS_DB = int(os.environ.get("OUTAGE_REDIS_DB", "9"))


# --- the database -----------------------------------------------------------------------------


@contextmanager
def on_database(url: str) -> Iterator[None]:
    """This thread's ``default`` connection to the database at ``url`` inside the block: the
    ORM, the test client and the helpers (``subprocess_env``'s DATABASE_URL too) use it."""
    import environ
    from django.db.utils import load_backend

    previous = connections[DEFAULT_DB_ALIAS]
    config = environ.Env.db_url_config(url)
    settings_dict = {
        **previous.settings_dict,
        **{key: config.get(key, "") for key in ("ENGINE", "NAME", "USER", "PASSWORD", "HOST")},
        "PORT": config.get("PORT", ""),
        "OPTIONS": {},
    }
    backend = load_backend(settings_dict["ENGINE"])
    connections[DEFAULT_DB_ALIAS] = backend.DatabaseWrapper(settings_dict, DEFAULT_DB_ALIAS)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):  # a connection the cluster's stop broke
            connections[DEFAULT_DB_ALIAS].close()
        connections[DEFAULT_DB_ALIAS] = previous


def reconnect() -> None:
    """Forget this thread's connection: after a restart it is dead, and outside a request
    nothing else closes it."""
    with contextlib.suppress(Exception):
        connections[DEFAULT_DB_ALIAS].close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, django_db_blocker) -> Iterator[pgcluster.PgCluster]:
    """The module's own PostgreSQL server, with a migrated template database."""
    if not pgcluster.available():
        pytest.skip("no PostgreSQL server binaries (make test installs Debian's as root)")
    pg = pgcluster.PgCluster(tmp_path_factory.mktemp("pg")).start()
    try:
        pg.create_database(TEMPLATE)
        with django_db_blocker.unblock(), on_database(pg.url(TEMPLATE)):
            call_command("migrate", verbosity=0, interactive=False)
        yield pg
    finally:
        pg.close()


@pytest.fixture
def app_database(cluster, django_db_blocker) -> Iterator[str]:
    """A fresh database on the cluster for this test, the test process's ``default``."""
    name = f"app_{uuid.uuid4().hex[:10]}"
    cluster.create_database(name, template=TEMPLATE)
    with django_db_blocker.unblock(), on_database(cluster.url(name)):
        yield name


def redis_env(queue: str) -> dict[str, str]:
    """REDIS_URL (upstream health, and the broker) on this module's Redis database, flushed,
    and a queue of the test's own; the filesystem broker without REDIS_URL."""
    base = os.environ.get("REDIS_URL")
    if not base:
        return {"CELERY_BROKER_URL": "filesystem://", "CELERY_TASK_DEFAULT_QUEUE": queue}
    import redis

    parts = urlsplit(base)
    url = urlunsplit(parts._replace(path=f"/{REDIS_DB}"))
    redis.Redis.from_url(url, socket_connect_timeout=2).flushdb()
    return {"REDIS_URL": url, "CELERY_BROKER_URL": url, "CELERY_TASK_DEFAULT_QUEUE": queue}


def staff_client() -> Client:
    admin = get_user_model().objects.create_superuser("admin", "admin@example.com", "admin-pass")
    client = Client()
    client.force_login(admin)
    return client


# --- callers ----------------------------------------------------------------------------------


@dataclass
class Result:
    started: float  # time.monotonic()
    ended: float
    status: int  # 0: no answer (the exception's name in ``error``)
    error: str | None = None  # the JSON answer's "error", when not 200
    retry_after: str | None = None

    def describe(self, origin: float) -> str:
        return (
            f"{self.status} {self.error or ''} (Retry-After {self.retry_after}) "
            f"at +{self.started - origin:.2f}..{self.ended - origin:.2f} s"
        )


def call(session: requests.Session, url: str) -> Result:
    started = time.monotonic()
    try:
        response = session.get(url, timeout=30)
    except requests.RequestException as err:
        return Result(started, time.monotonic(), 0, type(err).__name__)
    error = None
    if response.status_code != 200:
        try:
            error = response.json().get("error")
        except ValueError:
            error = response.text[:100]
    return Result(
        started, time.monotonic(), response.status_code, error, response.headers.get("Retry-After")
    )


class Caller(threading.Thread):
    """Calls ``url`` with its own key on one keep-alive session until stopped (or, with
    ``until_ok``, until the first 200), recording every answer."""

    def __init__(self, url: str, key: str, *, until_ok: bool = False) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.session = requests.Session()
        self.session.trust_env = False
        self.session.headers["Authorization"] = f"Api-Key {key}"
        self.until_ok = until_ok
        self.results: list[Result] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            result = call(self.session, self.url)
            self.results.append(result)
            if self.until_ok and result.status == 200:
                return
            self.halt.wait(PAUSE)

    def stop(self) -> None:
        self.halt.set()
        self.join(60)

    def oks_after(self, moment: float) -> int:
        return sum(1 for r in list(self.results) if r.status == 200 and r.started > moment)

    def first_ok(self) -> Result | None:
        return next((r for r in self.results if r.status == 200), None)

    def connections(self) -> int:
        """Connections the session opened (1: every call went to the same worker)."""
        pools = self.session.get_adapter(self.url).poolmanager.pools
        # keys(): urllib3's RecentlyUsedContainer refuses plain iteration.
        return sum(pools[key].num_connections for key in pools.keys())  # noqa: SIM118


# --- the web server ---------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    base: str
    process: subprocess.Popen
    stdout: Path
    stderr: Path

    def stop(self) -> int:
        """A graceful SIGTERM (the workers write what they hold); its exit status."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(60)

    def kill(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


@contextmanager
def web_server(name: str, directory: Path, env: dict[str, str]) -> Iterator[Server]:
    port = free_port()
    stdout, stderr = directory / f"{name}.out", directory / f"{name}.err"
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        process = subprocess.Popen(
            server_argv(name, port, workers=2),
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=err,
            start_new_session=True,  # its own process group: its workers are stopped with it
        )
    server = Server(name, f"http://127.0.0.1:{port}", process, stdout, stderr)
    try:
        wait_for(f"{server.base}/healthz", time.monotonic() + 60)
        yield server
    finally:
        server.kill()


# --- what must add up -------------------------------------------------------------------------


def expected_deliveries(kinds: list[str]) -> Counter:
    """The webhook deliveries (one endpoint) the token events ``kinds`` (in order, for a token
    that was not failing before the first) must have written: webhooks/events.py's receivers."""
    expected: Counter = Counter()
    failing = False
    for kind in kinds:
        if kind == TokenEvent.Kind.REFRESH_FAILED:
            expected["token.refresh_failed"] += 1
            failing = True
        elif kind == TokenEvent.Kind.REAUTHORIZATION_REQUIRED:
            expected["token.refresh_failed"] += 1
            expected["datasource.reauthorization_required"] += 1
            failing = True
        elif kind == TokenEvent.Kind.REFRESHED:
            if failing:
                expected["datasource.recovered"] += 1
            failing = False
        elif kind == TokenEvent.Kind.AUTHORIZED:
            expected["datasource.authorized"] += 1
            if failing:
                expected["datasource.recovered"] += 1
            failing = False
    return expected


@dataclass
class Fault:
    name: str
    began: float  # time.monotonic()
    back: float = 0.0  # the database answered again
    probe: Caller | None = None
    notes: list[str] = field(default_factory=list)


# --- the web servers under load -----------------------------------------------------------------


@pytest.mark.parametrize("server", SERVERS)
def test_the_proxy_rides_out_database_faults_under_load(
    server,
    cluster,
    app_database,
    fake_provider,  # noqa: F811
    django_db_blocker,
    tmp_path,
):
    test_started = time.monotonic()
    provider: FakeProvider = fake_provider("rfc", lifetime=TOKEN_LIFETIME)
    datasource = connect(provider, staff_client())
    make_endpoint("http://127.0.0.1:9/hooks")  # project-wide, every event; never delivered
    events_before = TokenEvent.objects.order_by("-pk").values_list("pk", flat=True).first()
    proxied = f"/api/v1/datasources/{datasource.slug}/proxy/items"

    def new_key(name: str) -> str:
        return create_api_key(name, datasources=[datasource])[1]

    warm_keys = [new_key(f"warm-{n}") for n in range(WARM_CALLERS)]
    # Keys created now, each used for the first time during its fault (never cached).
    probe_keys = {name: new_key(f"probe-{name}") for name in ("restart", "stop", "kill")}
    env = server_env(
        django_db_blocker,
        LOG_LEVEL="INFO",
        ALLOWED_HOSTS="127.0.0.1,localhost",
        # A refresh that failed is tried again within seconds (not BACKOFF_BASE's 30).
        DATASOURCES_BACKOFF_BASE="2",
        **redis_env(f"outage-{uuid.uuid4().hex[:8]}"),
    )
    assert cluster.url(app_database) == env["DATABASE_URL"]

    with web_server(server, tmp_path, env) as app:
        url = app.base + proxied
        warm = [Caller(url, key) for key in warm_keys]
        faults: list[Fault] = []
        origin = time.monotonic()
        try:
            for caller in warm:
                caller.start()
            wait_until(
                lambda: all(c.oks_after(origin) >= 3 for c in warm),
                30,
                what="every warm caller's first calls",
            )
            # The next token request fails once: a refresh_failed event, then a recovery.
            provider.fail("503-html", times=1)

            def settle(after: float) -> None:
                """Load goes on until every warm caller's entries were read from the database
                again (its worker's cache entries last CACHE_SECONDS)."""
                wait_until(
                    lambda: all(c.oks_after(after + CACHE_SECONDS + 0.5) >= 2 for c in warm),
                    CACHE_SECONDS + 30,
                    what="the warm callers' calls after the database came back",
                )

            def probe(fault: Fault) -> None:
                fault.probe = Caller(url, probe_keys[fault.name], until_ok=True)
                fault.probe.start()

            # (1) pg_ctl restart -m fast.
            fault = Fault("restart", time.monotonic())
            probe(fault)
            fault.back = cluster.restart()
            faults.append(fault)
            fault.probe.join(30)
            settle(fault.back)

            # (2) Stopped for OUTAGE_SECONDS, then started.
            with cluster.stopped(OUTAGE_SECONDS) as outage:
                fault = Fault("stop", outage.stopped_at)
                probe(fault)
            fault.back = outage.back_at
            faults.append(fault)
            fault.probe.join(30)
            settle(fault.back)

            # (3) Every session of the app's database terminated.
            fault = Fault("kill", time.monotonic())
            fault.notes.append(f"{cluster.kill_backends(app_database)} sessions terminated")
            fault.back = time.monotonic()
            probe(fault)
            faults.append(fault)
            fault.probe.join(30)
            settle(fault.back)
        finally:
            for caller in warm:
                caller.stop()
            for fault in faults:
                if fault.probe is not None:
                    fault.probe.stop()
        # Graceful: the workers write the usage counts and call-log rows they hold.
        exit_status = app.stop()
    stderr = app.stderr.read_text(errors="replace")
    reconnect()

    def when(moment: float) -> str:
        return f"+{moment - origin:.2f} s"

    timeline = "; ".join(
        f"{f.name} at {when(f.began)}, back at {when(f.back)} {' '.join(f.notes)}" for f in faults
    )
    print(f"\n{server}: {timeline}; the test took {time.monotonic() - test_started:.1f} s")

    # One run is costly: every property is checked and the broken ones reported together.
    broken: list[str] = []

    def check(holds: bool, message: str) -> None:
        if not holds:
            broken.append(message)

    # Warm callers: 200 throughout, each on its one connection (its worker's caches).
    for number, caller in enumerate(warm):
        bad = [r.describe(origin) for r in caller.results if r.status != 200]
        check(
            not bad,
            f"warm caller {number} was not served from its worker's caches: {len(bad)} of "
            f"{len(caller.results)} calls not 200, first {bad[:3]}, last {bad[-1:]}",
        )
        check(
            caller.connections() == 1,
            f"warm caller {number} opened {caller.connections()} connections (another worker)",
        )
    stop = next(f for f in faults if f.name == "stop")
    during = [r for c in warm for r in c.results if stop.began < r.started < stop.back]
    check(len(during) >= WARM_CALLERS, "the warm callers made no calls during the outage")

    # Uncached callers: 503 database_unavailable with Retry-After while it is down, then 200.
    for fault in faults:
        assert fault.probe is not None and fault.probe.results
        seen = [r.describe(origin) for r in fault.probe.results]
        odd = [
            r.describe(origin)
            for r in fault.probe.results
            if r.status != 200
            and ((r.status, r.error) != (503, "database_unavailable") or not r.retry_after)
        ]
        check(
            not odd,
            f"{fault.name}: the uncached caller got other than 200 or 503 database_unavailable "
            f"with Retry-After: {odd[:3]}",
        )
        check(fault.probe.first_ok() is not None, f"{fault.name}: never served: {seen[-3:]}")
    seen = [r.describe(origin) for r in stop.probe.results]
    refused = [
        r
        for r in stop.probe.results
        if (r.status, r.error) == (503, "database_unavailable") and r.started < stop.back
    ]
    check(
        bool(refused),
        f"the uncached caller was not refused (503 database_unavailable) while the database "
        f"was down: {seen[:3]}",
    )
    first = stop.probe.first_ok()
    if first is not None:
        recovery = first.ended - stop.back
        print(f"{server}: the first uncached call was served {recovery:.2f} s after the database")
        check(
            recovery < RECOVERY_BOUND,
            f"the first uncached 200 came {recovery:.2f} s after the database answered again "
            f"(bound {RECOVERY_BOUND} s): {seen[-3:]}",
        )

    # No 500, nothing unhandled, a clean graceful stop.
    everyone = [r for c in warm for r in c.results] + [
        r for f in faults if f.probe is not None for r in f.probe.results
    ]
    errors = Counter((r.status, r.error) for r in everyone if r.status >= 500 and r.status != 503)
    check(not errors, f"5xx answers other than 503: {dict(errors)}")
    check(not [r for r in everyone if r.status == 0], "calls without an answer")
    for needle in ("Traceback", "Exception in ASGI application"):
        at = stderr.find(needle)
        check(at < 0, f"{needle!r} in the server's stderr: {stderr[max(at - 500, 0) : at + 1500]}")
    check(exit_status == 0, f"the server exited with {exit_status} after SIGTERM")

    # The upstream was never sent an expired token, and every call it answered was counted
    # and logged exactly once (the graceful stop wrote what the workers held).
    answered = provider.api()
    check(bool(answered), "nothing reached the upstream")
    statuses = Counter(c.status for c in answered)
    check(set(statuses) <= {200}, f"the upstream answered {dict(statuses)} (expired tokens?)")
    served = sum(1 for r in everyone if r.status == 200)
    check(served == len(answered), f"{served} calls served, the upstream answered {len(answered)}")
    usage = DatasourceUsage.objects.filter(datasource=datasource).first()
    counted = (usage.calls, usage.errors) if usage else (0, 0)
    logged = ProxyCall.objects.filter(datasource=datasource).count()
    check(
        (counted, logged) == ((len(answered), 0), len(answered)),
        f"usage (calls, errors) {counted} and call-log rows {logged} for {len(answered)} calls "
        "the upstream answered",
    )

    # The token was refreshed during the run, around the faults (the first refresh failed, on
    # purpose, the next recovered), never twice with the same refresh token, and the stored
    # one is the provider's newest.
    refreshes = provider.refresh_calls()
    outcomes = Counter(c.outcome for c in refreshes)
    check(
        outcomes["issued"] >= 1 and outcomes["failure:503-html"] == 1,
        f"token refreshes during the run: {dict(outcomes)}",
    )
    check(
        not [c for c in refreshes if c.outcome.startswith("error:")],
        f"a refresh token was refused: {dict(outcomes)}",
    )
    issued = [c for c in refreshes if c.outcome == "issued"]
    token = Token.objects.get(datasource=datasource)
    check(
        not issued or token.refresh_token == issued[-1].answer["refresh_token"],
        "the stored refresh token is not the provider's newest",
    )

    # Every token event that makes a webhook has its delivery row.
    kinds = list(
        TokenEvent.objects.filter(datasource=datasource, pk__gt=events_before or 0)
        .order_by("pk")
        .values_list("kind", flat=True)
    )
    deliveries = Counter(
        WebhookDelivery.objects.filter(datasource=datasource).values_list("event_type", flat=True)
    )
    expected = expected_deliveries(kinds)
    check(
        deliveries == expected,
        f"webhook deliveries {dict(deliveries)}, the token events {kinds} make {dict(expected)}",
    )
    check(deliveries["token.refresh_failed"] >= 1, f"no refresh_failed event: {kinds}")

    assert not broken, f"{server} ({timeline}):\n- " + "\n- ".join(broken)


# --- a Celery worker's refresh across an outage -----------------------------------------------------


def worker_lines(output: str) -> str:
    """What a worker logged about the refresh (not beat's every-second sweep lines)."""
    lines = [
        line
        for line in output.splitlines()
        if "sweep" not in line and ("refresh" in line or "WARNING" in line or "ERROR" in line)
    ]
    return "\n".join(lines[-25:])


@pytest.mark.worker
def test_a_refresh_answered_while_the_database_is_down_is_stored_once(
    cluster,
    app_database,
    fake_provider,  # noqa: F811
    tmp_path,
):
    provider: FakeProvider = fake_provider("rfc")
    datasource = connect(provider, staff_client())
    token = Token.objects.get(datasource=datasource)
    before = token.refresh_token
    # Due for the background now (as a store would leave a token this close to expiry: within
    # the workers' REFRESH_MARGIN, so the task refreshes rather than finding it fresh).
    Token.objects.filter(pk=token.pk).update(
        expires_at=timezone.now() + timedelta(seconds=5), refresh_due_at=timezone.now()
    )
    provider.hang(after_issue=True)  # the refresh is done at the provider, its answer held
    # Two pool processes: while one holds the refresh, the other is free to take a second
    # one, were the lease (which cannot be renewed while the database is down) given away.
    group = Workers(
        tmp_path, 1, concurrency=2, env=redis_env(f"outage-worker-{uuid.uuid4().hex[:8]}")
    )
    try:
        wait_until(lambda: provider.hanging == 1, 60, interval=0.1, what="the worker's refresh")
        [held] = provider.refresh_calls()
        assert held.refresh_token_sent == before
        issued = held.answer["refresh_token"]
        with cluster.stopped(OUTAGE_SECONDS) as outage:
            provider.release()  # the answer reaches the worker while the database is down
            wait_until(lambda: held.status == 200, 10, what="the held answer to be sent")
            answered_at = time.monotonic()
        assert answered_at < outage.starting_at  # it arrived during the outage

        def stored() -> Token | None:
            reconnect()
            try:
                row = Token.objects.get(pk=token.pk)
            except Exception:  # the database: not yet
                return None
            done = row.refresh_token == issued and not row.lease_id
            return row if done else None

        try:
            row = wait_until(stored, 30, interval=0.2, what="the refresh to be stored")
        except AssertionError as err:
            reconnect()
            row = Token.objects.get(pk=token.pk)
            raise AssertionError(
                f"{err}: stored refresh token is "
                f"{'the one before' if row.refresh_token == before else 'another'}, "
                f"refresh_count {row.refresh_count}, lease {row.lease_id!r}, provider saw "
                f"{[c.outcome for c in provider.refresh_calls()]}; the worker logged:\n"
                + worker_lines(group.output())
            ) from None
    finally:
        group.stop()
    reconnect()
    row = Token.objects.get(pk=token.pk)
    assert provider.refresh_calls() == [held], [c.outcome for c in provider.refresh_calls()]
    assert (row.refresh_count, row.status, row.failure_count) == (1, "active", 0)
    assert row.refresh_due_at > timezone.now() + timedelta(minutes=10)  # nothing left to do
    assert provider.is_live_refresh_token(row.refresh_token)
