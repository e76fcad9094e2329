"""DPoP for the grants with nobody in the loop, against oidc-provider with nonces required at
the token endpoint and at the resource server (the harness's ``/_test/resource`` validating
DPoP per RFC 9449 §7 with a nonce of its own): client credentials authenticated with
private_key_jwt, and the JWT bearer grant. Each nonce retry signs new client and grant
assertions (the server refuses a replayed ``jti``); a replayed proof is refused by the resource
server with ``invalid_dpop_proof`` and sent again with a fresh one, without a refresh."""

from __future__ import annotations

import jwt
import pytest

from datasources import tokens
from datasources.models import Datasource, Token
from datasources.ops.config_io import import_datasources
from datasources.proxy import cache as proxy_cache

from .oidcjourney import jwks, new_key, proxy_client, proxy_url
from .oidcprovider import JWT_BEARER

pytestmark = [
    pytest.mark.django_db,
    pytest.mark.usefixtures("fresh_dpop_nonces", "fresh_proxy_cache"),
]

CLIENT_KEY, CLIENT_PEM = new_key("ec")
SA_EMAIL = "dpop-sa@project.iam.example"
SA_KEY, SA_PEM = new_key("rsa")


@pytest.fixture(scope="module")
def op_config():
    return {
        "clients": [
            {
                "client_id": "dpop-svc",
                "token_endpoint_auth_method": "private_key_jwt",
                "token_endpoint_auth_signing_alg": "ES256",
                "jwks": jwks(CLIENT_KEY, "svc-1"),
                "grant_types": ["client_credentials"],
                "response_types": [],
                "redirect_uris": [],
                "scope": "api",
            },
            {
                "client_id": SA_EMAIL,
                "token_endpoint_auth_method": "none",
                "grant_types": [JWT_BEARER],
                "response_types": [],
                "redirect_uris": [],
                "jwks": jwks(SA_KEY, "sa-1"),
                "scope": "openid email api",
            },
        ],
        "jwtBearer": {"maxLifetime": 300},
        "features": {"dpop": {"enabled": True, "requireNonce": True, "resourceNonce": True}},
    }


def statuses(entries):
    return [(e["status"], e.get("error")) for e in entries]


def test_client_credentials_with_private_key_jwt_and_nonces_at_both_servers(op, dpop_proofs):
    import_datasources(
        [
            {
                "name": "DPoP service",
                "slug": "dpop-svc",
                "base_url": f"{op.issuer}/_test/",
                "grant_type": "client_credentials",
                "access_token_url": op.token_url,
                "client_id": "dpop-svc",
                "client_authentication": "private_key_jwt",
                "private_key": CLIENT_PEM,
                "private_key_id": "svc-1",
                "scopes": "api",
                "use_dpop": True,
            }
        ]
    )
    datasource = Datasource.objects.get(slug="dpop-svc")
    api = proxy_client(datasource)

    response = api.get(proxy_url(datasource, "resource"))
    assert response.status_code == 200, response.content
    assert response.json()["client_id"] == "dpop-svc"

    # Token endpoint: refused for a nonce, then accepted, each with its own client assertion.
    fetches = op.requests("token")
    assert statuses(fetches) == [(400, "use_dpop_nonce"), (200, None)]
    assert all(e["dpop"] and e["client_auth"] == "private_key_jwt" for e in fetches)
    jtis = [
        jwt.decode(e["client_assertion"], options={"verify_signature": False})["jti"]
        for e in fetches
    ]
    assert len(set(jtis)) == 2
    token = Token.objects.get(datasource=datasource, user=None)
    assert token.token_type == "DPoP"
    # Resource server: its own nonce asked for once, then the call accepted.
    assert statuses(op.requests("resource")) == [(401, "use_dpop_nonce"), (200, None)]

    # A fresh client-credentials token (forced), then a replayed proof at the resource server.
    op.reset()
    assert tokens.refresh_token(datasource, force=True).outcome == "refreshed"
    # Nonces are kept per origin: here the resource server shares the token endpoint's origin
    # and its own nonce was the latest one seen, so the token endpoint asks once more.
    assert statuses(op.requests("token")) == [(400, "use_dpop_nonce"), (200, None)]
    proxy_cache.forget()
    assert api.get(proxy_url(datasource, "resource")).status_code == 200
    dpop_proofs.replay_last()
    op.reset()
    response = api.get(proxy_url(datasource, "resource"))
    assert response.status_code == 200, response.content
    assert statuses(op.requests("resource")) == [(401, "invalid_dpop_proof"), (200, None)]
    assert op.requests("token") == []  # a refused proof is not an expired token


def test_jwt_bearer_grant_gets_a_dpop_bound_token(op):
    import_datasources(
        [
            {
                "name": "Service account",
                "slug": "dpop-sa",
                "base_url": f"{op.issuer}/",
                "grant_type": "jwt_bearer",
                "access_token_url": op.token_url,
                "client_id": SA_EMAIL,
                "client_authentication": "body",
                "private_key": SA_PEM,
                "private_key_id": "sa-1",
                "scopes": "openid email",
                "use_pkce": False,
                "use_dpop": True,
            }
        ]
    )
    datasource = Datasource.objects.get(slug="dpop-sa")
    api = proxy_client(datasource)
    response = api.get(proxy_url(datasource, "me"))
    assert response.status_code == 200, response.content
    assert response.json()["sub"] == SA_EMAIL
    grants = op.requests("token")
    assert statuses(grants) == [(400, "use_dpop_nonce"), (200, None)]
    assert all(e["dpop"] for e in grants)
    # a new assertion for the second attempt: the server refuses a jti it has seen
    assert len({e["assertion"] for e in grants}) == 2
    token = Token.objects.get(datasource=datasource, user=None)
    assert token.token_type == "DPoP"
    assert [e["authorization_scheme"] for e in op.requests("userinfo")][-1] == "DPoP"
