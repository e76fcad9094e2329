"""Issue 29's provider edges, proven at faithful fakes (``tests/fakeprovider.py``).

Each scenario is a documented provider behaviour, driven through every way a call reaches an
API: the proxy on both serving paths (Django's view under WSGI; the ASGI application with its
fast lane), the Python client (``datasource.session()``) and the admin's Test. Outcomes are
asserted where they happen: the token-endpoint calls the provider counted, what its API
received and answered, the token row, and the answer the caller got.

* Salesforce's early session end: the org's session policy ends a session right after it was
  issued (here: right after a refresh for expiry). The API answers 401 with
  ``[{"errorCode": "INVALID_SESSION_ID"}]`` and no ``WWW-Authenticate``. One more refresh, the
  retry succeeds; a second end within REJECTION_COOLDOWN is passed on, no token request.
* Entra's MFA on refresh: ``interaction_required`` (AADSTS50076) to the refresh grant means
  re-authorization (status, event, signal, 409 with the authorize URL) and the admin says it
  in plain words; a person signing in again fixes it.
* Graph's InvalidAuthenticationToken: a 401 whose challenge has no ``error`` parameter; the
  status decides: one refresh, one retry, and no storm after.
* ``WWW-Authenticate: Bearer error="insufficient_scope"`` on a 403: passed on, no token request,
  even where 403 is an "expired" status; ``error="invalid_token"`` on a 403: expired whatever
  the status, one refresh, one retry.
* The storm bound with real processes: uvicorn with the README's production flags and two
  workers, fifty keep-alive callers against an always-401 API for STORM_SECONDS; the provider
  counts the token requests.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from django.test import Client
from django.utils import timezone

from datasources.models import Datasource, Token, TokenEvent, TokenStatus
from datasources.proxy.apikeys import create_api_key
from datasources.signals import reauthorization_required

from . import fakeprovider
from .appserver import free_port, server_argv, wait_for
from .conftest import captured
from .fakeprovider import (
    GRAPH_CHALLENGE,
    GRAPH_INVALID_TOKEN,
    FakeProvider,
    authorize_through_admin,
    body_json,
    connect,
    proxy_url,
    wait_until,
)
from .helpers import ROOT, subprocess_env

pytestmark = pytest.mark.django_db(transaction=True)

fake_provider = fakeprovider.fake_provider  # the fixture: starts and stops fake providers

#: Salesforce's REST API answer to an ended session (no WWW-Authenticate header).
SALESFORCE_INVALID_SESSION = [
    {"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}
]
#: RFC 6750 §3.1 challenges on a 403.
INSUFFICIENT_SCOPE = 'Bearer error="insufficient_scope", scope="Mail.Read"'
INVALID_TOKEN_403 = 'Bearer error="invalid_token", error_description="The access token expired"'


# --- the four ways a call reaches the API ----------------------------------------------------


@dataclass
class Outcome:
    """What the caller got: the status and body the caller saw, the answer's headers (none for
    the admin's Test, which shows status and body), and for the admin's Test its result."""

    status: int | None
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    #: Our own refusal: the proxy's ``error`` (409 ``reauthorization_required`` …), the client's
    #: exception class name, or the admin Test's error sentence.
    refused: str = ""
    page: str = ""  # the admin Test's HTML
    result: Any = None  # the admin Test's ProbeResult


VIAS = ("proxy-wsgi", "proxy-asgi", "client", "admin-test")


class Via:
    """One way of calling ``path`` below a datasource's base URL."""

    def __init__(self, name: str, staff_client: Client) -> None:
        self.name = name
        self.staff_client = staff_client
        self._api: Client | None = None
        self.lane: Any = None  # proxy-asgi: the lane whose counters the test reads

    def lane_served(self) -> int:
        """Calls the ASGI fast lane served itself (not handed to the view) so far."""
        return self.lane.served if self.lane is not None else 0

    def __str__(self) -> str:
        return self.name

    def call(self, datasource: Datasource, path: str) -> Outcome:
        if self.name.startswith("proxy"):
            if self._api is None:
                _, key = create_api_key(f"edges-{self.name}")
                self._api = Client(HTTP_AUTHORIZATION=f"Api-Key {key}")
            response = self._api.get(proxy_url(datasource, path))
            body = body_json(response)
            refused = ""
            if response.status_code in (409, 503) and isinstance(body, dict):
                refused = body.get("error", "")
            return Outcome(response.status_code, body, dict(response.items()), refused)
        if self.name == "client":
            fresh = Datasource.objects.get(pk=datasource.pk)
            try:
                with fresh.session(timeout=10) as session:
                    response = session.get(path)
            except Exception as err:  # the client raises our refusals
                return Outcome(None, str(err), refused=type(err).__name__)
            try:
                body = response.json()
            except ValueError:
                body = response.text
            return Outcome(response.status_code, body, dict(response.headers))
        response = self.staff_client.post(
            f"/admin/datasources/datasource/{datasource.pk}/test/", {"method": "GET", "path": path}
        )
        assert response.status_code == 200, response.content[:500]
        result = response.context["result"]
        page = response.content.decode()
        if result.error:
            return Outcome(None, None, refused=result.error, page=page, result=result)
        try:
            body = json.loads(result.preview)
        except ValueError:
            body = result.preview
        # The page shows what the result says.
        assert f"{result.status} {result.reason}" in page
        return Outcome(result.status, body, page=page, result=result)


