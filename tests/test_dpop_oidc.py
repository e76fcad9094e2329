"""DPoP (RFC 9449) end to end against panva's oidc-provider with DPoP nonces required at the
token endpoint and at its userinfo endpoint (the resource server validating DPoP-bound tokens):
import → authorize (code flow) → refresh → proxy, Python client and admin Test calls, and the
negative cases (nonce dance at both servers, a replayed proof, a key the token is not bound to).
Everything is asserted at the server: its request log (proofs seen, refused, counted) and its
introspection endpoint (``cnf.jkt`` = the datasource's key thumbprint)."""

from __future__ import annotations

import pytest
from django.core.cache import cache
from django.test import Client

from datasources import tokens
from datasources.models import Datasource, Token
from datasources.ops.config_io import import_datasources
from datasources.proxy import cache as proxy_cache
from datasources.proxy.apikeys import create_api_key
from datasources.security import dpop

from .conftest import CALLBACK_PATH
from .oidcjourney import authorized_token
from .oidcprovider import TEST_USER, start_oidc_provider

CALLBACK = f"http://testserver{CALLBACK_PATH}"
SECRET = "dpop-client-secret-0123456789-abcdef"

pytestmark = [
    pytest.mark.django_db,
    pytest.mark.usefixtures("fresh_dpop_nonces", "fresh_proxy_cache"),
]


@pytest.fixture(scope="module")
def op_config():
    return {
        "clients": [
            {
                "client_id": "dpop-web",
                "client_secret": SECRET,
                "redirect_uris": [CALLBACK],
                "grant_types": ["authorization_code", "refresh_token"],
                "response_types": ["code"],
                "scope": "openid offline_access api",
                "dpop_bound_access_tokens": True,
            },
            {
                "client_id": "plain-web",
                "client_secret": SECRET,
                "redirect_uris": [CALLBACK],
                "grant_types": ["authorization_code", "refresh_token"],
                "response_types": ["code"],
                "scope": "openid offline_access api",
            },
        ],
        "features": {"dpop": {"enabled": True, "requireNonce": True}},
    }


def import_entry(op, **fields):
    entry = {
        "name": "DPoP API",
        "slug": "dpop-api",
        "base_url": f"{op.issuer}/",
        "grant_type": "authorization_code",
        "authorization_url": op.authorization_url,
        "access_token_url": op.token_url,
        "client_id": "dpop-web",
        "client_secret": SECRET,
        "scopes": "openid offline_access",
        "client_authentication": "basic",
        "custom_auth_params": {"prompt": "consent"},
        "use_pkce": True,
        "use_dpop": True,
        **fields,
    }
    import_datasources([entry])
    return Datasource.objects.get(slug=entry["slug"])


def token_requests(op, grant_type: str) -> list[dict]:
    return [e for e in op.requests("token") if e["grant_type"] == grant_type]


