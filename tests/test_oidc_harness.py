"""The oidc-provider harness itself: the flows other tests build on answer as the specs say, and
the request log reports what reached the server. Plain ``requests`` here, no app code."""

from __future__ import annotations

import time
import uuid
from urllib.parse import urlencode

import jwt
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import ec

from .oidcprovider import JWT_BEARER, TEST_USER, callback_query, start_oidc_provider

REDIRECT = "http://testserver/api/v1/datasources/authorize"
SECRET = "a-client-secret-long-enough-for-hs256-0123456789"

KEY = ec.generate_private_key(ec.SECP256R1())
PUBLIC_JWK = {**jwt.algorithms.ECAlgorithm.to_jwk(KEY.public_key(), as_dict=True), "kid": "k1"}


@pytest.fixture(scope="module")
def op_config():
    return {
        "clients": [
            {
                "client_id": "web",
                "client_secret": SECRET,
                "redirect_uris": [REDIRECT],
                "grant_types": ["authorization_code", "refresh_token", "client_credentials"],
                "response_types": ["code"],
                "scope": "openid offline_access api",
            },
            {
                "client_id": "web-jwt",
                "client_secret": SECRET,
                "token_endpoint_auth_method": "client_secret_jwt",
                "grant_types": ["client_credentials"],
                "response_types": [],
                "redirect_uris": [],
                "scope": "api",
            },
            {
                "client_id": "svc@example.iam",
                "token_endpoint_auth_method": "none",
                "grant_types": [JWT_BEARER],
                "response_types": [],
                "redirect_uris": [],
                "jwks": {"keys": [PUBLIC_JWK]},
            },
        ],
        "jwtBearer": {},
        "features": {"par": {"enabled": True, "require": False}},
        "ttl": {"AccessToken": 120},
    }


def test_code_flow_refresh_rotation_and_userinfo(op):
    callback = op.consent(
        f"{op.authorization_url}?"
        + urlencode(
            {
                "client_id": "web",
                "response_type": "code",
                "redirect_uri": REDIRECT,
                "scope": "openid offline_access",
                "state": "s1",
            }
        ),
        REDIRECT,
    )
    query = callback_query(callback)
    assert query["state"] == "s1" and query["iss"] == op.issuer
    tokens = requests.post(
        op.token_url,
        data={"grant_type": "authorization_code", "code": query["code"], "redirect_uri": REDIRECT},
        auth=("web", SECRET),
        timeout=10,
    ).json()
    assert tokens["refresh_token"] and tokens["expires_in"] == 120
    refreshed = requests.post(
        op.token_url,
        data={
            "grant_type": "refresh_token",
            "refresh_token": tokens["refresh_token"],
            "client_id": "web",
            "client_secret": SECRET,
        },
        timeout=10,
    ).json()
    assert refreshed["refresh_token"] != tokens["refresh_token"]  # rotation is on
    me = requests.get(
        op.userinfo_url,
        headers={"Authorization": f"Bearer {refreshed['access_token']}"},
        timeout=10,
    )
    assert me.json()["sub"] == TEST_USER
    log = op.log()
    assert log["counters"]["token"] == {"authorization_code": 1, "refresh_token": 1}
    assert [e["client_auth"] for e in op.requests("token")] == [
        "client_secret_basic",
        "client_secret_post",
    ]
    assert log["counters"]["userinfo"] == 1


def test_client_secret_jwt_client_credentials_and_resource_server(op):
    now = int(time.time())
    assertion = jwt.encode(
        {
            "iss": "web-jwt",
            "sub": "web-jwt",
            "aud": op.token_url,
            "iat": now,
            "exp": now + 60,
            "jti": "a",
        },
        SECRET,
        algorithm="HS256",
    )
    token = requests.post(
        op.token_url,
        data={
            "grant_type": "client_credentials",
            "scope": "api",
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion,
        },
        timeout=10,
    ).json()["access_token"]
    answer = requests.get(
        f"{op.resource_url}/items", headers={"Authorization": f"Bearer {token}"}, timeout=10
    )
    assert answer.status_code == 200 and answer.json()["client_id"] == "web-jwt"
    refused = requests.get(op.resource_url, headers={"Authorization": "Bearer nope"}, timeout=10)
    assert refused.status_code == 401
    assert op.log()["last_client_auth"] == "client_secret_jwt"


