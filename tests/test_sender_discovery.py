"""Discovery of DPoP and mutual-TLS support (RFC 9449 §5.1, RFC 8705 §3.3 and §5): read from
oidc-provider's real metadata, and the admin form using the server's mTLS endpoint aliases
(a metadata document served by the HTTP fake: oidc-provider publishes no aliases)."""

from __future__ import annotations

import json

import pytest

from datasources.authserver import oauth
from datasources.models import Datasource

from . import certs
from .oidcjourney import form_data, form_errors, post_form
from .oidcprovider import start_oidc_provider

pytestmark = pytest.mark.django_db

ISSUER = "https://mtls.example"


def test_oidc_provider_metadata_tells_dpop_algorithms():
    with start_oidc_provider({"features": {"dpop": {"enabled": True}}}) as op:
        metadata = oauth.discover(op.issuer)
    assert "ES256" in metadata.dpop_signing_alg_values_supported
    assert metadata.mtls_endpoint_aliases == {}
    with start_oidc_provider({}) as op:
        assert oauth.discover(op.issuer).dpop_signing_alg_values_supported == ()


def metadata_document(**extra) -> str:
    return json.dumps(
        {
            "issuer": ISSUER,
            "authorization_endpoint": f"{ISSUER}/auth",
            "token_endpoint": f"{ISSUER}/token",
            "revocation_endpoint": f"{ISSUER}/revoke",
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": [
                "client_secret_basic",
                "tls_client_auth",
                "self_signed_tls_client_auth",
            ],
            "dpop_signing_alg_values_supported": ["ES256", "PS256"],
            "tls_client_certificate_bound_access_tokens": True,
            "mtls_endpoint_aliases": {
                "token_endpoint": "https://mtls.mtls.example/token",
                "revocation_endpoint": "https://mtls.mtls.example/revoke",
                "userinfo_endpoint": "https://mtls.mtls.example/me",
            },
            **extra,
        }
    )


def test_mtls_endpoint_aliases_are_used_when_calling_with_the_certificate(
    fake_token_endpoint, staff_client
):
    client = certs.client_cert(certs.make_ca(), "mtls-web")
    fake_token_endpoint.queue((200, metadata_document(), {"Content-Type": "application/json"}))
    response = post_form(
        staff_client,
        form_data(
            None,
            slug="mtls",
            issuer=ISSUER,
            discover="on",
            client_id="mtls-web",
            client_authentication="tls_client_auth",
            tls_client_certificate=client.cert_pem,
            tls_client_key=client.key_pem,
            certificate_bound_tokens="on",
            tls_ca_bundle="",
        ),
    )
    assert response.status_code == 302, form_errors(response)
    datasource = Datasource.objects.get(slug="mtls")
    assert datasource.access_token_url == "https://mtls.mtls.example/token"
    assert datasource.revocation_url == "https://mtls.mtls.example/revoke"
    assert datasource.authorization_url == f"{ISSUER}/auth"  # the browser has no certificate
    assert datasource.tls_client_key == client.key_pem.strip()
    page = staff_client.get(datasource.get_admin_url())
    assert client.key_pem.splitlines()[1].encode() not in page.content  # write-only
    assert b"CN=mtls-web" in page.content  # described by its subject
    messages = [str(m) for m in page.context["messages"]]
    assert any("supports DPoP (ES256, PS256)" in m for m in messages), messages
    assert any("mutual-TLS endpoint aliases are used" in m for m in messages), messages


def test_without_mtls_the_plain_endpoints_stay_and_bad_aliases_are_refused(
    fake_token_endpoint, staff_client
):
    fake_token_endpoint.queue((200, metadata_document(), {"Content-Type": "application/json"}))
    response = post_form(
        staff_client,
        form_data(
            None,
            slug="plain",
            issuer=ISSUER,
            discover="on",
            client_id="web",
            client_secret="s3cret-value-long-enough",
            client_authentication="basic",
        ),
    )
    assert response.status_code == 302, form_errors(response)
    assert Datasource.objects.get(slug="plain").access_token_url == f"{ISSUER}/token"

    fake_token_endpoint.queue(
        (
            200,
            metadata_document(mtls_endpoint_aliases={"token_endpoint": "http://evil.example/t"}),
            {"Content-Type": "application/json"},
        )
    )
    with pytest.raises(oauth.DiscoveryError, match="not an https URL"):
        oauth.discover(ISSUER)