def test_code_flow_refresh_and_proxy_with_nonces_at_both_servers(op, staff_client):
    datasource = import_entry(op)
    assert datasource.dpop_jkt and datasource.dpop_private_key

    token = authorized_token(staff_client, op, datasource)

    # At the token endpoint: the first exchange was refused for want of a nonce, the second
    # (same code, a proof with the nonce) accepted; both carried a proof.
    exchanges = token_requests(op, "authorization_code")
    assert [(e["status"], e.get("error")) for e in exchanges] == [
        (400, "use_dpop_nonce"),
        (200, None),
    ]
    assert all(e["dpop"] for e in exchanges)
    assert token.token_type == "DPoP"
    bound = op.introspect(token.access_token, client_id="dpop-web", secret=SECRET)
    assert bound["active"] and bound["cnf"] == {"jkt": datasource.dpop_jkt}

    # The proxy: the token as "DPoP", a proof with ath. The resource server's nonce is not
    # known to this process yet (a fresh process): it asks, the call is sent again at once.
    dpop.forget_nonces()
    cache.clear()
    _, key = create_api_key("app")
    api = Client(HTTP_AUTHORIZATION=f"Api-Key {key}")
    response = api.get(f"/api/v1/datasources/{datasource.slug}/proxy/me")
    assert response.status_code == 200, response.content
    assert response.json()["sub"] == TEST_USER
    userinfo = op.requests("userinfo")
    assert [(e["status"], e.get("error")) for e in userinfo] == [
        (401, "use_dpop_nonce"),
        (200, None),
    ]
    assert all(e["dpop"] and e["authorization_scheme"] == "DPoP" for e in userinfo)
    # The nonce request was not taken for an expired token: no refresh happened.
    assert token_requests(op, "refresh_token") == []
    assert Token.objects.get(pk=token.pk).access_token == token.access_token

    # The nonce is remembered: the next call goes through at once.
    op.reset()
    assert api.get(f"/api/v1/datasources/{datasource.slug}/proxy/me").status_code == 200
    assert [e["status"] for e in op.requests("userinfo")] == [200]

    # Refresh (forced, as the sweep would when due): a proof on the refresh too, a new
    # DPoP-bound token, and the proxy uses it.
    op.reset()
    result = tokens.refresh_token(datasource, force=True)
    refreshed = Token.objects.get(pk=token.pk)
    assert result.outcome == "refreshed" and refreshed.access_token != token.access_token
    assert refreshed.token_type == "DPoP"
    refreshes = token_requests(op, "refresh_token")
    assert [e["status"] for e in refreshes] == [200] and refreshes[0]["dpop"]
    assert (
        op.introspect(refreshed.access_token, client_id="dpop-web", secret=SECRET)["cnf"]["jkt"]
        == datasource.dpop_jkt
    )
    proxy_cache.forget()
    response = api.get(f"/api/v1/datasources/{datasource.slug}/proxy/me")
    assert response.status_code == 200 and response.json()["sub"] == TEST_USER

    # The Python client and the admin's Test send proofs the same way.
    with Datasource.objects.get(pk=datasource.pk).session() as session:
        assert session.get("me").json()["sub"] == TEST_USER
    test = staff_client.post(
        f"/admin/datasources/datasource/{datasource.pk}/test/", {"method": "GET", "path": "me"}
    )
    assert test.status_code == 200 and b"200" in test.content
    assert TEST_USER.encode() in test.content
    assert refreshed.access_token.encode() not in test.content


def test_a_replayed_proof_refused_by_the_server_is_retried_with_a_fresh_one(
    op, staff_client, dpop_proofs
):
    datasource = import_entry(op)
    authorized_token(staff_client, op, datasource)
    _, key = create_api_key("app")
    api = Client(HTTP_AUTHORIZATION=f"Api-Key {key}")
    assert api.get(f"/api/v1/datasources/{datasource.slug}/proxy/me").status_code == 200

    # The next proof is a copy of one the server has already accepted (an attacker's replay,
    # or a proof reused by mistake): the server refuses it; the proxy sends a fresh one.
    assert api.get(f"/api/v1/datasources/{datasource.slug}/proxy/me").status_code == 200
    dpop_proofs.replay_last()
    op.reset()
    response = api.get(f"/api/v1/datasources/{datasource.slug}/proxy/me")
    assert response.status_code == 200, response.content
    userinfo = op.requests("userinfo")
    # oidc-provider says invalid_token (not invalid_dpop_proof) for a replayed proof
    assert [(e["status"], e.get("error")) for e in userinfo] == [
        (401, "invalid_token"),
        (200, None),
    ]
    assert token_requests(op, "refresh_token") == []  # not taken for an expired token


def test_a_token_bound_to_another_key_is_refused_and_replaced(op, staff_client):
    datasource = import_entry(op)
    old = authorized_token(staff_client, op, datasource)
    old_jkt = datasource.dpop_jkt

    # The key is replaced but the token bound to the old one is kept: the resource server
    # refuses it, with a fresh proof too. The rejection causes one refresh (a confidential
    # client's refresh token is not bound to the key), and the retry, with a token bound to
    # the new key, succeeds.
    datasource.set_dpop_key(dpop.generate_private_key_pem())
    datasource.save()
    assert datasource.dpop_jkt != old_jkt
    op.reset()
    with Datasource.objects.get(pk=datasource.pk).session() as session:
        response = session.get("me")
    assert response.status_code == 200 and response.json()["sub"] == TEST_USER
    userinfo = [(e["status"], e.get("error")) for e in op.requests("userinfo")]
    assert userinfo == [(401, "invalid_token"), (401, "invalid_token"), (200, None)]
    assert [e["status"] for e in token_requests(op, "refresh_token")] == [200]
    old = Token.objects.get(pk=old.pk)

    # Replaced again at once: a rejection already caused a refresh of this token within
    # REJECTION_COOLDOWN, so this refusal is passed on without another token request.
    datasource = Datasource.objects.get(pk=datasource.pk)
    datasource.set_dpop_key(dpop.generate_private_key_pem())
    datasource.save()
    op.reset()
    with Datasource.objects.get(pk=datasource.pk).session() as session:
        refused = session.get("me")
    assert refused.status_code == 401 and "invalid_token" in refused.headers["WWW-Authenticate"]
    assert token_requests(op, "refresh_token") == []
    # The admin's Test says what it means.
    test = staff_client.post(
        f"/admin/datasources/datasource/{datasource.pk}/test/", {"method": "GET", "path": "me"}
    )
    assert b"bound to an earlier DPoP key" in test.content
    assert old.access_token.encode() not in test.content

    # What the admin's Regenerate does after a new key: the tokens are replaced at the next
    # call (a confidential client's refresh token is not bound to the key).
    assert tokens.replace_now(datasource) == 1
    op.reset()
    with Datasource.objects.get(pk=datasource.pk).session() as session:
        response = session.get("me")
    assert response.status_code == 200 and response.json()["sub"] == TEST_USER
    assert [e["status"] for e in token_requests(op, "refresh_token")] == [200]
    assert [e["status"] for e in op.requests("userinfo")] == [200]
    now = Token.objects.get(pk=old.pk)
    assert now.access_token != old.access_token
    assert (
        op.introspect(now.access_token, client_id="dpop-web", secret=SECRET)["cnf"]["jkt"]
        == datasource.dpop_jkt
    )


