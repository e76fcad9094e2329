"""Short-lived tokens under concurrency, against django-oauth-toolkit with refresh-token rotation.

Tokens of 5 s, 20 s and 120 s (shorter than REQUEST_LEEWAY for two of them): concurrent proxy
calls (threads through the live server) and separate processes on an expired token make exactly
one refresh, and steady load refreshes about once per effective window, never reusing a refresh
token (DOT's reuse protection would revoke the whole family, and every later call would fail).

Refreshes are counted where they happen: at the authorization server (DOT's RefreshToken rows:
one new row per refresh, the used one revoked) and in our Token.refresh_count.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta

import pytest
import requests
from django.utils import timezone
from oauth2_provider.models import AccessToken, RefreshToken

from datasources.conf import app_settings
from datasources.models import Datasource, Token, TokenStatus
from datasources.proxy.apikeys import create_api_key

from .conftest import make_datasource
from .helpers import ROOT, subprocess_env

pytestmark = pytest.mark.django_db(transaction=True)

LIFETIMES = [5, 20, 120]
CALLERS = 48
PROCESSES = 4


# --- fixtures and helpers ---------------------------------------------------------------------


@dataclass
class Connected:
    datasource: Datasource
    lifetime: int
    api_key: str
    proxy_url: str  # the proxy's URL for upstream path "me"


def _forget_oauthlib_cores() -> None:
    """DOT's views build their oauthlib server once per class (``_oauthlib_core``), with the
    access-token lifetime of that moment; drop them so the next request uses the current
    setting, and so no later test inherits a short lifetime."""
    from oauth2_provider.views.mixins import OAuthLibMixin

    classes = [OAuthLibMixin]
    while classes:
        cls = classes.pop()
        classes.extend(cls.__subclasses__())
        if "_oauthlib_core" in vars(cls):
            delattr(cls, "_oauthlib_core")


@pytest.fixture
def connect(auth_server, authorize, live_server, settings) -> Iterator[Callable[[int], Connected]]:
    """An authorized datasource whose tokens live ``lifetime`` seconds at the provider.

    DOT re-reads OAUTH2_PROVIDER on setting_changed, which the ``settings`` fixture sends (and
    sends again when it restores the setting after the test).
    """

    def build(lifetime: int) -> Connected:
        settings.OAUTH2_PROVIDER = {
            **settings.OAUTH2_PROVIDER,
            "ACCESS_TOKEN_EXPIRE_SECONDS": lifetime,
        }
        _forget_oauthlib_cores()
        auth_server.app("client-basic")
        datasource = make_datasource(auth_server)
        token = authorize(datasource)
        issued = (token.expires_at - token.last_refreshed_at).total_seconds()
        assert abs(issued - lifetime) < 2, f"the provider issued a {issued:.1f}s token"
        _, key = create_api_key("load")
        return Connected(
            datasource,
            lifetime,
            key,
            f"{live_server.url}/api/v1/datasources/{datasource.slug}/proxy/me",
        )

    yield build
    _forget_oauthlib_cores()


def expire(connected: Connected) -> None:
    """Make the current token expired, here and at the provider, as if its whole lifetime had
    passed (the lifetime, from issue to expiry, stays what the provider granted)."""
    expired = timezone.now() - timedelta(seconds=1)
    Token.objects.filter(datasource=connected.datasource).update(
        expires_at=expired,
        last_refreshed_at=expired - timedelta(seconds=connected.lifetime),
    )
    AccessToken.objects.update(expires=expired)


@dataclass(frozen=True)
class ServerCounts:
    """What the authorization server and our row say about refreshes so far."""

    refresh_tokens: int  # DOT keeps every refresh token it issued (revoked once used)
    refresh_count: int

    @classmethod
    def now(cls, datasource: Datasource) -> ServerCounts:
        return cls(
            RefreshToken.objects.count(),
            Token.objects.get(datasource=datasource).refresh_count,
        )

    def refreshes_since(self, before: ServerCounts) -> int:
        """Refreshes since ``before`` at the provider; fails unless our row agrees."""
        at_provider = self.refresh_tokens - before.refresh_tokens
        assert self.refresh_count - before.refresh_count == at_provider, (before, self)
        return at_provider


def assert_no_reused_refresh_token(datasource: Datasource) -> None:
    """With rotation every used refresh token is revoked; reuse protection would have revoked
    the whole family (including the live one) had an old one ever been sent again."""
    token = Token.objects.get(datasource=datasource)
    assert token.status == TokenStatus.ACTIVE, token.last_error
    live = list(RefreshToken.objects.filter(revoked__isnull=True).values_list("token", flat=True))
    assert live == [token.refresh_token]


@dataclass(frozen=True)
class Call:
    status: int
    bearer: str  # the token the upstream received ("" unless 200)
    seconds: float
    body: str


def proxy_call(session: requests.Session, url: str) -> Call:
    started = time.monotonic()
    response = session.get(url, timeout=60)
    seconds = time.monotonic() - started
    bearer = ""
    if response.status_code == 200:
        bearer = json.loads(response.content)["headers"].get("Authorization", "")
    return Call(response.status_code, bearer.removeprefix("Bearer "), seconds, response.text[:300])


def callers(connected: Connected, count: int) -> list[requests.Session]:
    """One keep-alive connection per caller, opened one at a time before the test starts.

    The live server listens with a backlog of 10: 48 connects at once would see dropped SYNs
    and retries a second or more later, which spreads the "concurrent" calls over seconds (and,
    for a 5 s token, past its refresh window). An unauthenticated call opens the connection
    without touching the token.
    """
    sessions = []
    for _ in range(count):
        session = requests.Session()
        assert session.get(connected.proxy_url, timeout=30).status_code == 401
        session.headers["Authorization"] = f"Api-Key {connected.api_key}"
        sessions.append(session)
    return sessions


def burst(sessions: list[requests.Session], url: str) -> list[Call]:
    """Every session calls ``url`` once, all released at the same moment."""
    barrier = threading.Barrier(len(sessions))

    def call(session: requests.Session) -> Call:
        barrier.wait(timeout=30)
        return proxy_call(session, url)

    with ThreadPoolExecutor(len(sessions)) as pool:
        return list(pool.map(call, sessions))


def describe(calls: list[Call]) -> str:
    failed = [c for c in calls if c.status != 200]
    slowest = max(c.seconds for c in calls)
    return f"{len(failed)} of {len(calls)} failed {failed[:3]}; slowest {slowest:.2f}s"


def effective_window(lifetime: float) -> float:
    """The request path's leeway for a token of ``lifetime`` seconds (the rule under test)."""
    return min(app_settings.REQUEST_LEEWAY, app_settings.LIFETIME_FRACTION * lifetime)


