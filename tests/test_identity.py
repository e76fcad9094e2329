"""Issue 31: a reconnect must sign in the same upstream account.

* :func:`same_account` is the one decision (a table).
* The identity of an authorization: the ID token's ``iss`` and ``sub`` (checked: issuer,
  audience, expiry), else the datasource's userinfo call and field, else none.
* Against panva's oidc-provider, through connect links: end user ``u-1`` connects as account
  ``alice``; a reconnect signed in as ``bob`` is refused (the return URL gets
  ``identity_mismatch``, the stored token is kept, an event and a webhook delivery say so); a
  reconnect as ``alice`` replaces the token; after the connection is deleted on purpose, ``bob``
  may connect.
"""

from __future__ import annotations

import base64
import json
import time
from urllib.parse import parse_qs, urlsplit

import pytest
from django.test import Client

from datasources.authserver import identity
from datasources.authserver.identity import IdentityError, Verdict, same_account
from datasources.authserver.oauth import TokenResponse
from datasources.models import (
    ConnectSession,
    Datasource,
    Token,
    TokenEvent,
    WebhookDelivery,
    WebhookEndpoint,
)
from datasources.proxy.apikeys import create_api_key

from .conftest import CALLBACK_PATH, make_datasource
from .oidcprovider import OidcProvider

pytestmark = pytest.mark.django_db(transaction=True)

SECRET = "a-client-secret-long-enough-for-hs256-0123456789"
APP = "https://app.example.com"


@pytest.mark.parametrize(
    "connected, stored, new, verdict",
    [
        (False, "", "", Verdict.FIRST),
        (False, "iss alice", "iss bob", Verdict.FIRST),  # disconnected: any account
        (True, "", "", Verdict.UNCHECKED),  # no way to tell: not checked (the admin says so)
        (True, "", "iss alice", Verdict.FIRST),  # connected before identities were kept
        (True, "iss alice", "iss alice", Verdict.SAME),
        (True, "iss alice", "iss bob", Verdict.MISMATCH),
        (True, "iss alice", "", Verdict.MISMATCH),  # cannot be told now: refused
        (True, "iss alice", "other-iss alice", Verdict.MISMATCH),
    ],
)
def test_same_account(connected, stored, new, verdict):
    assert same_account(connected=connected, stored=stored, new=new) is verdict