@pytest.fixture(params=VIAS)
def via(request, monkeypatch, staff_client) -> Via:
    if request.param == "proxy-asgi":
        from .serving import LANE, serve_proxy_through_asgi

        serve_proxy_through_asgi(monkeypatch)
        middleware = LANE.handed_over.get("middleware", 0)
        caller = Via(request.param, staff_client)
        caller.lane = LANE
        yield caller
        assert LANE.handed_over.get("middleware", 0) == middleware  # the lane was not off
        return
    yield Via(request.param, staff_client)


# --- helpers ---------------------------------------------------------------------------------


def row(datasource) -> Token:
    return Token.objects.get(datasource=datasource, user=None)


def expire_here(datasource) -> None:
    """Our stored expiry has passed (the provider may still accept the token)."""
    Token.objects.filter(datasource=datasource).update(
        expires_at=timezone.now() - timedelta(seconds=5)
    )


def api_since(provider: FakeProvider, start: int) -> list[tuple[str | None, int]]:
    """(token sent, status answered) of the API calls after the first ``start``."""
    return [(call.token, call.status) for call in provider.api()[start:]]


def issued(call) -> str:
    assert call.outcome == "issued", call.outcome
    return call.answer["access_token"]


def assert_challenge(outcome: Outcome, via: Via, expected: str | None) -> None:
    """The upstream's WWW-Authenticate reached the caller as sent (the admin's Test shows no
    headers)."""
    if via.name == "admin-test":
        return
    headers = {k.lower(): v for k, v in outcome.headers.items()}
    assert headers.get("www-authenticate") == expected, headers


# --- Salesforce: the session ended right after it was issued ---------------------------------


def test_salesforce_session_ended_at_once_after_a_refresh_costs_one_refresh(
    fake_provider, staff_client, via
):
    provider = fake_provider("salesforce")
    datasource = connect(provider, staff_client, token_lifetime=7200)  # no expires_in
    first = row(datasource)
    start = len(provider.api())

    # The org's session timeout has passed here: the call refreshes for expiry; the session
    # policy ends the new session at once, so the API rejects it (401, INVALID_SESSION_ID, no
    # challenge). The refresh was not caused by a rejection: one more, and the retry succeeds.
    expire_here(datasource)
    provider.end_sessions_after_refresh(1)
    outcome = via.call(datasource, "services/data/v60.0/sobjects/Account")
    assert outcome.status == 200, outcome
    assert outcome.body["path"] == "services/data/v60.0/sobjects/Account"

    refreshes = provider.refresh_calls()
    assert len(refreshes) == 2, [c.outcome for c in refreshes]
    ended, fresh = issued(refreshes[0]), issued(refreshes[1])
    # Salesforce never rotates: both refreshes sent the one refresh token we hold.
    assert [c.refresh_token_sent for c in refreshes] == [first.refresh_token] * 2
    assert api_since(provider, start) == [(ended, 401), (fresh, 200)]
    token = row(datasource)
    assert token.access_token == fresh
    assert token.refresh_token == first.refresh_token  # kept: not sent on refresh
    assert token.status == TokenStatus.ACTIVE and token.failure_count == 0
    assert token.rejection_refreshed_at is not None  # the second refresh: a rejection's
    if via.name == "admin-test":
        assert outcome.result.refreshed

    # The session is ended again at once, within REJECTION_COOLDOWN of the refresh that a
    # rejection caused: the 401 is passed on as Salesforce sent it, nothing asked of /token.
    provider.revoke_access_tokens()
    start = len(provider.api())
    outcome = via.call(datasource, "services/data/v60.0/sobjects/Account")
    assert outcome.status == 401, outcome
    assert outcome.body == SALESFORCE_INVALID_SESSION
    assert_challenge(outcome, via, None)
    assert len(provider.refresh_calls()) == 2
    assert api_since(provider, start) == [(fresh, 401)]  # sent once, not retried
    assert row(datasource).access_token == fresh
    assert row(datasource).status == TokenStatus.ACTIVE


