"""DPoP building blocks: keys, proofs (verified with PyJWT), the RS refusal table, nonces."""

from __future__ import annotations

import base64
import hashlib

import jwt
import pytest
from requests.structures import CaseInsensitiveDict

from datasources.calls import binding
from datasources.models import Datasource, Token
from datasources.security import dpop, jose


def test_rfc7638_thumbprint_example():
    jwk = {
        "kty": "RSA",
        "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_"
        "BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_"
        "FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI"
        "4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
        "e": "AQAB",
        "alg": "RS256",
        "kid": "2011-04-29",
    }
    assert jose.thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_proof_verifies_with_its_own_jwk_and_carries_the_claims():
    pem = dpop.generate_private_key_pem()
    token = "the-access-token"
    proof = dpop.proof(
        pem, "GET", "https://api.example/v1/me?x=1#frag", access_token=token, nonce="n-1"
    )
    header = jwt.get_unverified_header(proof)
    assert header["typ"] == "dpop+jwt" and header["alg"] == "ES256"
    assert set(header["jwk"]) == {"kty", "crv", "x", "y"}  # public members only
    key = jwt.PyJWK(header["jwk"]).key
    claims = jwt.decode(proof, key, algorithms=["ES256"])
    assert claims["htm"] == "GET"
    assert claims["htu"] == "https://api.example/v1/me"
    assert claims["nonce"] == "n-1"
    expected_ath = base64.urlsafe_b64encode(hashlib.sha256(token.encode()).digest()).rstrip(b"=")
    assert claims["ath"] == expected_ath.decode()
    assert dpop.signer(pem).thumbprint == jose.thumbprint(header["jwk"])
    again = jwt.decode(
        dpop.proof(pem, "GET", "https://api.example/v1/me"), key, algorithms=["ES256"]
    )
    assert again["jti"] != claims["jti"] and "ath" not in again and "nonce" not in again


def test_the_parsed_key_is_cached_per_pem_and_a_new_key_is_a_new_signer():
    pem = dpop.generate_private_key_pem()
    assert dpop.signer(pem) is dpop.signer(pem)
    assert dpop.signer(dpop.generate_private_key_pem()).thumbprint != dpop.signer(pem).thumbprint


