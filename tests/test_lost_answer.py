"""Issue 30: a dead refresh holder is noticed in seconds, and a lost answer is retried at once.

A refresh whose answer never reached us (the lease holder was SIGKILLed after sending it, or the
read timed out) may have rotated the refresh token at the provider. What happens next depends on
the provider:

* with a refresh-token reuse grace period (Okta's grace period, Auth0's reuse interval: the fake
  provider's ``rotation="grace"``, see ``fakeprovider.GRACE_DOCS``) the same refresh token sent
  again at once is accepted, and the grant survives;
* with strict reuse detection (the fake with ``reuse_grace=0``, and panva's oidc-provider, which
  revokes the grant when a consumed refresh token comes back) the retry gets ``invalid_grant``:
  the token needs re-authorization, and a ``lost_response`` event says when the lost request was
  really sent and why a person must re-authorize.

Either way callers waiting behind the dead holder get an answer within about LEASE_SECONDS of the
kill (the holder's heartbeat keeps a live lease; a dead one lapses), never after LEASE_WAIT; and a
live holder whose request outlasts LEASE_SECONDS keeps its lease.

Real processes, real sockets; no time travel on the lease and no sleeping: every wait polls with
a deadline. oidc-provider cannot hold an answer, so a small relay in front of its token endpoint
(:class:`HoldingRelay`) forwards each request at once and holds the provider's answer on demand.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

import pytest
import requests
from django.db import connection
from django.test import Client
from django.utils import timezone

from datasources.models import Token, TokenEvent, TokenStatus

from . import fakeprovider
from .conftest import make_datasource
from .fakeprovider import HANG_MAX, api_key_client, body_json, connect, proxy_url, wait_until
from .helpers import ROOT, subprocess_env
from .oidcjourney import REDIRECT_URI, authorize_in_admin
from .test_recovery import other_sessions, wait_for_sessions_to_end

pytestmark = pytest.mark.django_db(transaction=True)

fake_provider = fakeprovider.fake_provider  # the fixture: starts and stops fake providers

#: Set explicitly (the default is becoming 5): a dead holder's lease lapses within this long.
LEASE_SECONDS = 3
#: Far above LEASE_SECONDS: a waiter answered after this long would show the old stall.
LEASE_WAIT = 30.0
#: The acceptance bound: waiting callers are answered within this long of the kill.
ANSWER_BOUND = LEASE_SECONDS + 2.0
#: The in-process read timeout of (c).
REFRESH_TIMEOUT = 0.5
#: How many callers wait behind the holder.
WAITERS = 3

SECRET = "a-client-secret-long-enough-for-hs256-0123456789"


def tune(settings, **values: Any) -> None:
    settings.DATASOURCES = {**settings.DATASOURCES, **values}


def row(datasource) -> Token:
    return Token.objects.get(datasource=datasource, user=None)


def expire_locally(datasource) -> None:
    """Our copy of the access token expired: the next call needs a refresh."""
    Token.objects.filter(datasource=datasource).update(
        expires_at=timezone.now() - timedelta(seconds=5)
    )


# --- a holding relay in front of a real token endpoint ---------------------------------------


@dataclass
class RelayedCall:
    """One request through the relay: what was sent, when, and what the provider answered."""

    form: dict[str, str]
    received_at: float  # wall clock, when it arrived (and was forwarded at once)
    status: int | None = None
    answer: dict[str, Any] = field(default_factory=dict)
    outcome: str = "pending"  # issued, error:<code>, lost (...)

    @property
    def grant_type(self) -> str:
        return self.form.get("grant_type", "")

    @property
    def refresh_token_sent(self) -> str | None:
        return self.form.get("refresh_token")


class HoldingRelay:
    """An HTTP relay for a token endpoint: forwards each POST to ``target`` at once (so the
    provider processes it, rotating a refresh token), and with :meth:`hang` holds the
    provider's answer until :meth:`release` — the fake provider's ``hang(after_issue=True)``
    for a real provider. Records every call like the fake provider does."""

    def __init__(self, target: str) -> None:
        self.target = target.rstrip("/")
        self.calls: list[RelayedCall] = []
        self._hang_times = 0
        self._gates: list[threading.Event] = []
        self._hanging = 0
        self._lock = threading.Lock()
        relay = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                relay._relay(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HoldingRelay:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def hang(self, *, times: int = 1, after_issue: bool = True) -> None:
        """Hold the provider's answer to the next ``times`` requests until :meth:`release` (the
        request itself always reaches the provider at once: ``after_issue`` only)."""
        assert after_issue, "the relay holds answers, not requests"
        with self._lock:
            self._hang_times = times

    def release(self) -> None:
        with self._lock:
            gates, self._gates = self._gates, []
            self._hang_times = 0
        for gate in gates:
            gate.set()

    @property
    def hanging(self) -> int:
        with self._lock:
            return self._hanging

    def refresh_calls(self) -> list[RelayedCall]:
        with self._lock:
            return [c for c in self.calls if c.grant_type == "refresh_token"]

    def _relay(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length > 0 else b""
        form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
        call = RelayedCall(form=form, received_at=time.time())
        gate = None
        with self._lock:
            self.calls.append(call)
            if self._hang_times > 0:
                self._hang_times -= 1
                gate = threading.Event()
                self._gates.append(gate)
        headers = {
            name: handler.headers[name]
            for name in ("Content-Type", "Authorization", "Accept", "DPoP")
            if handler.headers.get(name)
        }
        upstream = requests.post(
            f"{self.target}{handler.path}", data=body, headers=headers, timeout=30
        )
        call.status = upstream.status_code
        try:
            call.answer = upstream.json()
        except ValueError:
            call.answer = {}
        call.outcome = (
            "issued" if upstream.ok else f"error:{call.answer.get('error', upstream.status_code)}"
        )
        if gate is not None:
            with self._lock:
                self._hanging += 1
            try:
                gate.wait(HANG_MAX)
            finally:
                with self._lock:
                    self._hanging -= 1
        handler.close_connection = True
        try:
            handler.send_response(upstream.status_code)
            handler.send_header("Content-Type", upstream.headers.get("Content-Type", "text/plain"))
            handler.send_header("Content-Length", str(len(upstream.content)))
            handler.send_header("Cache-Control", "no-store")
            handler.end_headers()
            handler.wfile.write(upstream.content)
            handler.wfile.flush()
        except OSError:
            call.outcome = f"lost ({call.outcome})"


@pytest.fixture(scope="module")
def op_config() -> dict[str, Any]:
    """oidc-provider with refresh-token rotation (its default): a consumed refresh token that
    comes back revokes the grant ("refresh token already used")."""
    return {
        "rotateRefreshToken": True,
        "clients": [
            {
                "client_id": "web",
                "client_secret": SECRET,
                "redirect_uris": [REDIRECT_URI],
                "grant_types": ["authorization_code", "refresh_token"],
                "response_types": ["code"],
                "scope": "openid offline_access api",
            }
        ],
    }


@dataclass
class Setup:
    """A connected datasource, its token endpoint (a fake provider or a relay to oidc-provider)
    and a way to check what the provider thinks of a refresh token."""

    datasource: Any
    endpoint: Any  # FakeProvider or HoldingRelay: hang/hanging/release/refresh_calls
    api_token: Any  # access token -> whether the provider's resource server accepts it
    refresh_alive: Any  # refresh token -> whether the provider still accepts it


def fake_setup(provider, staff_client) -> Setup:
    datasource = connect(provider, staff_client)
    return Setup(datasource, provider, provider.accepts, provider.is_live_refresh_token)


@contextmanager
def oidc_setup(request, staff_client) -> Iterator[Setup]:
    op = request.getfixturevalue("op")
    relay = HoldingRelay(op.issuer).start()
    try:
        datasource = make_datasource(
            slug="op",
            base_url=f"{op.issuer}/_test/resource/",
            authorization_url=op.authorization_url,
            access_token_url=f"{relay.url}/token",
            client_id="web",
            client_secret=SECRET,
            scopes="openid offline_access api",
        )
        authorize_in_admin(staff_client, op, datasource)

        def api_token(access_token: str) -> bool:
            response = requests.get(
                op.resource_url, headers={"Authorization": f"Bearer {access_token}"}, timeout=10
            )
            return response.status_code == 200

        def refresh_alive(refresh_token: str) -> bool:
            response = requests.post(
                op.token_url,
                data={"grant_type": "refresh_token", "refresh_token": refresh_token},
                auth=("web", SECRET),
                timeout=10,
            )
            return response.status_code == 200

        yield Setup(datasource, relay, api_token, refresh_alive)
    finally:
        relay.stop()


@contextmanager
def setup_for(kind: str, request, staff_client) -> Iterator[Setup]:
    """``grace`` (Okta-like, 30 s grace period), ``grace-same`` (the same answer again),
    ``strict`` (the fake with reuse detection at once) or ``oidc-provider`` (strict, real)."""
    if kind == "oidc-provider":
        with oidc_setup(request, staff_client) as setup:
            yield setup
        return
    start = request.getfixturevalue("fake_provider")
    if kind == "grace":
        provider = start("okta", reuse_grace=30.0)
    elif kind == "grace-same":
        provider = start("okta", reuse_grace=30.0, reuse_answer="same")
    else:
        provider = start("auth0", reuse_grace=0.0)
    yield fake_setup(provider, staff_client)


# --- callers and the holder ------------------------------------------------------------------


@dataclass
class Answer:
    started: float  # time.monotonic()
    ended: float
    status: int
    body: Any


class Waiters:
    """Callers through the proxy, each in its own thread with its own database connection."""

    def __init__(self, client: Client, datasource, count: int) -> None:
        self.answers: dict[int, Answer] = {}
        self.errors: dict[int, BaseException] = {}
        self._started = threading.Semaphore(0)
        self._threads = [
            threading.Thread(target=self._call, args=(client, datasource, i), daemon=True)
            for i in range(count)
        ]

    def _call(self, client: Client, datasource, i: int) -> None:
        try:
            own = Client(**client.defaults)
            started = time.monotonic()
            self._started.release()
            response = own.get(proxy_url(datasource, f"waiter-{i}"))
            self.answers[i] = Answer(
                started, time.monotonic(), response.status_code, body_json(response)
            )
        except BaseException as err:  # reported by the main thread
            self.errors[i] = err
        finally:
            connection.close()

    def start(self) -> Waiters:
        for thread in self._threads:
            thread.start()
        for _ in self._threads:
            assert self._started.acquire(timeout=10), "a waiter did not start"
        return self

    def join(self, timeout: float) -> list[Answer]:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in self._threads if t.is_alive()]
        assert not stuck, f"callers still waiting {timeout}s after the kill: {stuck}"
        assert not self.errors, self.errors
        return [self.answers[i] for i in sorted(self.answers)]


@contextmanager
def holder_mid_refresh(setup: Setup, refresh_token: str) -> Iterator[subprocess.Popen]:
    """A separate process (tests/proc_refresh.py) takes the lease and sends the refresh; the
    provider rotates and holds the answer. Yields the live process; ends it at the end, and
    (PostgreSQL) waits for the database sessions opened meanwhile to end: join the threads
    that opened them inside the block."""
    sessions_before = other_sessions()
    holder = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "proc_refresh.py"), setup.datasource.slug, "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=subprocess_env(DATASOURCES_LEASE_SECONDS=str(LEASE_SECONDS)),
        cwd=ROOT,
    )
    try:
        wait_until(
            lambda: setup.endpoint.hanging == 1 or holder.poll() is not None,
            60,
            interval=0.05,
            what="the subprocess's refresh at the provider",
        )
        assert holder.poll() is None, holder.communicate()[1][-2000:]
        sent = setup.endpoint.refresh_calls()
        assert len(sent) == 1 and sent[0].outcome == "issued", sent  # rotated at the provider
        assert sent[0].refresh_token_sent == refresh_token
        assert row(setup.datasource).lease_id  # the holder holds the lease
        yield holder
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.communicate(timeout=30)
    wait_for_sessions_to_end(sessions_before)


def kill(holder: subprocess.Popen) -> float:
    """SIGKILL the holder; the moment (time.monotonic()) it is gone."""
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    assert holder.returncode == -signal.SIGKILL
    return time.monotonic()


# --- what the record says --------------------------------------------------------------------

_STAMP = re.compile(r"(\d{4}-\d{2}-\d{2})[ T](\d{2}:\d{2}:\d{2})(\.\d+)?")


def stamp_in(detail: str) -> float:
    """The first date and time written in ``detail`` (in the current time zone, as the event
    writes it), as a Unix time."""
    found = _STAMP.search(detail)
    assert found, f"no time in the event: {detail!r}"
    naive = datetime.fromisoformat(f"{found[1]} {found[2]}{found[3] or ''}")
    return timezone.make_aware(naive, timezone.get_current_timezone()).timestamp()


def assert_lost_and_reauthorize(datasource, sent_at: float) -> TokenEvent:
    """One lost_response event that says the answer was lost and why a person must
    re-authorize, naming the time the lost request was really sent (the provider received it at
    ``sent_at``, a Unix time) — not the moment the holder's lease ran out."""
    events = list(TokenEvent.objects.filter(datasource=datasource, kind="lost_response"))
    assert len(events) == 1, list(TokenEvent.objects.values_list("kind", "detail"))
    detail = events[0].detail
    lowered = detail.lower()
    assert "lost" in lowered or "no answer" in lowered, detail
    assert "re-authoriz" in lowered or "reauthoriz" in lowered, detail
    written = stamp_in(detail)  # to the second (or finer)
    assert -1.0 <= sent_at - written <= 2.0, (
        f"the event names {datetime.fromtimestamp(written).isoformat()}, the lost request was "
        f"sent at {datetime.fromtimestamp(sent_at).isoformat(timespec='milliseconds')}: {detail}"
    )
    assert TokenEvent.objects.filter(
        datasource=datasource, kind="reauthorization_required"
    ).exists()
    return events[0]


