"""Provider quirks: each fake provider (``tests/fakeprovider.py``) shaped like a documented real
one, driven the way a builder drives it (admin Authorize button, the provider's redirect, the
callback, then the proxy), with outcomes asserted at the provider (token-endpoint calls, what
the API received) and in the database (status, refresh token kept or rotated, expiry).

Covers the token lifecycle rules of issue 11: error classes at the token endpoint (§2), odd
``expires_in`` and missing expiry (§4), re-authorization without a refresh token (§5) and
bounded 401 storms (§7). Outage and recovery, rotation races and killed lease holders are in
``test_recovery.py``.
"""

from __future__ import annotations

import re
import threading
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.messages import constants as message_levels
from django.contrib.messages import get_messages
from django.db import connection
from django.test import Client
from django.utils import timezone

from datasources import tokens
from datasources.models import Token, TokenEvent, TokenStatus

from . import fakeprovider
from .conftest import SECRET
from .fakeprovider import (
    Failure,
    FakeProvider,
    api_key_client,
    assert_token_unavailable,
    authorize_through_admin,
    body_json,
    connect,
    oauth_error,
    provider_datasource,
    proxy_url,
    wait_until,
)

pytestmark = pytest.mark.django_db(transaction=True)

fake_provider = fakeprovider.fake_provider  # the fixture: starts and stops fake providers


# --- helpers ---------------------------------------------------------------------------------


def row(datasource) -> Token:
    return Token.objects.get(datasource=datasource, user=None)


def expire_here(datasource) -> None:
    """Our stored expiry has passed (the provider may still accept the token)."""
    Token.objects.filter(datasource=datasource).update(
        expires_at=timezone.now() - timedelta(seconds=5)
    )


def age(datasource, seconds: float) -> None:
    """Time travel: the token was obtained and last refreshed ``seconds`` ago."""
    then = timezone.now() - timedelta(seconds=seconds)
    Token.objects.filter(datasource=datasource).update(
        last_refreshed_at=then, obtained_at=then, rejection_refreshed_at=then
    )


def tune(settings, **values: Any) -> None:
    settings.DATASOURCES = {**settings.DATASOURCES, **values}


def seconds_left(token: Token) -> float:
    assert token.expires_at is not None
    return (token.expires_at - timezone.now()).total_seconds()


def assert_api_got(provider: FakeProvider, access_token: str | None) -> None:
    """The last API call carried ``access_token`` and the provider accepted it."""
    last = provider.api()[-1]
    assert last.token == access_token
    assert last.status == 200


def messages_of(response) -> list:
    return list(get_messages(response.wsgi_request))


# --- every provider, the whole journey -------------------------------------------------------

#: What each provider's first answer means for the stored expiry: seconds, or None (unknown).
JOURNEYS: dict[str, dict[str, Any]] = {
    "rfc": {"lifetime": 3600},
    "google": {"lifetime": 3599},
    "microsoft": {"lifetime": 3599},  # expires_in "3599", a string
    "dropbox": {"lifetime": 14400},
    "zoho": {"lifetime": 3600},
    "strava": {"lifetime": 21600},  # expires_at + expires_in
    "intuit": {"lifetime": 3600},
    "xero": {"lifetime": 1800},  # JWT access token with exp, and expires_in
    "slack": {
        "lifetime": 43200,
        "fields": {"scope_separator": ","},
        "scopes": "chat:write,users:read",
    },
    # No expires_in: the builder sets the org's session timeout as the lifetime (preset notes).
    "salesforce": {"lifetime": None, "fields": {"token_lifetime": 7200}},
}