# --- Entra: MFA required again on refresh ----------------------------------------------------


@pytest.mark.parametrize("trigger", ["expired", "rejected"])
def test_entra_mfa_on_refresh_needs_reauthorization(fake_provider, staff_client, via, trigger):
    provider = fake_provider("microsoft")
    datasource = connect(provider, staff_client, scopes="offline_access User.Read")
    before = row(datasource)
    provider.require_interaction()  # Conditional Access: MFA again, from a new location
    if trigger == "expired":
        provider.expire_access_tokens()
        expire_here(datasource)  # the request path refreshes for expiry
    else:
        provider.revoke_access_tokens()  # the API rejects the token: the refresh that follows

    with captured(reauthorization_required) as signals:
        outcome = via.call(datasource, "v1.0/me")

    # The provider: one refresh grant, answered Entra's 400 interaction_required.
    refreshes = provider.refresh_calls()
    assert [c.outcome for c in refreshes] == ["failure:entra-AADSTS50076"]
    assert refreshes[0].status == 400
    assert len(provider.api()) == (1 if trigger == "rejected" else 0)
    # The row: needs re-authorization, the error named with Entra's code; nothing thrown away.
    token = row(datasource)
    assert token.status == TokenStatus.NEEDS_REAUTHORIZATION
    assert token.last_error.startswith("interaction_required: AADSTS50076")
    assert token.refresh_token == before.refresh_token
    event = TokenEvent.objects.filter(datasource=datasource).latest("pk")
    assert event.kind == TokenEvent.Kind.REAUTHORIZATION_REQUIRED
    assert "interaction_required" in event.detail and "AADSTS50076" in event.detail
    assert [s["datasource"].pk for s in signals] == [datasource.pk]

    # The caller is told a person must authorize again, and where.
    authorize = f"/admin/datasources/datasource/{datasource.pk}/authorize/"
    if via.name.startswith("proxy"):
        assert outcome.status == 409, outcome
        assert outcome.refused == "reauthorization_required"
        assert outcome.body["authorize_url"].endswith(authorize)
    elif via.name == "client":
        assert outcome.refused == "ReauthorizationRequired", outcome
        assert "interaction_required" in outcome.body
    else:
        assert "interaction_required" in outcome.refused
        assert "multi-factor authentication" in outcome.result.explanation
        assert "multi-factor authentication" in outcome.page

    # The datasource's admin page says it in plain words, beside Entra's own.
    page = staff_client.get(f"/admin/datasources/datasource/{datasource.pk}/change/")
    text = page.content.decode()
    assert page.status_code == 200
    assert (
        "Microsoft Entra ID asks the person who authorized this datasource for multi-factor "
        "authentication again, which only they can do." in text
    )
    assert "AADSTS50076" in text and authorize in text

    # Later calls do not ask the provider again; the person signing in again fixes it.
    assert via.call(datasource, "v1.0/me").status in (409, None)
    assert len(provider.refresh_calls()) == 1
    assert authorize_through_admin(staff_client, datasource).status_code == 302
    assert row(datasource).status == TokenStatus.ACTIVE
    provider.expire_access_tokens()
    expire_here(datasource)
    outcome = via.call(datasource, "v1.0/me")
    assert outcome.status == 200, outcome
    assert provider.refresh_calls()[-1].outcome == "issued"