def assert_survived(setup: Setup, answers_token: str | None = None) -> Token:
    token = row(setup.datasource)
    assert token.status == TokenStatus.ACTIVE, (token.status, token.last_error)
    assert token.lease_id == ""
    assert not TokenEvent.objects.filter(
        datasource=setup.datasource, kind="reauthorization_required"
    ).exists()
    if answers_token is not None:
        assert token.access_token == answers_token
    assert setup.api_token(token.access_token)
    return token


# --- (a), (b), (d): a lease holder killed mid-refresh ----------------------------------------


@pytest.mark.parametrize("kind", ["grace", "strict", "oidc-provider"])
def test_waiters_behind_a_killed_holder_are_answered_within_lease_seconds(
    request, staff_client, settings, kind
):
    """The holder sends the refresh, the provider rotates and holds the answer, the holder is
    SIGKILLed. The callers waiting through the proxy are answered within LEASE_SECONDS + 2 s of
    the kill (not LEASE_WAIT): the first takes the lease over and sends the SAME refresh token
    again at once. A grace-period provider accepts it and the grant survives; with strict reuse
    detection it is invalid_grant, 409 reauthorization_required, and an event naming the time
    the lost request was really sent."""
    tune(settings, LEASE_SECONDS=LEASE_SECONDS, LEASE_WAIT=LEASE_WAIT, PROBE_INTERVAL=0.2)
    with setup_for(kind, request, staff_client) as setup:
        datasource, endpoint = setup.datasource, setup.endpoint
        client = api_key_client(datasource)
        before = row(datasource)
        expire_locally(datasource)
        endpoint.hang(after_issue=True)  # rotate, then hold the answer
        with holder_mid_refresh(setup, before.refresh_token) as holder:
            waiters = Waiters(client, datasource, WAITERS).start()
            killed_at = kill(holder)
            endpoint.release()  # the rotated answer goes to a dead socket
            answers = waiters.join(LEASE_WAIT + 10)

        after_kill = max(a.ended - killed_at for a in answers)
        longest = max(a.ended - a.started for a in answers)
        assert after_kill < ANSWER_BOUND, (after_kill, answers)
        assert longest < ANSWER_BOUND, (longest, answers)  # (d): nobody stalled for LEASE_WAIT
        print(f"{kind}: answered {after_kill:.2f}s after the kill, longest wait {longest:.2f}s")

        calls = endpoint.refresh_calls()
        assert [c.refresh_token_sent for c in calls] == [before.refresh_token] * 2, calls
        lost, retried = calls
        assert lost.outcome.startswith("lost") or lost.outcome == "issued", lost.outcome
        lost_refresh = lost.answer["refresh_token"]  # what the dead holder never heard of
        retry_after_kill = retried.received_at - (time.time() - (time.monotonic() - killed_at))
        assert retry_after_kill < LEASE_SECONDS + 1.0, retry_after_kill  # taken over, sent at once

        if kind == "grace":
            assert retried.outcome == "issued"
            assert [a.status for a in answers] == [200] * WAITERS, answers
            token = assert_survived(setup, retried.answer["access_token"])
            assert token.refresh_token == retried.answer["refresh_token"]
            from_waiters = [c for c in endpoint.api() if c.path.startswith("waiter-")]
            assert [c.token for c in from_waiters] == [token.access_token] * WAITERS
            assert endpoint.family_of(before.refresh_token).reuses == 1
            assert not endpoint.family_of(before.refresh_token).revoked
        else:
            assert retried.outcome == "error:invalid_grant", retried.outcome
            assert [a.status for a in answers] == [409] * WAITERS, answers
            assert {a.body["error"] for a in answers} == {"reauthorization_required"}
            token = row(datasource)
            assert token.status == TokenStatus.NEEDS_REAUTHORIZATION
            assert token.lease_id == ""
            assert not setup.refresh_alive(lost_refresh)  # the provider revoked the grant
            assert_lost_and_reauthorize(datasource, lost.received_at)
        assert len(endpoint.refresh_calls()) == 2