@pytest.mark.parametrize("name", JOURNEYS)
def test_provider_journey_authorize_call_refresh(fake_provider, staff_client, name):
    """Authorize, call, refresh on expiry and on the API's rejection: at each step the refresh
    token we hold is the one the provider considers alive, and the API sees our token."""
    spec = JOURNEYS[name]
    provider = fake_provider(name)
    profile = provider.profile
    datasource = connect(
        provider, staff_client, scopes=spec.get("scopes", "read write"), **spec.get("fields", {})
    )
    client = api_key_client()

    token = row(datasource)
    exchange = provider.calls("authorization_code")
    assert len(exchange) == 1 and exchange[0].outcome == "issued"
    assert token.status == TokenStatus.ACTIVE
    assert token.access_token == exchange[0].answer["access_token"]
    assert token.refresh_token == exchange[0].answer["refresh_token"]
    if spec["lifetime"] is None:
        assert token.expiry_known is False
        assert abs(seconds_left(token) - 7200) < 10  # the datasource's lifetime, assumed
    else:
        assert token.expiry_known is True
        assert abs(seconds_left(token) - spec["lifetime"]) < 10

    response = client.get(proxy_url(datasource, "me"))
    assert response.status_code == 200, body_json(response)
    assert_api_got(provider, token.access_token)

    legs = ["expired-here", "rejected"] if spec["lifetime"] is not None else ["rejected"]
    if profile.api_reject_status == 200:
        # Slack's Web API answers HTTP 200 {"ok": false} to a dead token: no status to react
        # to, so only our own expiry can trigger the refresh.
        legs = ["expired-here", "expired-here"]
    for leg, how in enumerate(legs, start=1):
        before = row(datasource)
        provider.expire_access_tokens()
        if how == "expired-here":
            expire_here(datasource)
        else:
            age(datasource, 3600)  # older than REJECTION_COOLDOWN: the 401 may refresh
        response = client.get(proxy_url(datasource, f"leg/{leg}"))
        assert response.status_code == 200, (how, body_json(response))

        refreshes = provider.refresh_calls()
        assert len(refreshes) == leg, [c.outcome for c in refreshes]
        assert refreshes[-1].outcome == "issued"
        assert refreshes[-1].refresh_token_sent == before.refresh_token
        after = row(datasource)
        answer = refreshes[-1].answer
        assert after.access_token == answer["access_token"] != before.access_token
        if profile.rotation in ("rotate", "strict"):
            assert after.refresh_token == answer["refresh_token"] != before.refresh_token
        else:
            assert "refresh_token" not in answer
            assert after.refresh_token == before.refresh_token  # kept
        assert provider.is_live_refresh_token(after.refresh_token)
        if profile.rotation == "strict":
            assert not provider.is_live_refresh_token(before.refresh_token)
        assert after.status == TokenStatus.ACTIVE and after.failure_count == 0
        assert_api_got(provider, after.access_token)
    assert all(c.outcome == "issued" for c in provider.calls())  # never sent a dead token


def test_client_credentials_grant_at_the_fake_provider(fake_provider):
    provider = fake_provider("dropbox")
    datasource = provider_datasource(
        provider, grant_type="client_credentials", authorization_url="", scopes="files.read"
    )
    client = api_key_client()
    assert client.get(proxy_url(datasource)).status_code == 200
    assert len(provider.calls("client_credentials")) == 1
    first = row(datasource).access_token
    assert_api_got(provider, first)
    provider.expire_access_tokens()
    expire_here(datasource)
    assert client.get(proxy_url(datasource)).status_code == 200
    assert len(provider.calls("client_credentials")) == 2
    assert row(datasource).access_token != first
    assert_api_got(provider, row(datasource).access_token)


# --- GitHub ----------------------------------------------------------------------------------


def test_github_token_without_expiry_lives_until_the_api_rejects_it(
    fake_provider, staff_client, settings
):
    """§4: no refresh token and no known expiry (GitHub OAuth apps): never declared dead by
    time alone; dead once the upstream rejects it."""
    provider = fake_provider("github")
    datasource = connect(provider, staff_client, client_authentication="body", scopes="repo gist")
    client = api_key_client()
    exchange = provider.calls("authorization_code")[0]
    assert "application/json" in exchange.headers.get("Accept", "")  # so GitHub answers JSON
    token = row(datasource)
    assert token.status == TokenStatus.ACTIVE
    assert token.refresh_token is None
    assert token.expiry_known is False
    assert token.token_type.lower() == "bearer"

    # Days later, far past any assumed lifetime, the token still works at GitHub.
    age(datasource, 3 * 86400)
    if token.expires_at is not None:
        expire_here(datasource)
    response = client.get(proxy_url(datasource, "user"))
    assert response.status_code == 200, body_json(response)
    assert_api_got(provider, token.access_token)
    tokens.refresh_token(datasource)  # the background has nothing to say either
    assert row(datasource).status == TokenStatus.ACTIVE
    assert len(provider.calls()) == 1  # the code exchange, nothing since

    # The owner revokes the app at GitHub: the API rejects the token; only a person can help.
    provider.revoke_access_tokens()
    rejected = client.get(proxy_url(datasource, "user"))
    assert rejected.status_code in (401, 409), body_json(rejected)
    assert row(datasource).status == TokenStatus.NEEDS_REAUTHORIZATION
    again = client.get(proxy_url(datasource, "user"))
    assert again.status_code == 409
    assert body_json(again)["error"] == "reauthorization_required"
    assert len(provider.calls()) == 1  # no token endpoint to ask