def _assertion(**claims):
    now = int(time.time())
    payload = {
        "iss": "svc@example.iam",
        "aud": "TOKEN",
        "iat": now,
        "exp": now + 60,
        "jti": uuid.uuid4().hex,
        "scope": "openid api",
    }
    return jwt.encode({**payload, **claims}, KEY, algorithm="ES256", headers={"kid": "k1"})


def test_jwt_bearer_grant_checks_signature_audience_and_replay(op):
    assertion = _assertion(aud=op.token_url, sub="delegated-user")
    ok = requests.post(
        op.token_url, data={"grant_type": JWT_BEARER, "assertion": assertion}, timeout=10
    )
    assert ok.status_code == 200, ok.text
    me = requests.get(
        op.userinfo_url,
        headers={"Authorization": f"Bearer {ok.json()['access_token']}"},
        timeout=10,
    )
    assert me.json()["sub"] == "delegated-user"
    replay = requests.post(
        op.token_url, data={"grant_type": JWT_BEARER, "assertion": assertion}, timeout=10
    )
    assert replay.json()["error"] == "invalid_grant"
    wrong_aud = requests.post(
        op.token_url,
        data={"grant_type": JWT_BEARER, "assertion": _assertion(aud="https://elsewhere")},
        timeout=10,
    )
    assert wrong_aud.json()["error"] == "invalid_grant"
    other_key = ec.generate_private_key(ec.SECP256R1())
    now = int(time.time())
    forged = jwt.encode(
        {"iss": "svc@example.iam", "aud": op.token_url, "iat": now, "exp": now + 60, "jti": "x"},
        other_key,
        algorithm="ES256",
        headers={"kid": "k1"},
    )
    bad_sig = requests.post(
        op.token_url, data={"grant_type": JWT_BEARER, "assertion": forged}, timeout=10
    )
    assert bad_sig.json()["error"] == "invalid_grant"
    assert op.log()["counters"]["token"] == {JWT_BEARER: 1}


def test_pushed_authorization_request(op):
    pushed = requests.post(
        op.par_url,
        data={
            "client_id": "web",
            "response_type": "code",
            "redirect_uri": REDIRECT,
            "scope": "openid",
            "state": "p1",
        },
        auth=("web", SECRET),
        timeout=10,
    )
    assert pushed.status_code == 201, pushed.text
    request_uri = pushed.json()["request_uri"]
    callback = op.consent(
        f"{op.authorization_url}?" + urlencode({"client_id": "web", "request_uri": request_uri}),
        REDIRECT,
    )
    assert callback_query(callback)["state"] == "p1"
    assert op.log()["counters"]["par"] == 1


def test_par_required_refuses_a_plain_authorization_request():
    config = {
        "clients": [
            {
                "client_id": "web",
                "client_secret": SECRET,
                "redirect_uris": [REDIRECT],
                "grant_types": ["authorization_code"],
                "response_types": ["code"],
            }
        ],
        "features": {"par": {"enabled": True, "require": True}},
    }
    with start_oidc_provider(config) as provider:
        metadata = requests.get(
            f"{provider.issuer}/.well-known/openid-configuration", timeout=10
        ).json()
        assert metadata["require_pushed_authorization_requests"] is True
        answer = requests.get(
            provider.authorization_url,
            params={"client_id": "web", "response_type": "code", "redirect_uri": REDIRECT},
            allow_redirects=False,
            timeout=10,
        )
        assert answer.status_code in (302, 303, 400)
        assert "Pushed Authorization Request must be used" in (
            answer.text + answer.headers.get("Location", "")
        ).replace("+", " ").replace("%20", " ")