def test_entra_mfa_on_a_background_refresh_is_explained_in_the_admin(fake_provider, staff_client):
    """The sweep's refresh meets MFA (AADSTS50079: enroll first): the same verdict and words."""
    from datasources import tokens

    provider = fake_provider("microsoft")
    datasource = connect(provider, staff_client)
    provider.require_interaction(fakeprovider.entra_interaction_required(50079))
    tokens.refresh_token(datasource, force=True)
    token = row(datasource)
    assert token.status == TokenStatus.NEEDS_REAUTHORIZATION
    assert "AADSTS50079" in token.last_error
    text = staff_client.get(f"/admin/datasources/datasource/{datasource.pk}/change/")
    assert (
        "asks the person who authorized this datasource for multi-factor" in text.content.decode()
    )


# --- Graph: InvalidAuthenticationToken -------------------------------------------------------


def test_graph_invalid_authentication_token_refreshes_once_on_the_status(
    fake_provider, staff_client, via
):
    provider = fake_provider("microsoft")
    datasource = connect(provider, staff_client, scopes="offline_access Mail.Read")
    first = row(datasource)
    start = len(provider.api())

    # The user's sessions were revoked (a password reset): Graph answers 401 with a challenge
    # that has no error parameter, so the status says "expired".
    provider.revoke_access_tokens()
    served = via.lane_served()
    outcome = via.call(datasource, "v1.0/me/messages")
    assert outcome.status == 200, outcome
    [refresh] = provider.refresh_calls()
    fresh = issued(refresh)
    assert refresh.refresh_token_sent == first.refresh_token
    assert api_since(provider, start) == [(first.access_token, 401), (fresh, 200)]
    token = row(datasource)
    assert token.access_token == fresh
    assert token.refresh_token == refresh.answer["refresh_token"] != first.refresh_token

    # Revoked again at once: every call gets Graph's 401, passed on; no storm at /token.
    provider.revoke_access_tokens()
    start = len(provider.api())
    for i in range(5):
        outcome = via.call(datasource, f"v1.0/me/messages/{i}")
        assert outcome.status == 401, outcome
        assert outcome.body == GRAPH_INVALID_TOKEN
        assert_challenge(outcome, via, GRAPH_CHALLENGE)
    assert len(provider.refresh_calls()) == 1
    assert api_since(provider, start) == [(fresh, 401)] * 5
    if via.lane is not None:  # the fast lane itself refreshed, retried and passed them on
        assert via.lane_served() == served + 6
    assert row(datasource).status == TokenStatus.ACTIVE


# --- 403 with a Bearer challenge -------------------------------------------------------------


@pytest.mark.parametrize("statuses", ["401", "401,403"])
def test_insufficient_scope_is_passed_on_without_a_token_request(
    fake_provider, staff_client, via, statuses
):
    provider = fake_provider("rfc")
    datasource = connect(provider, staff_client, scopes="User.Read", expiry_status_codes=statuses)
    denied = {"error": "insufficient_scope", "error_description": "Mail.Read is required"}
    provider.api_always(403, denied, headers=(("WWW-Authenticate", INSUFFICIENT_SCOPE),))
    start = len(provider.api())
    token = row(datasource)

    outcome = via.call(datasource, "me/messages")
    assert outcome.status == 403, outcome
    assert outcome.body == denied
    assert_challenge(outcome, via, INSUFFICIENT_SCOPE)
    assert provider.refresh_calls() == []
    assert api_since(provider, start) == [(token.access_token, 403)]  # not retried
    assert row(datasource).access_token == token.access_token
    if via.name == "admin-test":
        # The admin says which scope is missing.
        notes = " ".join(outcome.result.notes)
        assert "Mail.Read" in notes and "Scope(s)" in notes
        assert "Mail.Read" in outcome.page