def id_token(**claims) -> str:
    def part(data: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")

    return f"{part({'alg': 'RS256'})}.{part(claims)}.c2lnbmF0dXJl"


def datasource_for_identity(**fields) -> Datasource:
    return make_datasource(issuer="https://op.example", client_id="web", **fields)


@pytest.mark.parametrize(
    "claims, problem",
    [
        ({"iss": "https://op.example", "sub": "alice", "aud": "web"}, None),
        ({"iss": "https://op.example", "sub": "alice", "aud": ["web", "x"]}, None),
        ({"iss": "https://evil.example", "sub": "alice", "aud": "web"}, "another issuer"),
        ({"iss": "https://op.example", "sub": "alice", "aud": "other"}, "another client"),
        ({"iss": "https://op.example", "aud": "web"}, "no iss or sub"),
        ({"iss": "https://op.example", "sub": "alice", "aud": "web", "exp": 1}, "expired"),
    ],
)
def test_the_id_token_names_the_account(claims, problem):
    datasource = datasource_for_identity()
    claims = {"exp": time.time() + 300, **claims}
    response = TokenResponse(access_token="a", id_token=id_token(**claims))
    if problem is None:
        assert identity.identity_of(datasource, response) == "https://op.example alice"
    else:
        with pytest.raises(IdentityError, match=problem):
            identity.identity_of(datasource, response)


def test_the_userinfo_field_names_the_account_without_an_id_token(monkeypatch):
    datasource = datasource_for_identity(
        userinfo_url="https://api.example.com/user", userinfo_identity_field="account.id"
    )
    seen = []

    def fetch(ds, url, access_token):
        seen.append((url, access_token))
        return {"account": {"id": 4711, "login": "alice"}}

    monkeypatch.setattr(identity.oauth, "fetch_userinfo", fetch)
    response = TokenResponse(access_token="the-new-access-token")
    assert identity.identity_of(datasource, response) == (
        "https://api.example.com/user account.id=4711"
    )
    assert seen == [("https://api.example.com/user", "the-new-access-token")]
    assert identity.identity_of(make_datasource(slug="none", name="None"), response) == ""


# --- against oidc-provider, through connect links --------------------------------------------


@pytest.fixture(scope="module")
def op_config():
    return {
        "clients": [
            {
                "client_id": "web",
                "client_secret": SECRET,
                "redirect_uris": [f"http://testserver{CALLBACK_PATH}"],
                "grant_types": ["authorization_code", "refresh_token"],
                "response_types": ["code"],
                "scope": "openid offline_access api",
            }
        ],
        "ttl": {"AccessToken": 600},
    }


@pytest.fixture
def connected_datasource(op: OidcProvider) -> Datasource:
    return make_datasource(
        name="OP",
        slug="op",
        base_url=f"{op.issuer}/_test/resource/",
        authorization_url=op.authorization_url,
        access_token_url=op.token_url,
        issuer=op.issuer,
        client_id="web",
        client_secret=SECRET,
        client_authentication="basic",
        scopes="openid offline_access",
        allowed_return_urls=f"{APP}/",
    )


def connect_as_account(op: OidcProvider, key: str, end_user: str, account: str) -> dict:
    """Create a link for ``end_user``, sign in at the provider as ``account``; the query the
    application's return URL got."""
    op.sign_in_as(account)
    created = Client(HTTP_AUTHORIZATION=f"Api-Key {key}").post(
        "/api/v1/connect/sessions",
        {"datasource": "op", "end_user": end_user, "return_url": f"{APP}/done"},
        content_type="application/json",
    )
    assert created.status_code == 201, created.content
    link = urlsplit(json.loads(created.content)["connect_url"]).path
    person = Client()
    pressed = person.post(link)
    assert pressed.status_code == 302, pressed.content[:300]
    callback = op.consent(pressed["Location"], f"http://testserver{CALLBACK_PATH}")
    returned = person.get(CALLBACK_PATH, parse_qs(urlsplit(callback).query))
    assert returned.status_code == 302 and returned["Location"].startswith(f"{APP}/done?")
    return {k: v[0] for k, v in parse_qs(urlsplit(returned["Location"]).query).items()}


def test_a_reconnect_must_sign_in_the_same_account(op, connected_datasource):
    WebhookEndpoint.objects.create(
        url="https://hooks.example.com/in", event_types=["connection.identity_mismatch"]
    )
    _, key = create_api_key("saas", datasources=[connected_datasource], permissions=["connect"])

    assert connect_as_account(op, key, "u-1", "alice")["connect"] == "success"
    first = Token.objects.get(end_user="u-1")
    assert first.identity == f"{op.issuer} alice"

    refused = connect_as_account(op, key, "u-1", "bob")
    assert (refused["connect"], refused["error"]) == ("error", "identity_mismatch")
    kept = Token.objects.get(end_user="u-1")
    assert (kept.access_token, kept.refresh_token, kept.identity) == (
        first.access_token,
        first.refresh_token,
        first.identity,
    )
    assert ConnectSession.objects.filter(outcome="identity_mismatch").count() == 1
    event = TokenEvent.objects.get(kind="identity_mismatch")
    assert "u-1" in event.detail and "bob" in event.detail
    delivery = WebhookDelivery.objects.get(event_type="connection.identity_mismatch")
    assert delivery.payload["data"]["end_user"] == "u-1"
    assert first.access_token not in json.dumps(delivery.payload)

    assert connect_as_account(op, key, "u-1", "alice")["connect"] == "success"
    again = Token.objects.get(end_user="u-1")
    assert again.access_token != first.access_token and again.identity == first.identity

    # Deleting the connection on purpose (the management API) lets another account connect.
    _, manage = create_api_key("ops", datasources=[connected_datasource], permissions=["manage"])
    deleted = Client(HTTP_AUTHORIZATION=f"Api-Key {manage}").delete(
        "/api/v1/datasources/op/connections/u-1"
    )
    assert deleted.status_code == 204, deleted.content
    assert not Token.objects.filter(end_user="u-1").exists()
    assert connect_as_account(op, key, "u-1", "bob")["connect"] == "success"
    assert Token.objects.get(end_user="u-1").identity == f"{op.issuer} bob"
    # Another end user is another connection: no check against u-1's account.
    assert connect_as_account(op, key, "u-2", "alice")["connect"] == "success"


def test_a_user_reauthorizing_a_per_user_token_must_sign_in_the_same_account(
    op, connected_datasource, django_user_model
):
    """The same check for a Django user's own token (per-user datasources): the refusal is a
    sentence on the page they land on, and their token is kept."""
    from django.contrib.auth.models import Permission

    connected_datasource.token_sharing = "per_user"
    connected_datasource.save()
    user = django_user_model.objects.create_user("pat", "pat@example.com", "pat-password-1")
    user.user_permissions.add(Permission.objects.get(codename="use_datasource"))
    browser = Client()
    browser.force_login(user)

    def reauthorize(account: str):
        op.sign_in_as(account)
        start = browser.get("/api/v1/datasources/op/connect")
        assert start.status_code == 302, start.content[:300]
        callback = op.consent(start["Location"], f"http://testserver{CALLBACK_PATH}")
        return browser.get(CALLBACK_PATH, parse_qs(urlsplit(callback).query))

    assert reauthorize("alice").status_code == 200
    first = Token.objects.get(datasource=connected_datasource, user=user)
    assert first.identity == f"{op.issuer} alice" and first.access_token

    refused = reauthorize("bob").content.decode()
    assert "another account than the one connected before" in refused
    assert "nothing was replaced" in refused
    kept = Token.objects.get(pk=first.pk)
    assert (kept.access_token, kept.identity) == (first.access_token, first.identity)
    assert TokenEvent.objects.filter(
        kind="identity_mismatch", detail__contains=f"user {user.pk}"
    ).exists()