# --- 48 concurrent proxy calls ----------------------------------------------------------------


@pytest.mark.parametrize("lifetime", LIFETIMES)
def test_concurrent_proxy_calls_on_an_expired_token_refresh_once(connect, lifetime):
    connected = connect(lifetime)
    sessions = callers(connected, CALLERS)
    expire(connected)
    before = ServerCounts.now(connected.datasource)

    calls = burst(sessions, connected.proxy_url)
    first_done = time.monotonic()

    assert all(c.status == 200 for c in calls), describe(calls)
    after = ServerCounts.now(connected.datasource)
    assert after.refreshes_since(before) == 1, describe(calls)
    # Callers that waited used the winner's token; nobody refreshed again after it.
    stored = Token.objects.get(datasource=connected.datasource)
    assert {c.bearer for c in calls} == {stored.access_token}

    # 2 s later: the new token is still outside the window for 20 s and 120 s tokens. Time
    # passing is what is tested here, so wait for it.
    time.sleep(max(0.0, first_done + 2.0 - time.monotonic()))
    remaining = (stored.expires_at - timezone.now()).total_seconds()
    again = burst(sessions, connected.proxy_url)

    assert all(c.status == 200 for c in again), describe(again)
    more = ServerCounts.now(connected.datasource).refreshes_since(after)
    if remaining > effective_window(lifetime) + 1:
        assert more == 0, f"{more} refreshes with {remaining:.1f}s of {lifetime}s left"
    else:  # a 5 s token is due again by now (or almost): still one refresh at most
        assert more <= 1, f"{more} refreshes with {remaining:.1f}s of {lifetime}s left"
    assert_no_reused_refresh_token(connected.datasource)
    for session in sessions:
        session.close()


