"""Token lifecycle against django-oauth-toolkit: client credentials, rotation, single flight,
failure classification, and the Python client API."""

import logging
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
import requests
from django.db import connection
from django.utils import timezone
from oauth2_provider.models import AccessToken, RefreshToken

from datasources import tokens
from datasources.authserver import oauth
from datasources.exceptions import NotAuthorized, ReauthorizationRequired, TransientUpstreamError
from datasources.models import Token, TokenEvent, TokenStatus
from datasources.signals import reauthorization_required, token_refresh_failed

from .conftest import SECRET, captured, make_datasource
from .helpers import ROOT, subprocess_env

pytestmark = pytest.mark.django_db(transaction=True)


def expire(datasource) -> None:
    Token.objects.filter(datasource=datasource).update(
        expires_at=timezone.now() - timedelta(seconds=5)
    )


def call_upstream(base: str, access_token: str) -> requests.Response:
    return requests.get(
        f"{base}/upstream/me", headers={"Authorization": f"Bearer {access_token}"}, timeout=10
    )


@pytest.mark.parametrize("method", ["basic", "body"])
def test_client_credentials_works_from_the_moment_it_is_saved(auth_server, method):
    auth_server.app("machine", grant="client-credentials")
    datasource = make_datasource(
        auth_server,
        grant_type="client_credentials",
        authorization_url="",
        client_id="machine",
        client_authentication=method,
        scopes="read",
    )
    access = datasource.get_access_token()
    token = Token.objects.get(datasource=datasource)
    assert token.status == TokenStatus.ACTIVE
    assert token.refresh_token is None
    assert token.scope == "read"
    assert call_upstream(auth_server.base, access).json()["application"] == "machine"
    # Renewal is a new grant.
    expire(datasource)
    renewed = datasource.get_access_token()
    assert renewed != access
    assert Token.objects.get(datasource=datasource).refresh_count == 2


def test_refresh_rotates_and_never_reuses_an_old_refresh_token(auth_server, authorize):
    auth_server.app("client-basic")
    datasource = make_datasource(auth_server)
    first = authorize(datasource)
    for round_ in range(1, 4):
        expire(datasource)
        before = Token.objects.get(datasource=datasource)
        access = datasource.get_access_token()
        after = Token.objects.get(datasource=datasource)
        assert access != before.access_token
        assert after.refresh_token != before.refresh_token  # rotated and persisted
        assert after.refresh_count == round_
        assert call_upstream(auth_server.base, access).status_code == 200
    # DOT revokes each used refresh token; reuse protection would have revoked the whole family
    # (and the last refresh would have failed) had we ever sent an old one again.
    assert RefreshToken.objects.filter(revoked__isnull=True).count() == 1
    live = RefreshToken.objects.get(revoked__isnull=True)
    assert live.token == Token.objects.get(datasource=datasource).refresh_token
    assert first.refresh_token != live.token


def test_kept_refresh_token_when_none_is_returned(auth_server, authorize, settings):
    settings.OAUTH2_PROVIDER = {**settings.OAUTH2_PROVIDER, "ROTATE_REFRESH_TOKEN": False}
    from oauth2_provider.settings import oauth2_settings

    oauth2_settings.reload()
    try:
        auth_server.app("client-basic")
        datasource = make_datasource(auth_server)
        first = authorize(datasource)
        expire(datasource)
        datasource.get_access_token()
        assert Token.objects.get(datasource=datasource).refresh_token == first.refresh_token
    finally:
        oauth2_settings.reload()


def test_fresh_token_is_not_refreshed(auth_server, authorize):
    auth_server.app("client-basic")
    datasource = make_datasource(auth_server)
    token = authorize(datasource)
    assert datasource.get_access_token() == token.access_token
    assert Token.objects.get(datasource=datasource).refresh_count == 0


def test_not_authorized_raises(auth_server):
    datasource = make_datasource(auth_server)
    with pytest.raises(NotAuthorized):
        datasource.get_access_token()


def _count_token_requests(monkeypatch) -> list:
    calls = []
    original = oauth._post

    def counting(url, *args, **kwargs):
        calls.append(url)
        return original(url, *args, **kwargs)

    monkeypatch.setattr(oauth, "_post", counting)
    return calls