def test_invalid_token_on_a_403_refreshes_once_whatever_the_status(
    fake_provider, staff_client, via
):
    provider = fake_provider(
        "rfc",
        api_reject_status=403,
        api_reject_body={"error": "invalid_token"},
        api_reject_headers=(("WWW-Authenticate", INVALID_TOKEN_403),),
    )
    datasource = connect(provider, staff_client)  # "expired" statuses: 401 only
    first = row(datasource)
    start = len(provider.api())
    provider.revoke_access_tokens()

    outcome = via.call(datasource, "items")
    assert outcome.status == 200, outcome
    [refresh] = provider.refresh_calls()
    fresh = issued(refresh)
    assert api_since(provider, start) == [(first.access_token, 403), (fresh, 200)]
    assert row(datasource).access_token == fresh

    # Within the cooldown the next 403 invalid_token is passed on.
    provider.revoke_access_tokens()
    outcome = via.call(datasource, "items")
    assert outcome.status == 403, outcome
    assert_challenge(outcome, via, INVALID_TOKEN_403)
    assert len(provider.refresh_calls()) == 1


# --- the storm with real processes -----------------------------------------------------------

#: How long the callers call (the issue's 60 s), how many, on how many web processes.
STORM_SECONDS = 60.0
STORM_CALLERS = 50
STORM_WORKERS = 2
#: No caller starts a call in the run's last STORM_TAIL seconds, so that every answer, and so
#: every refresh decision, falls within STORM_SECONDS of the first call (asserted; see the bound
#: below). Calls there are ordinary ones (the last refresh was near the middle), answered in
#: about a tenth of a second; the slowest calls are those that waited for a refresh.
STORM_TAIL = 3.0
#: Each call's timeout: a net for a hung call, which fails the run.
STORM_CALL_TIMEOUT = 20.0
#: The production default (datasources.conf), named for the bound.
REJECTION_COOLDOWN = 30.0