# --- 4 processes --------------------------------------------------------------------------------

#: A separate process: set up Django, say "ready", wait for "go" on stdin, ask for a token.
#: (A start signal instead of a start time: process start-up on a loaded machine varies by
#: seconds, longer than a 5 s token's refresh window.)
PROCESS = """
import os, sys
import django
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
django.setup()
from datasources.models import Datasource
datasource = Datasource.objects.get(slug=sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
print(datasource.get_access_token(), flush=True)
"""


@pytest.mark.parametrize("lifetime", LIFETIMES)
def test_separate_processes_on_an_expired_token_refresh_once(connect, lifetime):
    connected = connect(lifetime)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PROCESS, connected.datasource.slug],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=subprocess_env(),
            cwd=ROOT,
        )
        for _ in range(PROCESSES)
    ]
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read()[-2000:]
        expire(connected)
        before = ServerCounts.now(connected.datasource)
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        outputs = [proc.communicate(timeout=60) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)

    for proc, (_out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-2000:]
    printed = {out.strip() for out, _ in outputs}
    assert printed == {Token.objects.get(datasource=connected.datasource).access_token}
    assert ServerCounts.now(connected.datasource).refreshes_since(before) == 1
    assert_no_reused_refresh_token(connected.datasource)


# --- steady load ------------------------------------------------------------------------------

STEADY_LIFETIME = 5
STEADY_THREADS = 4


def test_steady_load_refreshes_about_once_per_window(connect):
    """4 callers in a loop over 3 lifetimes of a 5 s token.

    A token is refreshed when it enters the request window (half its lifetime by default), so
    over ``duration`` seconds there are about ``duration / (lifetime - window)`` refreshes: 6
    for 15 s of a 5 s token, whatever the number of calls (with a fixed 30 s leeway, longer than
    the lifetime, every call refreshed). Callers holding a valid token never wait for the one
    refreshing it.
    """
    connected = connect(STEADY_LIFETIME)
    duration = 3 * STEADY_LIFETIME
    period = STEADY_LIFETIME - effective_window(STEADY_LIFETIME)
    expected = duration / period
    sessions = callers(connected, STEADY_THREADS)
    expire(connected)
    before = ServerCounts.now(connected.datasource)
    start = threading.Barrier(STEADY_THREADS)

    def loop(session: requests.Session) -> list[Call]:
        start.wait(timeout=30)
        deadline = time.monotonic() + duration
        calls = []
        while time.monotonic() < deadline:
            calls.append(proxy_call(session, connected.proxy_url))
        return calls

    with ThreadPoolExecutor(STEADY_THREADS) as pool:
        calls = [call for result in pool.map(loop, sessions) for call in result]

    assert all(c.status == 200 for c in calls), describe(calls)
    refreshes = ServerCounts.now(connected.datasource).refreshes_since(before)
    assert len(calls) > 10 * expected, f"too little load to tell: {len(calls)} calls"
    assert expected - 1 <= refreshes <= expected + 1, (
        f"{refreshes} refreshes for {len(calls)} calls in {duration}s "
        f"(expected about {expected:.0f}: one per {period:.1f}s)"
    )
    slowest = max(c.seconds for c in calls)
    assert slowest < 5, f"a call took {slowest:.1f}s: it waited on another caller's refresh"
    assert_no_reused_refresh_token(connected.datasource)
    for session in sessions:
        session.close()