def test_single_flight_across_threads(auth_server, authorize, monkeypatch):
    auth_server.app("client-basic")
    datasource = make_datasource(auth_server)
    authorize(datasource)
    expire(datasource)
    calls = _count_token_requests(monkeypatch)
    barrier = threading.Barrier(8)
    results, errors = [], []

    def worker():
        try:
            barrier.wait()
            results.append(tokens.get_access_token(datasource))
        except Exception as err:
            errors.append(err)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert len(results) == 8 and len(set(results)) == 1
    assert len(calls) == 1
    assert Token.objects.get(datasource=datasource).refresh_count == 1
    assert call_upstream(auth_server.base, results[0]).status_code == 200


def test_single_flight_across_processes(auth_server, authorize):
    auth_server.app("client-basic")
    datasource = make_datasource(auth_server)
    authorize(datasource)
    expire(datasource)
    refresh_tokens_before = RefreshToken.objects.count()
    start_at = time.time() + 3.0
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "tests" / "proc_refresh.py"),
                datasource.slug,
                str(start_at),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=subprocess_env(),
            cwd=ROOT,
        )
        for _ in range(4)
    ]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    for proc, (_out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-2000:]
    printed = {out.strip() for out, _ in outputs}
    assert len(printed) == 1
    assert RefreshToken.objects.count() == refresh_tokens_before + 1  # exactly one refresh
    assert Token.objects.get(datasource=datasource).refresh_count == 1


def test_crashed_lease_holder_is_taken_over(auth_server, authorize):
    auth_server.app("client-basic")
    datasource = make_datasource(auth_server)
    authorize(datasource)
    expire(datasource)
    Token.objects.filter(datasource=datasource).update(
        lease_id="dead-process", lease_expires_at=timezone.now() - timedelta(seconds=1)
    )
    assert datasource.get_access_token()
    token = Token.objects.get(datasource=datasource)
    assert token.refresh_count == 1 and token.lease_id == ""


def test_refresh_ahead_within_margin(auth_server, authorize):
    auth_server.app("client-basic")
    datasource = make_datasource(auth_server)
    authorize(datasource)
    Token.objects.filter(datasource=datasource).update(
        expires_at=timezone.now() + timedelta(seconds=120),
        last_refreshed_at=timezone.now() - timedelta(hours=1),
    )
    assert tokens.refresh_token(datasource).outcome == "refreshed"  # margin 300s
    assert tokens.refresh_token(datasource).outcome == "fresh"


# --- failure shapes (HTTP faked only for what a real server won't do on demand) -------------


def authorized_fake(**fields):
    datasource = make_datasource(**fields)
    Token.objects.filter(datasource=datasource).update(
        access_token="old-access-token-value",
        refresh_token="old-refresh-token-value",
        status="active",
        expires_at=timezone.now() - timedelta(seconds=1),
        last_refreshed_at=timezone.now() - timedelta(hours=1),
    )
    return datasource


TRANSIENT_SHAPES = {
    "timeout": requests.ConnectTimeout("connect timed out"),
    "connection": requests.ConnectionError("refused"),
    "503-html": (
        503,
        "<html><body>Service Unavailable</body></html>",
        {"Content-Type": "text/html"},
    ),
    "truncated-json": (
        200,
        '{"access_token": "abc", "token_ty',
        {"Content-Type": "application/json"},
    ),
    "html-200": (200, "<html>login</html>", {"Content-Type": "text/html"}),
    "no-access-token": (200, '{"token_type": "Bearer"}', {"Content-Type": "application/json"}),
    "429": (429, "slow down", {"Retry-After": "120"}),
    "temporarily_unavailable-400": (
        400,
        '{"error": "temporarily_unavailable"}',
        {"Content-Type": "application/json"},
    ),
    "server_error-400": (400, '{"error": "server_error"}', {"Content-Type": "application/json"}),
    "unknown-code-400": (400, '{"error": "try_later_maybe"}', {"Content-Type": "application/json"}),
    "read-timeout": requests.ReadTimeout("read timed out"),
}

#: Failures after which the server may have acted on the request (sent, answer lost).
ANSWER_LOST = {"connection", "read-timeout"}