def test_github_error_with_http_200_fails_the_callback_and_changes_nothing(
    fake_provider, staff_client
):
    provider = fake_provider("github")
    datasource = provider_datasource(provider, client_authentication="body")
    provider.fail(
        oauth_error(
            "bad_verification_code",
            status=200,
            description="The code passed is incorrect or expired.",
        ),
        times=1,
    )
    response = authorize_through_admin(staff_client, datasource)
    assert response.status_code == 302  # back to the admin page, with the error shown
    text = " ".join(str(m) for m in messages_of(response))
    assert "bad_verification_code" in text
    token = row(datasource)
    assert token.status == TokenStatus.NOT_AUTHORIZED
    assert token.access_token is None


@pytest.mark.parametrize("expires_in", ["str", "absent"])
def test_form_encoded_token_answers(fake_provider, staff_client, expires_in):
    """GitHub (and older providers) answer form-encoded when Accept is not honoured."""
    provider = fake_provider("rfc", form_always=True, expires_in=expires_in)
    datasource = connect(provider, staff_client, token_lifetime=900)
    assert provider.calls()[0].outcome == "issued"
    token = row(datasource)
    assert token.status == TokenStatus.ACTIVE
    assert token.access_token == provider.calls()[0].answer["access_token"]
    assert token.refresh_token == provider.calls()[0].answer["refresh_token"]
    assert token.expiry_known is (expires_in == "str")
    assert abs(seconds_left(token) - (3600 if expires_in == "str" else 900)) < 10
    client = api_key_client()
    provider.expire_access_tokens()
    expire_here(datasource)
    assert client.get(proxy_url(datasource)).status_code == 200
    assert row(datasource).refresh_token == provider.refresh_calls()[0].answer["refresh_token"]


# --- §2: what a token-endpoint error means ---------------------------------------------------

DEAD = "dead"
CONFIGURATION = "configuration"
TRANSIENT = "transient"

#: name -> (failure, what it means, the error code our record must name or "").
ERROR_SHAPES: dict[str, tuple[Failure | str, str, str]] = {
    "invalid_grant@400": (
        oauth_error("invalid_grant", description="Token is revoked"),
        DEAD,
        "invalid_grant",
    ),
    "invalid_grant@200": (oauth_error("invalid_grant", status=200), DEAD, "invalid_grant"),
    "invalid_client@401": (oauth_error("invalid_client", status=401), DEAD, "invalid_client"),
    "invalid_client@200": (oauth_error("invalid_client", status=200), DEAD, "invalid_client"),
    "unauthorized_client@400": (oauth_error("unauthorized_client"), DEAD, "unauthorized_client"),
    "bare-401": ("bare-401", DEAD, ""),
    "invalid_scope@400": (
        oauth_error("invalid_scope", description="scope not allowed"),
        CONFIGURATION,
        "invalid_scope",
    ),
    "invalid_scope@200": (oauth_error("invalid_scope", status=200), CONFIGURATION, "invalid_scope"),
    "invalid_request@400": (oauth_error("invalid_request"), CONFIGURATION, "invalid_request"),
    "unsupported_grant_type@400": (
        oauth_error("unsupported_grant_type"),
        CONFIGURATION,
        "unsupported_grant_type",
    ),
    "temporarily_unavailable@400": (
        oauth_error("temporarily_unavailable"),
        TRANSIENT,
        "temporarily_unavailable",
    ),
    "temporarily_unavailable@200": (
        oauth_error("temporarily_unavailable", status=200),
        TRANSIENT,
        "temporarily_unavailable",
    ),
    "server_error@400": (oauth_error("server_error"), TRANSIENT, "server_error"),
    "server_error@200-slack": (
        oauth_error("server_error", status=200, shape="slack"),
        TRANSIENT,
        "server_error",
    ),
    "unknown_code@400": (
        oauth_error("quota_wobble", description="try later"),
        TRANSIENT,
        "quota_wobble",
    ),
    "unknown_code@200-slack": (
        oauth_error("ratelimited", status=200, shape="slack"),
        TRANSIENT,
        "ratelimited",
    ),
    "503-html": ("503-html", TRANSIENT, ""),
    "500-json": ("500-json", TRANSIENT, ""),
    "502": ("502", TRANSIENT, ""),
    "429": ("429", TRANSIENT, ""),
    "connection-dropped": ("close", TRANSIENT, ""),
    "html-200": ("html-200", TRANSIENT, ""),
    "truncated-json-200": ("truncated-json", TRANSIENT, ""),
    "empty-200": ("empty-200", TRANSIENT, ""),
    "timeout": ("timeout", TRANSIENT, ""),
}