def test_an_unusable_key_is_a_clear_error_without_the_key():
    with pytest.raises(dpop.DPoPKeyError) as caught:
        dpop.signer("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    assert "not a key" not in str(caught.value) and "DPoP private key" in str(caught.value)
    assert "regenerate it" in str(caught.value)


def _headers(**values: str) -> CaseInsensitiveDict:
    return CaseInsensitiveDict({k.replace("_", "-"): v for k, v in values.items()})


@pytest.mark.parametrize(
    ("status", "headers", "expected"),
    [
        (200, _headers(DPoP_Nonce="n"), dpop.Refusal.NONE),
        (
            401,
            _headers(WWW_Authenticate='DPoP error="use_dpop_nonce"', DPoP_Nonce="n"),
            dpop.Refusal.NONCE,
        ),
        # a nonce request without the nonce cannot be answered: the answer stands
        (401, _headers(WWW_Authenticate='DPoP error="use_dpop_nonce"'), dpop.Refusal.NONE),
        (
            401,
            _headers(WWW_Authenticate='DPoP algs="ES256", error="invalid_dpop_proof"'),
            dpop.Refusal.PROOF,
        ),
        (401, _headers(WWW_Authenticate="DPoP error=invalid_dpop_proof"), dpop.Refusal.PROOF),
        # the token or the proof (oidc-provider says so for a replayed proof): a fresh proof
        # first, then the token rules
        (
            401,
            _headers(
                WWW_Authenticate='DPoP realm="r", error="invalid_token", error_description="x"'
            ),
            dpop.Refusal.TOKEN_OR_PROOF,
        ),
        (401, _headers(WWW_Authenticate='Bearer error="invalid_token"'), dpop.Refusal.NONE),
        (401, _headers(), dpop.Refusal.NONE),
        (
            403,
            _headers(WWW_Authenticate='DPoP error="use_dpop_nonce"', DPoP_Nonce="n"),
            dpop.Refusal.NONE,
        ),
    ],
)
def test_resource_refusal_table(status, headers, expected):
    assert dpop.resource_refusal(status, headers) is expected


def test_nonces_are_kept_per_origin_and_shared_through_the_cache():
    dpop.forget_nonces()
    dpop.remember_nonce("https://AS.example:8443/token?x", "nonce-1")
    assert dpop.nonce_for("https://as.example:8443/other") == "nonce-1"
    assert dpop.nonce_for("https://as.example/other") is None
    dpop.forget_nonces()  # another process: starts from the shared cache
    assert dpop.nonce_for("https://as.example:8443/") == "nonce-1"
    dpop.remember_nonce("https://as.example:8443/", "")
    assert dpop.nonce_for("https://as.example:8443/") == "nonce-1"


@pytest.mark.django_db
def test_a_bearer_token_from_a_server_that_ignores_dpop_stays_bearer():
    ds = Datasource.objects.create(
        name="d",
        slug="d",
        base_url="https://api.example/",
        access_token_url="https://as.example/t",
        client_id="c",
        grant_type="client_credentials",
        use_dpop=True,
    )
    assert ds.dpop_private_key and ds.dpop_jkt == dpop.signer(ds.dpop_private_key).thumbprint
    bearer = Token(datasource=ds, access_token="tok", token_type="Bearer")
    assert binding.auth_headers(ds, bearer, "GET", "https://api.example/x") == {
        "Authorization": "Bearer tok"
    }
    bound = Token(datasource=ds, access_token="tok", token_type="DPoP")
    headers = binding.auth_headers(ds, bound, "GET", "https://api.example/x")
    assert headers["Authorization"] == "DPoP tok" and headers["DPoP"].count(".") == 2
    # a proof refusal is not an expired token; invalid_token is
    refused = _headers(WWW_Authenticate='DPoP error="invalid_dpop_proof"')
    assert not binding.token_rejected(ds, 401, refused)
    assert binding.token_rejected(ds, 401, _headers(WWW_Authenticate='DPoP error="invalid_token"'))


@pytest.mark.django_db
def test_dpop_needs_the_header_placement():
    from django.core.exceptions import ValidationError

    ds = Datasource(
        name="d",
        slug="d",
        base_url="https://api.example/",
        access_token_url="https://as.example/t",
        client_id="c",
        grant_type="client_credentials",
        use_dpop=True,
        token_placement="query",
    )
    with pytest.raises(ValidationError) as caught:
        ds.full_clean()
    assert "token_placement" in caught.value.message_dict


@pytest.mark.django_db
def test_config_as_code_imports_a_key_from_the_environment_and_never_exports_it():
    from datasources.ops.config_io import ImportFailed, export_datasources, import_datasources

    pem = dpop.generate_private_key_pem()
    entry = {
        "name": "d",
        "slug": "d",
        "base_url": "https://api.example/",
        "access_token_url": "https://as.example/t",
        "client_id": "c",
        "client_secret": "s",
        "grant_type": "client_credentials",
        "use_dpop": True,
        "dpop_private_key": {"env": "DATASOURCE_SECRET_DPOP"},
    }
    import_datasources([entry], environ={"DATASOURCE_SECRET_DPOP": pem})
    ds = Datasource.objects.get(slug="d")
    assert ds.dpop_private_key == pem and ds.dpop_jkt == dpop.signer(pem).thumbprint
    exported = export_datasources()
    assert exported[0]["use_dpop"] is True
    assert "dpop_private_key" not in exported[0] and "PRIVATE" not in str(exported)

    with pytest.raises(ImportFailed) as caught:
        import_datasources(
            [{**entry, "dpop_private_key": {"env": "DATASOURCE_SECRET_BAD"}}],
            environ={"DATASOURCE_SECRET_BAD": "garbage"},
        )
    assert "dpop_private_key" in str(caught.value) and "garbage" not in str(caught.value)
    assert Datasource.objects.get(slug="d").dpop_private_key == pem  # nothing written


@pytest.mark.django_db
def test_an_unusable_stored_key_is_a_clear_refusal_not_a_crash(fake_token_endpoint):
    from datetime import timedelta

    from django.test import Client
    from django.utils import timezone

    from datasources import tokens
    from datasources.proxy.apikeys import create_api_key

    ds = Datasource.objects.create(
        name="d",
        slug="d",
        base_url="https://api.example/",
        access_token_url="https://as.example/t",
        client_id="c",
        client_secret="s",
        grant_type="client_credentials",
        use_dpop=True,
    )
    broken = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
    Datasource.objects.filter(pk=ds.pk).update(dpop_private_key=broken)
    Token.objects.filter(datasource=ds).update(
        access_token="tok",
        token_type="DPoP",
        status="active",
        expires_at=timezone.now() + timedelta(hours=1),
    )
    _, key = create_api_key("app")
    response = Client(HTTP_AUTHORIZATION=f"Api-Key {key}").get("/api/v1/datasources/d/proxy/x")
    assert response.status_code == 503 and response.json()["error"] == "dpop_key_unusable"
    assert "regenerate it" in response.json()["detail"]

    result = tokens.refresh_token(Datasource.objects.get(pk=ds.pk), force=True)
    assert result.outcome == "configuration" and "DPoP private key" in result.error
    assert fake_token_endpoint.calls == []  # nothing was sent


@pytest.mark.django_db
def test_a_callers_dpop_header_never_reaches_the_upstream(settings):
    """What reached the upstream (tests/spy.py): the caller's own DPoP proof is dropped; with
    DPoP on and a DPoP token, the proof is ours, for our key, with the token's hash."""
    import jwt as pyjwt

    from datasources.proxy import cache as proxy_cache

    from .helpers import ACCESS_TOKEN, connected
    from .spy import SpyUpstream
    from .test_attacks import key_client, proxied

    spy = SpyUpstream().start()
    try:
        datasource = connected(spy)
        client, _ = key_client()
        assert (
            client.get(proxied(datasource, "x"), HTTP_DPOP="attacker.proof.value").status_code
            == 200
        )
        [seen] = spy.seen
        assert (
            seen.header("DPoP") is None and seen.header("Authorization") == f"Bearer {ACCESS_TOKEN}"
        )

        datasource.use_dpop = True
        datasource.save()  # generates the key
        Token.objects.filter(datasource=datasource).update(token_type="DPoP")
        proxy_cache.forget()
        assert (
            client.get(proxied(datasource, "x"), HTTP_DPOP="attacker.proof.value").status_code
            == 200
        )
        seen = spy.seen[-1]
        assert seen.header("Authorization") == f"DPoP {ACCESS_TOKEN}"
        proof = seen.header("DPoP")
        assert proof != "attacker.proof.value"
        header = pyjwt.get_unverified_header(proof)
        assert jose.thumbprint(header["jwk"]) == Datasource.objects.get(pk=datasource.pk).dpop_jkt
        claims = pyjwt.decode(proof, pyjwt.PyJWK(header["jwk"]).key, algorithms=["ES256"])
        assert claims["htu"] == f"{spy.base}/api/x" and claims["htm"] == "GET"
    finally:
        spy.stop()
        proxy_cache.forget()