@pytest.mark.parametrize("shape", TRANSIENT_SHAPES)
def test_transient_failures_keep_the_token_and_back_off(fake_token_endpoint, caplog, shape):
    caplog.set_level(logging.DEBUG)
    datasource = authorized_fake()
    # A request whose answer may have been lost is sent again at once (same refresh token).
    sends = 2 if shape in ANSWER_LOST else 1
    fake_token_endpoint.queue(*[TRANSIENT_SHAPES[shape]] * sends)
    with captured(token_refresh_failed) as failures:
        result = tokens.refresh_token(datasource)
    assert result.outcome == "transient"
    token = Token.objects.get(datasource=datasource)
    assert token.status == TokenStatus.ACTIVE
    assert token.access_token == "old-access-token-value"
    assert token.refresh_token == "old-refresh-token-value"
    assert token.failure_count == 1 and token.last_error
    delay = (token.next_attempt_at - timezone.now()).total_seconds()
    assert delay >= (119 if shape == "429" else 20)
    assert failures and failures[0]["transient"] is True
    assert TokenEvent.objects.filter(kind="refresh_failed").count() == 1
    # During the backoff the request path does not call the server again.
    with pytest.raises(TransientUpstreamError):
        datasource.get_access_token()
    assert len(fake_token_endpoint.calls) == sends
    assert_no_secrets(caplog, token.last_error)


@pytest.mark.parametrize(
    "error",
    [
        "invalid_grant",
        "invalid_client",
        "unauthorized_client",
        # OpenID Connect: only a person can help (Entra asking for MFA or consent again)
        "interaction_required",
        "login_required",
        "consent_required",
        "account_selection_required",
    ],
)
def test_permanent_failures_need_reauthorization(fake_token_endpoint, caplog, error):
    caplog.set_level(logging.DEBUG)
    datasource = authorized_fake()
    fake_token_endpoint.queue(
        (
            400,
            f'{{"error": "{error}", "error_description": "bad old-refresh-token-value"}}',
            {"Content-Type": "application/json"},
        )
    )
    with captured(reauthorization_required) as signalled:
        result = tokens.refresh_token(datasource)
    assert result.outcome == "reauthorization"
    token = Token.objects.get(datasource=datasource)
    assert token.status == TokenStatus.NEEDS_REAUTHORIZATION
    assert error in token.last_error
    assert "old-refresh-token-value" not in token.last_error  # echoed secret redacted
    assert signalled
    assert TokenEvent.objects.filter(kind="reauthorization_required").exists()
    with pytest.raises(ReauthorizationRequired):
        datasource.get_access_token()
    assert len(fake_token_endpoint.calls) == 1  # not retried
    assert_no_secrets(caplog, token.last_error)


@pytest.mark.parametrize("error", ["invalid_scope", "invalid_request", "unsupported_grant_type"])
def test_configuration_errors_keep_the_token_and_say_so(fake_token_endpoint, error):
    datasource = authorized_fake()
    fake_token_endpoint.queue(
        (400, f'{{"error": "{error}"}}', {"Content-Type": "application/json"})
    )
    with captured(reauthorization_required) as signalled:
        result = tokens.refresh_token(datasource)
    assert result.outcome == "configuration"
    token = Token.objects.get(datasource=datasource)
    assert token.status == TokenStatus.ACTIVE
    assert token.failure_kind == "configuration"
    assert token.last_error.startswith("Configuration error: " + error)
    assert token.refresh_token == "old-refresh-token-value"
    assert token.next_attempt_at > timezone.now()  # retried with backoff
    assert not signalled  # nobody is told the grant is dead


def test_an_error_inside_a_200_answer_is_classified(fake_token_endpoint):
    """Slack and GitHub answer errors with HTTP 200."""
    datasource = authorized_fake()
    fake_token_endpoint.queue(
        (
            200,
            '{"ok": false, "error": "invalid_refresh_token"}',
            {"Content-Type": "application/json"},
        )
    )
    assert tokens.refresh_token(datasource).outcome == "reauthorization"
    token = Token.objects.get(datasource=datasource)
    assert token.status == TokenStatus.NEEDS_REAUTHORIZATION


def test_rotation_race_uses_the_other_holders_result(fake_token_endpoint, monkeypatch):
    """invalid_grant because someone else already used (and rotated) the refresh token: their
    result is used and the grant is not declared dead."""
    datasource = authorized_fake()
    original = fake_token_endpoint.send

    def rotated_meanwhile(request, **kwargs):
        Token.objects.filter(datasource=datasource).update(
            access_token="their-access-token",
            refresh_token="their-refresh-token",
            expires_at=timezone.now() + timedelta(hours=1),
            last_refreshed_at=timezone.now(),
        )
        return original(request, **kwargs)

    monkeypatch.setattr(fake_token_endpoint, "send", rotated_meanwhile)
    fake_token_endpoint.queue(
        (400, '{"error": "invalid_grant"}', {"Content-Type": "application/json"})
    )
    assert datasource.get_access_token() == "their-access-token"
    token = Token.objects.get(datasource=datasource)
    assert token.status == TokenStatus.ACTIVE
    assert token.refresh_token == "their-refresh-token"
    assert token.lease_id == ""
    assert not TokenEvent.objects.filter(kind="reauthorization_required").exists()