# --- (c): the answer lost to a read timeout, no process killed --------------------------------


@pytest.mark.parametrize("kind", ["grace", "grace-same", "strict", "oidc-provider"])
def test_answer_lost_to_a_read_timeout_is_retried_at_once(request, staff_client, settings, kind):
    """REFRESH_TIMEOUT is short; the provider rotates, then holds its answer past it. The same
    call sends the same refresh token again at once, within its lease: a grace-period provider
    answers it (200, the token stays active, an event says the answer was lost and the retry
    accepted); with strict reuse detection it is 409 and the lost_response event."""
    tune(
        settings,
        LEASE_SECONDS=LEASE_SECONDS,
        LEASE_WAIT=LEASE_WAIT,
        REFRESH_TIMEOUT=REFRESH_TIMEOUT,
        PROBE_INTERVAL=0.2,
    )
    with setup_for(kind, request, staff_client) as setup:
        datasource, endpoint = setup.datasource, setup.endpoint
        client = api_key_client(datasource)
        before = row(datasource)
        expire_locally(datasource)
        endpoint.hang(after_issue=True)  # rotate, then hold the answer
        try:
            started = time.monotonic()
            response = client.get(proxy_url(datasource, "after-timeout"))
            took = time.monotonic() - started
        finally:
            endpoint.release()
        assert took < REFRESH_TIMEOUT + 2.0, took  # one timeout and one retry, no waiting
        expected = 200 if kind.startswith("grace") else 409
        assert response.status_code == expected, body_json(response)

        calls = endpoint.refresh_calls()
        assert [c.refresh_token_sent for c in calls] == [before.refresh_token] * 2, calls
        lost, retried = calls
        assert lost.answer.get("refresh_token")  # rotated at the provider, answer held
        if kind.startswith("grace"):
            assert response.status_code == 200, body_json(response)
            assert retried.outcome == "issued"
            token = assert_survived(setup, retried.answer["access_token"])
            assert token.refresh_token == retried.answer["refresh_token"]
            if kind == "grace-same":
                assert retried.answer == lost.answer  # the lost answer, delivered again
            assert [c.token for c in endpoint.api() if c.path == "after-timeout"] == [
                token.access_token
            ]
            events = list(TokenEvent.objects.filter(datasource=datasource, kind="lost_response"))
            assert len(events) == 1, list(TokenEvent.objects.values_list("kind", "detail"))
            detail = events[0].detail.lower()
            assert "lost" in detail or "no answer" in detail, events[0].detail
            # ... and that the retry went through (the wording is the product's to choose)
            assert any(w in detail for w in ("accept", "answered it", "intact")), detail
            written = stamp_in(events[0].detail)  # the lost request's real send time
            assert -1.0 <= lost.received_at - written <= 2.0, (lost.received_at, detail)
        else:
            assert response.status_code == 409, body_json(response)
            assert body_json(response)["error"] == "reauthorization_required"
            assert retried.outcome == "error:invalid_grant", retried.outcome
            assert row(datasource).status == TokenStatus.NEEDS_REAUTHORIZATION
            assert not setup.refresh_alive(lost.answer["refresh_token"])
            assert_lost_and_reauthorize(datasource, lost.received_at)
        assert len(endpoint.refresh_calls()) == 2