#: Failures after which the provider may have acted on the request (it was sent).
ANSWER_MAY_BE_LOST = {"close", "timeout"}


@pytest.mark.parametrize("shape", ERROR_SHAPES)
def test_token_endpoint_errors_are_classified(fake_provider, staff_client, settings, shape):
    """§2: only dead grants need a person; configuration errors and transient failures keep
    the token, record the kind, and the proxy answers 503 token_unavailable with Retry-After
    without asking the provider again at once."""
    failure, kind, code = ERROR_SHAPES[shape]
    tune(settings, REFRESH_TIMEOUT=0.5)
    provider = fake_provider("rfc")
    datasource = connect(provider, staff_client)
    client = api_key_client()
    before = row(datasource)
    expire_here(datasource)
    if failure == "timeout":
        # The answers come only after our timeout (released at teardown); two: a request whose
        # answer may have been lost is sent once more at once.
        provider.hang(times=2)
    else:
        provider.fail(failure)

    response = client.get(proxy_url(datasource))
    calls = provider.refresh_calls()
    if failure in ANSWER_MAY_BE_LOST:
        assert len(calls) == 2  # sent again at once, with the same refresh token
        assert calls[0].refresh_token_sent == calls[1].refresh_token_sent == before.refresh_token
    else:
        assert len(calls) == 1
    after = row(datasource)
    if kind == DEAD:
        assert response.status_code == 409, body_json(response)
        payload = body_json(response)
        assert payload["error"] == "reauthorization_required"
        assert payload["authorize_url"].endswith(
            f"/admin/datasources/datasource/{datasource.pk}/authorize/"
        )
        assert after.status == TokenStatus.NEEDS_REAUTHORIZATION
        assert code in after.last_error
        assert TokenEvent.objects.filter(
            datasource=datasource, kind="reauthorization_required"
        ).exists()
        assert client.get(proxy_url(datasource)).status_code == 409
    else:
        assert_token_unavailable(response)
        assert after.status == TokenStatus.ACTIVE
        assert after.access_token == before.access_token  # kept
        assert after.refresh_token == before.refresh_token  # kept
        assert after.failure_kind == kind
        assert after.failure_count == 1
        assert after.last_error
        assert after.next_attempt_at is not None and after.next_attempt_at > timezone.now()
        assert code in after.last_error
        if failure == "429":
            assert int(response["Retry-After"]) >= 100  # never before the server's Retry-After
        # The next call does not hit the provider again right away (probe interval/backoff).
        assert_token_unavailable(client.get(proxy_url(datasource)))
    assert len(provider.refresh_calls()) == len(calls)
    assert provider.api() == []  # nothing reached the API with an expired token


@pytest.mark.parametrize("name", ["slack", "zoho", "google"])
def test_dead_refresh_token_in_each_providers_own_words(fake_provider, staff_client, name):
    """A refresh token revoked at the provider: Slack says ``{"ok": false, "error":
    "invalid_refresh_token"}`` and Zoho ``{"error": "invalid_code"}``, both with HTTP 200;
    Google says invalid_grant with 400. Each is a dead grant, never a 500."""
    provider = fake_provider(name)
    fields = {"scope_separator": ","} if name in ("slack", "zoho") else {}
    datasource = connect(provider, staff_client, **fields)
    client = api_key_client()
    provider.revoke_refresh_tokens()
    expire_here(datasource)
    response = client.get(proxy_url(datasource))
    assert response.status_code == 409, body_json(response)
    token = row(datasource)
    assert token.status == TokenStatus.NEEDS_REAUTHORIZATION
    assert provider.profile.dead_refresh_error in token.last_error
    assert provider.refresh_calls()[0].outcome == f"error:{provider.profile.dead_refresh_error}"