def test_invalid_grant_after_a_lost_answer_explains_it(fake_token_endpoint):
    """The refresh timed out after it was sent, and so did the repeat sent at once; the
    provider rotated in an answer we never got, so the next refresh is invalid_grant. The
    builder is told why."""
    datasource = authorized_fake()
    fake_token_endpoint.queue(requests.ReadTimeout("read timed out"), requests.ConnectionError())
    assert tokens.refresh_token(datasource).outcome == "transient"
    first, again = fake_token_endpoint.calls
    assert first.body == again.body  # the same refresh token, sent again at once
    token = Token.objects.get(datasource=datasource)
    assert token.outcome_unknown_at is not None  # the repeat failed otherwise: still unknown
    assert "may have acted on it" in token.last_error or "failed" in token.last_error
    Token.objects.filter(pk=token.pk).update(next_attempt_at=timezone.now())
    fake_token_endpoint.queue(
        (400, '{"error": "invalid_grant"}', {"Content-Type": "application/json"})
    )
    assert tokens.refresh_token(datasource).outcome == "reauthorization"
    lost = TokenEvent.objects.get(kind="lost_response")
    assert "rotated the refresh token in that lost answer" in lost.detail
    token.refresh_from_db()
    assert token.status == TokenStatus.NEEDS_REAUTHORIZATION
    assert "lost answer" in token.last_error


def test_a_connect_timeout_is_not_a_lost_answer(fake_token_endpoint):
    datasource = authorized_fake()
    fake_token_endpoint.queue(requests.ConnectTimeout("connect timed out"))
    tokens.refresh_token(datasource)
    assert Token.objects.get(datasource=datasource).outcome_unknown_at is None


def test_a_valid_token_never_waits_for_another_holder(fake_token_endpoint, monkeypatch):
    """Within the leeway but not expired, with another process holding the lease: the caller
    gets the current token at once (no sleeping, no token-endpoint call)."""
    from datasources.tokens import service

    datasource = authorized_fake()
    Token.objects.filter(datasource=datasource).update(
        expires_at=timezone.now() + timedelta(seconds=20),
        lease_id="someone-else",
        lease_expires_at=timezone.now() + timedelta(seconds=60),
    )

    def no_waiting(seconds):
        raise AssertionError("a caller with a valid token waited")

    monkeypatch.setattr(service.time, "sleep", no_waiting)
    assert datasource.get_access_token() == "old-access-token-value"
    assert fake_token_endpoint.calls == []


def test_request_path_probes_every_few_seconds_while_expired(fake_token_endpoint):
    """After many failures the background backs off for an hour, but the request path tries
    again once PROBE_INTERVAL has passed, so service returns within seconds of the provider."""
    datasource = authorized_fake()
    Token.objects.filter(datasource=datasource).update(
        failure_count=20,
        failure_kind="transient",
        last_error="The authorization server answered HTTP 503.",
        next_attempt_at=timezone.now() + timedelta(hours=1),
        last_attempt_at=timezone.now() - timedelta(seconds=1),
    )
    with pytest.raises(TransientUpstreamError) as raised:
        datasource.get_access_token()
    assert 3 <= raised.value.retry_after <= 5
    assert fake_token_endpoint.calls == []  # no probe within the interval
    Token.objects.filter(datasource=datasource).update(
        last_attempt_at=timezone.now() - timedelta(seconds=6)
    )
    fake_token_endpoint.queue(
        (200, '{"access_token": "back", "expires_in": 3600}', {"Content-Type": "application/json"})
    )
    assert datasource.get_access_token() == "back"
    token = Token.objects.get(datasource=datasource)
    assert (token.failure_count, token.failure_kind, token.next_attempt_at) == (0, "", None)


def test_retry_after_holds_back_the_probe(fake_token_endpoint):
    datasource = authorized_fake()
    fake_token_endpoint.queue((429, "slow down", {"Retry-After": "60"}))
    with pytest.raises(TransientUpstreamError):
        datasource.get_access_token()
    Token.objects.filter(datasource=datasource).update(
        last_attempt_at=timezone.now() - timedelta(seconds=30)
    )
    with pytest.raises(TransientUpstreamError) as raised:
        datasource.get_access_token()
    assert raised.value.retry_after > 50
    assert len(fake_token_endpoint.calls) == 1