def test_a_server_without_dpop_returns_bearer_tokens_which_stay_bearer(staff_client):
    """DPoP on here, but the server does not do DPoP (it ignores the proof header and answers
    token_type Bearer): the token is not bound, so it is sent as a bearer token, no proof."""
    config = {
        "clients": [
            {
                "client_id": "dpop-web",
                "client_secret": SECRET,
                "redirect_uris": [CALLBACK],
                "grant_types": ["authorization_code", "refresh_token"],
                "response_types": ["code"],
                "scope": "openid offline_access api",
            }
        ],
        "features": {"dpop": {"enabled": False}},
    }
    with start_oidc_provider(config) as plain:
        datasource = import_entry(plain, slug="plain")
        token = authorized_token(staff_client, plain, datasource)
        assert token.token_type == "Bearer"
        assert all(e["dpop"] for e in plain.requests("token"))  # proofs were offered
        assert "cnf" not in plain.introspect(
            token.access_token, client_id="dpop-web", secret=SECRET
        )
        plain.reset()
        with datasource.session() as session:
            assert session.get("me").json()["sub"] == TEST_USER
        (call,) = plain.requests("userinfo")
        assert call["authorization_scheme"] == "Bearer" and not call["dpop"]


def test_the_code_is_bound_to_the_key_with_and_without_par(op, staff_client):
    """RFC 9449 §10: ``dpop_jkt`` in the authorization request, and a DPoP proof on the pushed
    authorization request (nonce dance included); the server then accepts the code only with a
    proof of that key."""
    datasource = import_entry(op)
    start = staff_client.get(f"/admin/datasources/datasource/{datasource.pk}/authorize/")
    assert f"dpop_jkt={datasource.dpop_jkt}" in start["Location"]

    par = import_entry(op, slug="dpop-par", pushed_authorization_request_url=op.par_url)
    op.reset()
    token = authorized_token(staff_client, op, par)
    assert token.token_type == "DPoP"
    pushed = op.requests("par")
    assert [(e["status"], e.get("error")) for e in pushed] == [
        (400, "use_dpop_nonce"),
        (201, None),
    ]
    assert all(e["dpop"] for e in pushed)
    assert op.introspect(token.access_token, client_id="dpop-web", secret=SECRET)["cnf"] == {
        "jkt": par.dpop_jkt
    }


def test_a_code_bound_to_a_replaced_key_is_refused_with_the_reason(op, staff_client):
    datasource = import_entry(op)
    start = staff_client.get(f"/admin/datasources/datasource/{datasource.pk}/authorize/")
    callback = op.consent(start["Location"], CALLBACK)
    # The key is replaced while the person is at the provider.
    datasource.set_dpop_key(dpop.generate_private_key_pem())
    datasource.save()
    op.reset()
    response = staff_client.get(callback.removeprefix("http://testserver"), follow=True)
    (shown,) = [m.message for m in response.context["messages"]]
    assert "invalid_grant" in shown and "bound to the DPoP key" in shown, shown
    assert Token.objects.get(datasource=datasource, user=None).status == "not_authorized"
    (exchange,) = [
        e for e in op.requests("token") if e["status"] != 400 or e["error"] != "use_dpop_nonce"
    ]
    assert exchange["status"] == 400 and exchange["error"] == "invalid_grant"