# --- §4: expiry from odd answers -------------------------------------------------------------

#: (profile overrides, expected lifetime in seconds, expiry known). The datasource's
#: token_lifetime is 900 and DEFAULT_TOKEN_LIFETIME 1234, so each source is recognisable.
ODD_EXPIRY: dict[str, tuple[dict[str, Any], float | None, bool | None]] = {
    "string": ({"expires_in": "str"}, 3600, True),
    "float-string": ({"expires_in": "float-str"}, 3600, True),
    "zero": ({"expires_in": 0}, 900, False),
    "negative": ({"expires_in": -300}, 900, False),
    "huge": ({"expires_in": 10**12}, None, None),  # capped: checked apart
    "jwt-exp-only": ({"expires_in": "absent", "jwt_access": True, "lifetime": 1800}, 1800, True),
    "absent": ({"expires_in": "absent"}, 900, False),
    "absent-no-lifetime": ({"expires_in": "absent"}, 1234, False),
    "null": ({"expires_in": None}, 900, False),
    "garbage-string": ({"expires_in": "soon"}, 900, False),
}


@pytest.mark.parametrize("via", ["callback", "refresh"])
@pytest.mark.parametrize("shape", ODD_EXPIRY)
def test_odd_expires_in(fake_provider, staff_client, settings, shape, via):
    overrides, lifetime, known = ODD_EXPIRY[shape]
    tune(settings, DEFAULT_TOKEN_LIFETIME=1234)
    provider = fake_provider("rfc", **(overrides if via == "callback" else {}))
    fields = {} if shape == "absent-no-lifetime" else {"token_lifetime": 900}
    datasource = provider_datasource(provider, **fields)
    response = authorize_through_admin(staff_client, datasource)
    assert response.status_code == 302, response.content[:500]  # never a 500
    client = api_key_client()
    if via == "refresh":
        provider.profile = replace(provider.profile, **overrides)
        provider.expire_access_tokens()
        expire_here(datasource)
        call = client.get(proxy_url(datasource))
        assert call.status_code == 200, body_json(call)
        assert len(provider.refresh_calls()) == 1
    else:
        assert client.get(proxy_url(datasource)).status_code == 200
    token = row(datasource)
    assert token.status == TokenStatus.ACTIVE
    assert token.access_token == provider.calls()[-1].answer["access_token"]
    assert_api_got(provider, token.access_token)
    if shape == "huge":
        assert 365 * 86400 < seconds_left(token) <= 10 * 366 * 86400
    else:
        assert token.expiry_known is known
        assert abs(seconds_left(token) - lifetime) < 10


# --- §5: re-authorization without a refresh token --------------------------------------------


def test_reconsent_without_refresh_token_keeps_the_stored_one(fake_provider, staff_client):
    """Google sends a refresh token only on the first consent."""
    provider = fake_provider("google")
    datasource = connect(provider, staff_client)
    first = row(datasource)
    assert first.refresh_token

    response = authorize_through_admin(staff_client, datasource)  # re-consent
    assert response.status_code == 302
    second_answer = provider.calls("authorization_code")[1].answer
    assert "refresh_token" not in second_answer
    token = row(datasource)
    assert token.access_token == second_answer["access_token"]
    assert token.refresh_token == first.refresh_token  # kept
    assert token.status == TokenStatus.ACTIVE
    assert not [m for m in messages_of(response) if m.level >= message_levels.WARNING]

    provider.expire_access_tokens()
    expire_here(datasource)
    assert api_key_client().get(proxy_url(datasource)).status_code == 200
    assert provider.refresh_calls()[0].refresh_token_sent == first.refresh_token
    assert provider.refresh_calls()[0].outcome == "issued"