# --- the fake's grace period itself ------------------------------------------------------------


def test_grace_profile_follows_the_documented_reuse_rules(fake_provider, staff_client):
    """The fake's rotation="grace" as GRACE_DOCS describes it, through plain HTTP: the previous
    refresh token works within the window (another new pair), an older one or one after the
    window is reuse detection, which revokes the family's refresh and access tokens."""
    provider = fake_provider("okta", reuse_grace=30.0)
    datasource = connect(provider, staff_client)
    r1 = row(datasource).refresh_token

    def refresh(value: str, at=provider) -> requests.Response:
        return requests.post(
            f"{at.url}/token",
            data={"grant_type": "refresh_token", "refresh_token": value},
            auth=(fakeprovider.CLIENT_ID, fakeprovider.SECRET),
            timeout=10,
        )

    first = refresh(r1).json()  # R1 -> R2 (say this answer was lost)
    again = refresh(r1).json()  # R1 again within the grace period -> R3
    assert again["refresh_token"] not in (r1, first["refresh_token"])
    assert again["access_token"] != first["access_token"]
    assert provider.live_refresh_tokens() == [again["refresh_token"]]
    onward = refresh(again["refresh_token"]).json()  # R3 -> R4: R3 is now the previous one
    assert provider.accepts(onward["access_token"])
    stale = refresh(r1)  # R1 is no longer the previous one: reuse detection
    assert stale.status_code == 400 and stale.json()["error"] == "invalid_grant"
    assert provider.family_of(r1).revoked
    assert provider.live_refresh_tokens() == []
    assert not provider.accepts(onward["access_token"])  # access tokens of the family revoked
    assert refresh(onward["refresh_token"]).json()["error"] == "invalid_grant"

    # A window of 0: the first reuse is already reuse detection.
    strict = fake_provider("okta", reuse_grace=0.0)
    strict_ds = connect(strict, staff_client, slug="strict")
    s1 = row(strict_ds).refresh_token
    assert refresh(s1, strict).status_code == 200
    reused = refresh(s1, strict)
    assert reused.status_code == 400 and reused.json()["error"] == "invalid_grant"
    assert strict.family_of(s1).revoked
    assert json.loads(reused.content)["error_description"] == "refresh token reuse detected"