def test_an_assumed_expiry_never_makes_a_token_unusable(fake_token_endpoint):
    """No expires_in: the token is refreshed at the assumed time, and if that fails it is still
    used (it was never known to expire)."""
    datasource = authorized_fake()
    fake_token_endpoint.queue(
        (200, '{"access_token": "no-expiry-given"}', {"Content-Type": "application/json"})
    )
    assert datasource.get_access_token() == "no-expiry-given"
    token = Token.objects.get(datasource=datasource)
    assert token.expiry_known is False
    assert token.refresh_token == "old-refresh-token-value"
    Token.objects.filter(pk=token.pk).update(
        expires_at=timezone.now() - timedelta(seconds=1),
        last_refreshed_at=timezone.now() - timedelta(hours=1),
    )
    fake_token_endpoint.queue((503, "down", {}))
    assert datasource.get_access_token() == "no-expiry-given"
    assert len(fake_token_endpoint.calls) == 2


def test_reauthorization_without_a_refresh_token_keeps_the_stored_one():
    from datasources.authserver.oauth import TokenResponse

    datasource = authorized_fake()
    token = tokens.store_authorization(
        datasource, TokenResponse(access_token="reconsented", expires_in=3599)
    )
    assert token.access_token == "reconsented"
    assert token.refresh_token == "old-refresh-token-value"
    assert "stored one is kept" in TokenEvent.objects.get(kind="authorized").detail
    # Not when the client changed, nor when the stored one is known to be dead.
    Token.objects.filter(pk=token.pk).update(client_id="another-client")
    token = tokens.store_authorization(datasource, TokenResponse(access_token="other-client"))
    assert token.refresh_token is None
    assert token.expires_at is None  # no refresh token and no expiry: used until rejected


def test_huge_and_odd_expires_in_never_break_a_refresh(fake_token_endpoint):
    datasource = authorized_fake()
    for value, known in (("1000000000000", True), ("0", False), ("-30", False), ('"3600"', True)):
        Token.objects.filter(datasource=datasource).update(
            expires_at=timezone.now() - timedelta(seconds=1)
        )
        body = f'{{"access_token": "t{len(fake_token_endpoint.calls)}", "expires_in": {value}}}'
        fake_token_endpoint.queue((200, body, {"Content-Type": "application/json"}))
        assert tokens.refresh_token(datasource).outcome == "refreshed"
        assert Token.objects.get(datasource=datasource).expiry_known is known


def test_backoff_grows_and_recovers(fake_token_endpoint):
    datasource = authorized_fake()
    ok = (
        200,
        '{"access_token": "new-access", "token_type": "Bearer", "expires_in": 60}',
        {"Content-Type": "application/json"},
    )
    fake_token_endpoint.queue((502, "bad gateway", {}), (502, "bad gateway", {}), ok)
    tokens.refresh_token(datasource)
    first = Token.objects.get(datasource=datasource)
    Token.objects.filter(pk=first.pk).update(next_attempt_at=timezone.now())
    tokens.refresh_token(datasource)
    second = Token.objects.get(datasource=datasource)
    assert second.failure_count == 2
    Token.objects.filter(pk=first.pk).update(next_attempt_at=timezone.now())
    assert tokens.refresh_token(datasource).outcome == "refreshed"
    final = Token.objects.get(datasource=datasource)
    assert (final.failure_count, final.next_attempt_at, final.last_error) == (0, None, "")
    assert final.access_token == "new-access"
    assert final.refresh_token == "old-refresh-token-value"  # none sent: kept


def test_refresh_sends_client_credentials_as_configured(fake_token_endpoint):
    ok = (
        200,
        '{"access_token": "n", "token_type": "Bearer"}',
        {"Content-Type": "application/json"},
    )
    basic = authorized_fake(slug="basic", client_authentication="basic")
    body = authorized_fake(slug="body", client_authentication="body")
    fake_token_endpoint.queue(ok, ok)
    tokens.refresh_token(basic)
    tokens.refresh_token(body)
    basic_req, body_req = fake_token_endpoint.calls
    assert basic_req.headers["Authorization"].startswith("Basic ")
    assert "client_secret" not in basic_req.body
    assert "Authorization" not in body_req.headers
    assert "client_secret=" in body_req.body and "client_id=client-basic" in body_req.body
    assert "grant_type=refresh_token" in body_req.body