def test_authorization_without_refresh_token_warns_when_the_connection_stops(
    fake_provider, staff_client
):
    """Google without access_type=offline: no refresh token at all. The builder is told when
    the connection stops working and what usually fixes it."""
    provider = fake_provider("google", refresh_on_code=False)
    datasource = provider_datasource(provider)
    response = authorize_through_admin(staff_client, datasource)
    assert response.status_code == 302
    assert row(datasource).refresh_token is None
    warnings = [str(m) for m in messages_of(response) if m.level == message_levels.WARNING]
    assert warnings, [str(m) for m in messages_of(response)]
    text = " ".join(warnings)
    assert "refresh token" in text
    assert re.search(r"stops working at [^.]*\b\d{1,2}:\d{2}\b", text), text
    assert re.search(r"prompt=consent|access_type=offline|offline_access", text), text


def test_reauthorization_with_another_client_does_not_keep_the_old_refresh_token(
    fake_provider, staff_client
):
    """The stored refresh token belongs to the client that obtained it."""
    provider = fake_provider("google")
    provider.clients["client-other"] = SECRET
    datasource = connect(provider, staff_client)
    assert row(datasource).refresh_token
    datasource.client_id = "client-other"
    datasource.save()
    provider.profile = replace(provider.profile, refresh_on_code=False)
    response = authorize_through_admin(staff_client, datasource)
    assert response.status_code == 302
    token = row(datasource)
    assert token.access_token == provider.calls("authorization_code")[-1].answer["access_token"]
    assert token.refresh_token is None


# --- §7: 401 storms --------------------------------------------------------------------------