def worker_pids(parent: int) -> list[int]:
    """uvicorn's worker processes (multiprocessing's spawned children, not its resource
    tracker)."""
    found: list[int] = []
    for task in Path(f"/proc/{parent}/task").iterdir():
        for pid in (task / "children").read_text().split():
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
    return found


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_always_401_under_50_callers_on_2_processes_costs_at_most_2_token_requests(
    fake_provider, staff_client, tmp_path
):
    """The bound, as the rule promises it: a rejection-caused refresh happens only when none
    happened within REJECTION_COOLDOWN, and its time is stored when it is stored (after the
    decision that caused it). So the k-th rejection refresh is decided at least
    (k-1) x REJECTION_COOLDOWN after the first is stored, which is after the first call
    started. A run in which every call starts and is answered within STORM_SECONDS of the first
    call can therefore hold at most ceil(STORM_SECONDS / REJECTION_COOLDOWN) = 2 of them, exactly
    (a third would need a decision at 60 s or later). The callers stop starting calls
    STORM_TAIL seconds before the end, so the last answer comes before it, which is asserted."""
    provider = fake_provider("rfc")
    datasource = connect(provider, staff_client)
    _, key = create_api_key("storm", datasources=[datasource])
    upstream = {"error": "invalid_token", "error_description": "The access token is invalid"}
    provider.api_always(401, upstream)  # with WWW-Authenticate: Bearer error="invalid_token"

    port = free_port()
    argv = server_argv("uvicorn", port)
    argv[argv.index("--workers") + 1] = str(STORM_WORKERS)
    env = subprocess_env(
        DJANGO_SETTINGS_MODULE="config.settings",  # the project's own (production) settings
        DEBUG="0",
        LOG_LEVEL="WARNING",
        DATASOURCES_REJECTION_COOLDOWN=str(REJECTION_COOLDOWN),
    )
    log_path = tmp_path / "uvicorn.log"
    url = f"http://127.0.0.1:{port}/api/v1/datasources/{datasource.slug}/proxy/storm"
    statuses: Counter = Counter()
    errors: list[str] = []
    answered_at: list[float] = []
    latencies: list[float] = []  # each caller's slowest call
    lock = threading.Lock()

    with open(log_path, "wb") as log:
        server = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(f"http://127.0.0.1:{port}/healthz", time.monotonic() + 60)
            wait_until(
                lambda: log_path.read_text().count("Application startup complete") >= STORM_WORKERS,
                60,
                interval=0.1,
                what="both workers",
            )
            workers = worker_pids(server.pid)
            assert len(workers) == STORM_WORKERS, workers
            cpu_before = {pid: cpu_seconds(pid) for pid in workers}
            go = threading.Barrier(STORM_CALLERS + 1)
            started = [0.0]

            def caller(n: int) -> None:
                session = requests.Session()  # keep-alive: one connection per caller
                session.trust_env = False
                headers = {"Authorization": f"Api-Key {key}"}
                seen: Counter = Counter()
                last, slowest = 0.0, 0.0
                go.wait()
                stop_starting = started[0] + STORM_SECONDS - STORM_TAIL
                i = 0
                try:
                    while (sent := time.monotonic()) < stop_starting:
                        i += 1
                        try:
                            answer = session.get(
                                f"{url}/{n}/{i}", headers=headers, timeout=STORM_CALL_TIMEOUT
                            )
                            seen[answer.status_code] += 1
                            if answer.status_code != 401 or answer.json() != upstream:
                                with lock:
                                    errors.append(f"{answer.status_code} {answer.text[:200]}")
                        except requests.RequestException as err:
                            with lock:
                                errors.append(f"{type(err).__name__}: {err}")
                        last = time.monotonic()
                        slowest = max(slowest, last - sent)
                finally:
                    session.close()
                    with lock:
                        statuses.update(seen)
                        answered_at.append(last)
                        latencies.append(slowest)

            threads = [
                threading.Thread(target=caller, args=(n,), daemon=True)
                for n in range(STORM_CALLERS)
            ]
            for thread in threads:
                thread.start()
            started[0] = time.monotonic()
            go.wait()
            for thread in threads:
                thread.join(STORM_SECONDS + 30)
            duration = max(answered_at) - started[0]
            cpu = {pid: cpu_seconds(pid) - cpu_before[pid] for pid in workers}
        finally:
            server.terminate()
            try:
                server.wait(40)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(10)

    refreshes = provider.refresh_calls()
    calls = sum(statuses.values())
    api_calls = len(provider.api())
    print(
        f"\nstorm: {calls} calls by {STORM_CALLERS} callers over {duration:.1f} s on "
        f"{STORM_WORKERS} uvicorn workers (cpu s per worker: "
        f"{', '.join(f'{c:.1f}' for c in cpu.values())}); statuses {dict(statuses)}; "
        f"slowest call {max(latencies):.2f} s; {api_calls} upstream calls "
        f"({api_calls - calls} retries); {len(refreshes)} token requests "
        f"(refresh grants at +{', +'.join(f'{c.at - started[0]:.1f}' for c in refreshes)} s)"
    )
    assert not any(thread.is_alive() for thread in threads)
    assert errors == [], errors[:5]  # every caller got the upstream's 401, never a 5xx
    assert statuses == Counter({401: calls}) and calls >= STORM_CALLERS
    # Both processes served (each used a share of the CPU the run took).
    assert all(seconds > 0.1 * sum(cpu.values()) for seconds in cpu.values()), cpu
    # The bound's precondition: every answer within STORM_SECONDS of the first call.
    assert duration < STORM_SECONDS, duration
    bound = math.ceil(STORM_SECONDS / REJECTION_COOLDOWN)
    assert 1 <= len(refreshes) <= bound == 2, [c.outcome for c in refreshes]
    assert all(c.outcome == "issued" for c in refreshes)
    assert len(provider.calls()) == 1 + len(refreshes)  # the code exchange, and those
    # Consecutive rejection refreshes are more than the cooldown apart, as seen at the provider.
    gaps = [b.at - a.at for a, b in itertools.pairwise(refreshes)]
    assert all(gap > REJECTION_COOLDOWN for gap in gaps), gaps
    # Each call went upstream once, and at most once more: the one retry after a refresh (its
    # own, or one it waited for, or a token another process had just stored).
    assert calls <= api_calls <= 2 * calls
    token = row(datasource)
    assert token.status == TokenStatus.ACTIVE and token.access_token == issued(refreshes[-1])
    text = log_path.read_text()
    assert not re.search(r"Traceback|ERROR", text), text[-3000:]