def test_no_expires_in_uses_the_datasource_lifetime(fake_token_endpoint):
    datasource = authorized_fake(token_lifetime=600)
    fake_token_endpoint.queue(
        (200, '{"access_token": "n", "token_type": "Bearer"}', {"Content-Type": "application/json"})
    )
    tokens.refresh_token(datasource)
    token = Token.objects.get(datasource=datasource)
    assert 590 < (token.expires_at - timezone.now()).total_seconds() <= 600


def test_changed_scope_is_accepted_and_recorded(fake_token_endpoint):
    datasource = authorized_fake()
    fake_token_endpoint.queue(
        (
            200,
            '{"access_token": "n", "token_type": "Bearer", "scope": "read"}',
            {"Content-Type": "application/json"},
        )
    )
    assert tokens.refresh_token(datasource).outcome == "refreshed"
    assert Token.objects.get(datasource=datasource).scope == "read"


def assert_no_secrets(caplog, *also):
    text = "\n".join(record.getMessage() for record in caplog.records) + "\n".join(also)
    for secret in (SECRET, "old-access-token-value", "old-refresh-token-value"):
        assert secret not in text


# --- Python client API ----------------------------------------------------------------------


def test_session_places_token_in_header(auth_server, authorize):
    auth_server.app("client-basic")
    datasource = make_datasource(auth_server)
    authorize(datasource)
    with datasource.session() as api:
        echoed = api.post("things/1", params={"q": "x"}, json={"a": 1}).json()
    assert echoed["path"] == "things/1"
    assert echoed["query"] == {"q": "x"}
    assert echoed["headers"]["Authorization"].startswith("Bearer ")
    assert not echoed["token_in_query"]


def test_session_places_token_in_query(auth_server, authorize):
    auth_server.app("client-basic")
    datasource = make_datasource(auth_server, token_placement="query")
    authorize(datasource)
    echoed = datasource.session().get("things", params={"q": "y"}).json()
    assert echoed["token_in_query"] is True
    assert "Authorization" not in echoed["headers"]
    assert echoed["query"] == {"q": "y"}


def test_session_refreshes_once_on_401_and_retries(auth_server, authorize):
    auth_server.app("client-basic")
    datasource = make_datasource(auth_server)
    authorize(datasource)
    # Expired at the provider early (e.g. revoked right after it was issued); we still think
    # it is valid: refreshed once, retried once.
    AccessToken.objects.update(expires=timezone.now() - timedelta(seconds=1))
    response = datasource.session().get("me")
    assert response.status_code == 200
    assert Token.objects.get(datasource=datasource).refresh_count == 1
    # Revoked again at once: a rejection already caused a refresh within REJECTION_COOLDOWN,
    # so the 401 is handed back (an API that always answers 401 must not cause a refresh per
    # call).
    AccessToken.objects.update(expires=timezone.now() - timedelta(seconds=1))
    assert datasource.session().get("me").status_code == 401
    assert Token.objects.get(datasource=datasource).refresh_count == 1
    # Once the cooldown has passed: refreshed once more, retried once.
    Token.objects.filter(datasource=datasource).update(
        rejection_refreshed_at=timezone.now() - timedelta(minutes=5)
    )
    response = datasource.session().get("me")
    assert response.status_code == 200
    assert Token.objects.get(datasource=datasource).refresh_count == 2


def test_session_refuses_urls_outside_base(auth_server, authorize):
    from datasources.client import OutsideBaseUrl

    auth_server.app("client-basic")
    datasource = make_datasource(auth_server)
    authorize(datasource)
    api = datasource.session()
    for bad in ("../o/token/", "https://evil.example.com/x", "a/%2e%2e/%2e%2e/o/"):
        with pytest.raises(OutsideBaseUrl):
            api.get(bad)


def test_error_reports_hide_secrets_in_local_variables(monkeypatch):
    """Django's error reports (DEBUG pages, admin emails) show frame locals unless hidden."""
    from django.views.debug import ExceptionReporter

    datasource = authorized_fake()

    def explode(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(oauth, "_post", explode)
    try:
        tokens.refresh_token(datasource)
    except RuntimeError:
        report = ExceptionReporter(None, *sys.exc_info()).get_traceback_text()
    else:
        raise AssertionError("expected the error to propagate")
    assert "_token_request" in report  # the frames are there...
    for secret in (SECRET, "old-access-token-value", "old-refresh-token-value"):
        assert secret not in report  # ...their secret locals are not