def _statuses(client, datasource, count: int, threads: int = 1) -> list[int]:
    results: list[int] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        own = Client(**client.defaults)  # a test client per thread
        try:
            for i in range(n):
                status = own.get(proxy_url(datasource, f"storm/{i}")).status_code
                with lock:
                    results.append(status)
        finally:
            connection.close()

    if threads == 1:
        for i in range(count):
            results.append(client.get(proxy_url(datasource, f"storm/{i}")).status_code)
        return results
    workers = [threading.Thread(target=worker, args=(count // threads,)) for _ in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(60)
    return results


def test_upstream_always_401_refreshes_at_most_once_per_cooldown(fake_provider, staff_client):
    """§7: an API that answers 401 to everything (a wrong base path, a missing scope) must not
    turn every call into a refresh; the callers get the upstream's 401."""
    provider = fake_provider("microsoft")
    datasource = connect(provider, staff_client)
    client = api_key_client()
    github_like = {"message": "Bad credentials"}
    provider.api_always(401, github_like)

    # The first rejection refreshes once (the token may have been revoked just after it was
    # issued) and retries once; the retry's 401 is passed on. The next rejections within
    # REJECTION_COOLDOWN (30 s) of that rejection-caused refresh are passed on at once.
    api_before = len(provider.api())
    first = client.get(proxy_url(datasource, "wrong/path"))
    assert first.status_code == 401
    assert body_json(first) == github_like  # the upstream's answer, passed on
    assert _statuses(client, datasource, 19) == [401] * 19
    assert len(provider.refresh_calls()) == 1
    assert len(provider.api()) - api_before == 21  # each call once, plus one retry
    assert row(datasource).status == TokenStatus.ACTIVE

    # After the cooldown: one refresh (and one retry) again, then passed on.
    age(datasource, 120)
    api_before = len(provider.api())
    assert _statuses(client, datasource, 30) == [401] * 30
    assert len(provider.refresh_calls()) == 2
    assert len(provider.api()) - api_before == 31
    assert row(datasource).status == TokenStatus.ACTIVE

    # The same under concurrency.
    age(datasource, 120)
    assert _statuses(client, datasource, 32, threads=8) == [401] * 32
    assert len(provider.refresh_calls()) == 3
    assert row(datasource).status == TokenStatus.ACTIVE


@pytest.mark.parametrize("codes", ["401", "401,403"])
def test_expiry_status_codes_are_configurable_per_datasource(fake_provider, staff_client, codes):
    """Some APIs answer 403 to an expired token; only the datasource's expiry statuses refresh."""
    provider = fake_provider("rfc", api_reject_status=403, api_reject_body={"error": "expired"})
    datasource = connect(provider, staff_client, expiry_status_codes=codes)
    client = api_key_client()
    provider.expire_access_tokens()
    age(datasource, 3600)
    response = client.get(proxy_url(datasource))
    if codes == "401":
        assert response.status_code == 403
        assert body_json(response) == {"error": "expired"}
        assert provider.refresh_calls() == []
    else:
        assert response.status_code == 200, body_json(response)
        assert len(provider.refresh_calls()) == 1
        assert_api_got(provider, row(datasource).access_token)


# --- the fake itself -------------------------------------------------------------------------


def test_the_fake_provider_is_as_strict_as_a_real_one(fake_provider):
    """The fake must refuse what a real provider refuses, or the suite proves nothing: PKCE,
    single-use codes, redirect URI, client secret, strict rotation, token expiry at the API."""
    import base64
    import hashlib
    import threading as _threading

    import requests

    provider = fake_provider("xero")
    http = requests.Session()
    http.trust_env = False
    verifier = "v" * 64
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=")
    redirect = "http://testserver/api/v1/datasources/authorize"

    def code() -> str:
        answer = http.get(
            f"{provider.url}/authorize",
            params={
                "response_type": "code",
                "client_id": "client-basic",
                "redirect_uri": redirect,
                "state": "s-1",
                "code_challenge": challenge.decode(),
                "code_challenge_method": "S256",
            },
            allow_redirects=False,
            timeout=5,
        )
        assert answer.status_code == 302
        location = answer.headers["Location"]
        assert location.startswith(redirect + "?") and "state=s-1" in location
        return location.split("code=")[1].split("&")[0]

    def token(**form: str) -> requests.Response:
        return http.post(
            f"{provider.url}/token",
            data=form,
            auth=("client-basic", form.pop("secret", SECRET)),
            headers={"Accept": "application/json"},
            timeout=5,
        )

    unknown = http.get(f"{provider.url}/authorize?client_id=nobody&redirect_uri=x", timeout=5)
    assert unknown.status_code == 400
    exchange = {"grant_type": "authorization_code", "redirect_uri": redirect}
    assert token(**exchange, code=code(), code_verifier="w" * 64).json()["error"] == "invalid_grant"
    assert token(**exchange, code=code()).json()["error"] == "invalid_grant"  # verifier missing
    wrong_uri = {**exchange, "redirect_uri": redirect + "x"}
    assert token(**wrong_uri, code=code(), code_verifier=verifier).status_code == 400
    bad_secret = token(**exchange, code=code(), code_verifier=verifier, secret="nope")
    assert bad_secret.status_code == 401 and bad_secret.json()["error"] == "invalid_client"
    used = code()
    first = token(**exchange, code=used, code_verifier=verifier).json()
    assert token(**exchange, code=used, code_verifier=verifier).json()["error"] == "invalid_grant"
    assert first["expires_in"] == 1800 and first["access_token"].count(".") == 2

    def api(access: str) -> int:
        headers = {"Authorization": f"Bearer {access}"}
        return http.get(f"{provider.url}/api/me", headers=headers, timeout=5).status_code

    assert api(first["access_token"]) == 200
    assert api("made-up") == 401
    second = token(grant_type="refresh_token", refresh_token=first["refresh_token"]).json()
    assert second["refresh_token"] != first["refresh_token"]
    again = token(grant_type="refresh_token", refresh_token=first["refresh_token"])
    assert again.json()["error"] == "invalid_grant"  # strict rotation: the old one is dead
    provider.expire_access_tokens()
    assert api(second["access_token"]) == 401

    # Runtime switches: a dropped connection, and a request held until released.
    provider.fail("close", times=1)
    with pytest.raises(requests.ConnectionError):
        token(grant_type="refresh_token", refresh_token=second["refresh_token"])
    provider.hang()
    answers: list[requests.Response] = []
    held = _threading.Thread(
        target=lambda: answers.append(
            token(grant_type="refresh_token", refresh_token=second["refresh_token"])
        )
    )
    calls_before = len(provider.calls())
    held.start()
    wait_until(lambda: provider.hanging == 1, 5, what="the held request")
    assert not answers and len(provider.calls()) == calls_before + 1  # counted on arrival
    provider.release()
    held.join(5)
    assert answers[0].status_code == 200

    github = fake_provider("github")
    assert github.url != provider.url
    form = github._encode({"Accept": "*/*"}, {"access_token": "gho_x", "scope": "repo"}, 200)
    assert form.content_type.startswith("application/x-www-form-urlencoded")