# --- a live holder keeps its lease -------------------------------------------------------------


def test_a_live_holder_keeps_its_lease_past_lease_seconds(fake_provider, staff_client, settings):
    """The other side of a short lease: a holder whose token request runs longer than
    LEASE_SECONDS is alive, and its heartbeat extends the lease (every LEASE_SECONDS/3), so
    nobody takes it over and the provider sees one refresh. The lease records when the refresh
    started (``refresh_started_at``)."""
    tune(settings, LEASE_SECONDS=LEASE_SECONDS, LEASE_WAIT=LEASE_WAIT, REFRESH_TIMEOUT=20.0)
    provider = fake_provider("okta")
    datasource = connect(provider, staff_client)
    client = api_key_client(datasource)
    before = row(datasource)
    expire_locally(datasource)
    provider.hang()  # the request waits at the provider, unprocessed
    waiters = Waiters(client, datasource, 2).start()
    try:
        wait_until(lambda: provider.hanging == 1, 10, what="the holder's refresh at the provider")
        leased = row(datasource)
        assert leased.lease_id and leased.lease_expires_at
        sent_at = provider.refresh_calls()[0].received_at
        assert abs(leased.refresh_started_at.timestamp() - sent_at) < 1.0, (
            leased.refresh_started_at,
            sent_at,
        )
        first_expiry = leased.lease_expires_at

        def extended() -> bool:
            now = row(datasource)
            assert now.lease_id == leased.lease_id, "a live holder's lease was taken over"
            assert len(provider.refresh_calls()) == 1, provider.refresh_calls()
            return now.lease_expires_at > first_expiry

        wait_until(
            extended,
            LEASE_SECONDS,
            interval=0.05,
            what="the holder's heartbeat to extend its lease",
        )
        # Past the lease's first expiry, the holder still holds it and nobody took over.
        wait_until(
            lambda: timezone.now() > first_expiry + timedelta(seconds=0.5),
            LEASE_SECONDS + 1,
            interval=0.05,
            what="the lease's first expiry to pass",
        )
        still = row(datasource)
        assert still.lease_id == leased.lease_id
        assert still.lease_expires_at > timezone.now()
        assert len(provider.refresh_calls()) == 1
    finally:
        provider.release()
    answers = waiters.join(10)
    assert [a.status for a in answers] == [200, 200], answers
    calls = provider.refresh_calls()
    assert len(calls) == 1 and calls[0].refresh_token_sent == before.refresh_token
    token = row(datasource)
    assert token.status == TokenStatus.ACTIVE and token.lease_id == ""
    assert token.access_token == calls[0].answer["access_token"]
    assert token.outcome_unknown_at is None
    assert not TokenEvent.objects.filter(datasource=datasource, kind="lost_response").exists()
