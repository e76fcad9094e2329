"""Mutual TLS (RFC 8705) end to end against panva's oidc-provider served over https with a
throwaway CA made at test time: ``tls_client_auth`` (code flow → refresh → proxy) and
``self_signed_tls_client_auth`` (client credentials → proxy, Python client, Test), tokens bound
to the certificate (``x5t#S256``) and accepted by the resource server only with it; the server
certificate always verified (untrusted → clear error, nothing sent); a wrong certificate →
clear error naming the cause. The proxy calls run through the view and through the ASGI
application, where the fast lane serves them itself (HTTPS with the datasource's CA bundle and
client certificate)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
from django.test import Client

from datasources import tokens
from datasources.models import Datasource, Token, TokenStatus
from datasources.ops.config_io import export_datasources, import_datasources
from datasources.proxy import cache as proxy_cache
from datasources.proxy.apikeys import create_api_key

from . import certs
from .conftest import CALLBACK_PATH
from .oidcjourney import authorized_token
from .oidcprovider import TEST_USER
from .serving import LANE

CALLBACK = f"http://testserver{CALLBACK_PATH}"

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("fresh_proxy_cache")]


@pytest.fixture(scope="module")
def pki():
    return make_pki()


def provider_config(pki, directory: Path) -> dict:
    """oidc-provider over https (server certificate from the test CA, client certificates
    requested) with a tls_client_auth and a self_signed_tls_client_auth client."""
    cert, key = pki["server"].write(directory, "server")
    ca_path = directory / "ca.crt"
    ca_path.write_text(pki["ca"].cert_pem)
    svc_jwk = {
        "kty": "EC",
        "crv": "P-256",
        **_ec_xy(pki["svc"]),
        "x5c": [pki["svc"].x5c],
    }
    config = {
        "tls": {"key": key, "cert": cert, "ca": str(ca_path)},
        "clients": [
            {
                "client_id": "mtls-web",
                "token_endpoint_auth_method": "tls_client_auth",
                "tls_client_auth_subject_dn": "CN=mtls-web,O=Datasources Test",
                "tls_client_certificate_bound_access_tokens": True,
                "redirect_uris": [CALLBACK],
                "grant_types": ["authorization_code", "refresh_token"],
                "response_types": ["code"],
                "scope": "openid offline_access api",
            },
            {
                "client_id": "mtls-svc",
                "token_endpoint_auth_method": "self_signed_tls_client_auth",
                "tls_client_certificate_bound_access_tokens": True,
                "jwks": {"keys": [svc_jwk]},
                "redirect_uris": [],
                "response_types": [],
                "grant_types": ["client_credentials"],
                "scope": "api",
            },
        ],
        "features": {
            "mTLS": {
                "enabled": True,
                "certificateBoundAccessTokens": True,
                "tlsClientAuth": True,
                "selfSignedTlsClientAuth": True,
            }
        },
    }
    return config


def make_pki() -> dict[str, certs.Issued]:
    ca = certs.make_ca()
    return {
        "ca": ca,
        "server": certs.server_cert(ca),
        "web": certs.client_cert(ca, "mtls-web"),
        "svc": certs.client_cert(None, "mtls-svc"),  # self-signed
        "stranger": certs.client_cert(ca, "somebody-else"),
        "other_ca": certs.make_ca("Another CA"),
    }


@pytest.fixture(scope="module")
def op_config(pki, tmp_path_factory):
    return provider_config(pki, tmp_path_factory.mktemp("mtls"))


def _ec_xy(issued: certs.Issued) -> dict[str, str]:
    import jwt

    jwk = jwt.algorithms.ECAlgorithm.to_jwk(issued.key.public_key(), as_dict=True)
    return {"x": jwk["x"], "y": jwk["y"]}


def entry(op, pki, **fields):
    return {
        "name": "mTLS API",
        "slug": "mtls-api",
        "base_url": f"{op.issuer}/_test/",
        "grant_type": "authorization_code",
        "authorization_url": op.authorization_url,
        "access_token_url": op.token_url,
        "client_id": "mtls-web",
        "scopes": "openid offline_access",
        "client_authentication": "tls_client_auth",
        "tls_client_certificate": {"env": "DATASOURCE_SECRET_CERT"},
        "tls_client_key": {"env": "DATASOURCE_SECRET_KEY"},
        "certificate_bound_tokens": True,
        "tls_ca_bundle": pki["ca"].cert_pem,
        **fields,
    }


def environ(client: certs.Issued) -> dict[str, str]:
    return {"DATASOURCE_SECRET_CERT": client.cert_pem, "DATASOURCE_SECRET_KEY": client.key_pem}


class LaneCalls:
    """On the ASGI path, proof that the fast lane served the test's proxy calls itself."""

    def __init__(self, serving: str) -> None:
        self.serving = serving
        self.served, self.handed_over = LANE.served, dict(LANE.handed_over)

    def assert_served(self, calls: int, **handed_over: int) -> None:
        """``calls`` served by the lane, and the others handed to the view for these reasons."""
        if self.serving == "asgi":
            assert LANE.served - self.served == calls
            assert {
                reason: count - self.handed_over.get(reason, 0)
                for reason, count in LANE.handed_over.items()
                if count != self.handed_over.get(reason, 0)
            } == handed_over


def resource_without_certificate(op, access_token: str) -> requests.Response:
    return requests.get(
        op.resource_url,
        headers={"Authorization": f"Bearer {access_token}"},
        verify=op.verify,
        timeout=10,
    )


def test_tls_client_auth_code_flow_refresh_and_bound_token_through_the_proxy(
    op, pki, staff_client, serving
):
    import_datasources([entry(op, pki)], environ=environ(pki["web"]))
    datasource = Datasource.objects.get(slug="mtls-api")
    exported = export_datasources()[0]
    assert exported["certificate_bound_tokens"] is True
    assert exported["tls_ca_bundle"] == pki["ca"].cert_pem  # public: a CA certificate
    assert "PRIVATE KEY" not in json.dumps(exported)
    assert pki["web"].cert_pem not in json.dumps(exported)

    token = authorized_token(staff_client, op, datasource)
    assert token.status == TokenStatus.ACTIVE, token.last_error
    (exchange,) = [e for e in op.requests("token") if e["status"] == 200]
    assert exchange["grant_type"] == "authorization_code"
    assert exchange["client_auth"] == "tls_client_auth"

    # Bound to the certificate (cnf.x5t#S256, introspected with the client's certificate) …
    assert op.introspect(
        token.access_token,
        client_id="mtls-web",
        client_certificate=(pki["web"].cert_pem, pki["web"].key_pem),
    )["cnf"] == {"x5t#S256": pki["web"].thumbprint}
    # … so the resource server refuses the token without the certificate …
    refused = resource_without_certificate(op, token.access_token)
    assert refused.status_code == 401 and "x5t#S256" in refused.text
    # … and accepts it through the proxy, which presents the certificate.
    _, key = create_api_key("app")
    api = Client(HTTP_AUTHORIZATION=f"Api-Key {key}")
    lane = LaneCalls(serving)
    response = api.get(f"/api/v1/datasources/{datasource.slug}/proxy/resource")
    assert response.status_code == 200, response.content
    assert response.json()["sub"] == TEST_USER and response.json()["client_id"] == "mtls-web"

    # Refresh: authenticated by the certificate again; the new token is bound too.
    op.reset()
    assert tokens.refresh_token(datasource, force=True).outcome == "refreshed"
    refreshed = Token.objects.get(pk=token.pk)
    assert refreshed.access_token != token.access_token
    (refresh,) = op.requests("token")
    assert refresh["grant_type"] == "refresh_token" and refresh["status"] == 200
    assert refresh["client_auth"] == "tls_client_auth"
    assert resource_without_certificate(op, refreshed.access_token).status_code == 401
    proxy_cache.forget()
    response = api.get(f"/api/v1/datasources/{datasource.slug}/proxy/resource")
    assert response.status_code == 200 and response.json()["sub"] == TEST_USER
    lane.assert_served(2)
    # userinfo checks the binding as well
    with Datasource.objects.get(pk=datasource.pk).session() as session:
        session.datasource.base_url = f"{op.issuer}/"
        assert session.get("me").json()["sub"] == TEST_USER


def test_self_signed_client_credentials_proxy_client_and_test(op, pki, staff_client, serving):
    import_datasources(
        [
            entry(
                op,
                pki,
                slug="mtls-svc",
                client_id="mtls-svc",
                grant_type="client_credentials",
                client_authentication="self_signed_tls_client_auth",
                scopes="api",
                authorization_url="",
            )
        ],
        environ=environ(pki["svc"]),
    )
    datasource = Datasource.objects.get(slug="mtls-svc")
    _, key = create_api_key("app")
    api = Client(HTTP_AUTHORIZATION=f"Api-Key {key}")
    lane = LaneCalls(serving)
    response = api.get("/api/v1/datasources/mtls-svc/proxy/resource")
    assert response.status_code == 200, response.content
    assert response.json()["client_id"] == "mtls-svc"
    (fetch,) = op.requests("token")
    assert fetch["grant_type"] == "client_credentials" and fetch["status"] == 200
    assert fetch["client_auth"] == "self_signed_tls_client_auth"
    token = Token.objects.get(datasource=datasource, user=None)
    assert resource_without_certificate(op, token.access_token).status_code == 401

    # A new client-credentials token (what the sweep does before expiry), certificate again.
    op.reset()
    assert tokens.refresh_token(datasource, force=True).outcome == "refreshed"
    renewed = Token.objects.get(pk=token.pk)
    assert renewed.access_token != token.access_token
    (fetch,) = op.requests("token")
    assert fetch["status"] == 200 and fetch["client_auth"] == "self_signed_tls_client_auth"
    assert resource_without_certificate(op, renewed.access_token).status_code == 401
    proxy_cache.forget()
    assert api.get("/api/v1/datasources/mtls-svc/proxy/resource").status_code == 200
    # The first call had no token yet (the view fetched it); the second was the lane's.
    lane.assert_served(1, token=1)

    with datasource.session() as session:
        assert session.get("resource").json()["client_id"] == "mtls-svc"
        with pytest.raises(ValueError, match="always verified"):
            session.get("resource", verify=False)
    test = staff_client.post(
        f"/admin/datasources/datasource/{datasource.pk}/test/",
        {"method": "GET", "path": "resource"},
    )
    assert test.status_code == 200 and b"mtls-svc" in test.content
    assert b"BEGIN" not in test.content


def test_an_untrusted_server_certificate_stops_the_call_before_anything_is_sent(op, pki):
    import_datasources(
        [
            entry(
                op,
                pki,
                slug="untrusted",
                client_id="mtls-svc",
                grant_type="client_credentials",
                client_authentication="self_signed_tls_client_auth",
                scopes="api",
                authorization_url="",
                tls_ca_bundle=pki["other_ca"].cert_pem,  # not the CA that issued the server's
            )
        ],
        environ=environ(pki["svc"]),
    )
    datasource = Datasource.objects.get(slug="untrusted")
    result = tokens.refresh_token(datasource, force=True)
    assert result.outcome == "transient"
    assert "certificate is not trusted" in result.error and "Trusted CA" in result.error
    assert op.requests("token") == []  # no request reached the server
    _, key = create_api_key("app")
    response = Client(HTTP_AUTHORIZATION=f"Api-Key {key}").get(
        "/api/v1/datasources/untrusted/proxy/resource"
    )
    assert response.status_code == 503 and "not trusted" in response.json()["detail"]
    assert op.requests() == []


def test_a_certificate_the_server_does_not_know_is_a_clear_error(op, pki):
    import_datasources(
        [
            entry(
                op,
                pki,
                slug="stranger",
                client_id="mtls-svc",
                grant_type="client_credentials",
                client_authentication="self_signed_tls_client_auth",
                scopes="api",
                authorization_url="",
            )
        ],
        environ=environ(pki["stranger"]),
    )
    datasource = Datasource.objects.get(slug="stranger")
    result = tokens.refresh_token(datasource, force=True)
    token = Token.objects.get(datasource=datasource, user=None)
    assert result.outcome == "reauthorization", result
    assert "invalid_client" in token.last_error
    assert "CN=somebody-else" in token.last_error, token.last_error
    (call,) = op.requests("token")
    assert call["status"] == 401 and call["error"] == "invalid_client"


def test_the_proxy_refuses_an_api_whose_certificate_is_not_trusted(op, pki, serving):
    from datetime import timedelta

    from django.utils import timezone

    import_datasources(
        [
            entry(
                op,
                pki,
                slug="untrusted-api",
                client_id="mtls-svc",
                grant_type="client_credentials",
                client_authentication="self_signed_tls_client_auth",
                scopes="api",
                authorization_url="",
                tls_ca_bundle="",  # only the system's CAs: the test CA is not among them
            )
        ],
        environ=environ(pki["svc"]),
    )
    datasource = Datasource.objects.get(slug="untrusted-api")
    # A valid-looking token, so that the proxy goes straight to the API.
    Token.objects.filter(datasource=datasource).update(
        access_token="stored-token-value",
        token_type="Bearer",
        status=TokenStatus.ACTIVE,
        expires_at=timezone.now() + timedelta(hours=1),
        refresh_due_at=timezone.now() + timedelta(hours=1),
    )
    _, key = create_api_key("app")
    lane = LaneCalls(serving)
    response = Client(HTTP_AUTHORIZATION=f"Api-Key {key}").get(
        "/api/v1/datasources/untrusted-api/proxy/resource"
    )
    lane.assert_served(1)
    assert response.status_code == 502
    assert response.json()["error"] == "upstream_tls_failed"
    assert "not trusted" in response.json()["detail"]
    assert op.requests() == []  # nothing reached the server
    with datasource.session() as session, pytest.raises(requests.exceptions.SSLError):
        session.get("resource")
    assert op.requests() == []


def test_discovery_trusts_the_datasources_private_ca(op, pki):
    from datasources.authserver import oauth

    with pytest.raises(oauth.DiscoveryError, match=r"not trusted.*Trusted CA certificates"):
        oauth.discover(op.issuer)
    metadata = oauth.discover(op.issuer, ca_bundle=pki["ca"].cert_pem)
    assert metadata.token_endpoint == op.token_url
    assert metadata.tls_client_certificate_bound_access_tokens is True
    assert "self_signed_tls_client_auth" in metadata.token_endpoint_auth_methods_supported


def test_admin_form_journey_and_clearing_the_pair(op, pki, staff_client):
    from .oidcjourney import authorize_in_admin, form_data, form_errors, post_form

    data = form_data(
        op,
        slug="mtls-admin",
        base_url=f"{op.issuer}/_test/",
        client_id="mtls-web",
        client_authentication="tls_client_auth",
        tls_client_certificate=pki["web"].cert_pem,
        tls_client_key=pki["web"].key_pem,
        certificate_bound_tokens="on",
        tls_ca_bundle=pki["ca"].cert_pem,
    )
    response = post_form(staff_client, data)
    assert response.status_code == 302, form_errors(response)
    datasource = Datasource.objects.get(slug="mtls-admin")
    authorize_in_admin(staff_client, op, datasource)
    token = Token.objects.get(datasource=datasource, user=None)
    assert resource_without_certificate(op, token.access_token).status_code == 401
    _, key = create_api_key("app")
    api = Client(HTTP_AUTHORIZATION=f"Api-Key {key}")
    assert api.get("/api/v1/datasources/mtls-admin/proxy/resource").json()["sub"] == TEST_USER

    # The change page shows the stored certificate by subject only; blank keeps the pair.
    page = staff_client.get(datasource.get_admin_url())
    assert b"CN=mtls-web" in page.content and b"PRIVATE KEY-----\nMI" not in page.content
    assert pki["web"].key_pem.splitlines()[1].encode() not in page.content
    keep = {**data, "tls_client_certificate": "", "tls_client_key": "", "client_secret": ""}
    assert post_form(staff_client, keep, datasource).status_code == 302
    datasource.refresh_from_db()
    assert datasource.tls_client_key == pki["web"].key_pem.strip()

    # A key of another certificate is refused, naming the certificate; nothing changes.
    wrong = {**keep, "tls_client_certificate": pki["web"].cert_pem}
    wrong["tls_client_key"] = pki["stranger"].key_pem
    errors = form_errors(post_form(staff_client, wrong, datasource))
    assert "does not belong" in " ".join(errors["tls_client_certificate"])
    datasource.refresh_from_db()
    assert datasource.tls_client_key == pki["web"].key_pem.strip()

    # Removing the pair while mutual TLS still needs it is refused; with basic auth it is done.
    cleared = {**keep, "clear_tls_client_certificate": "on"}
    cleared.pop("certificate_bound_tokens")
    errors = form_errors(post_form(staff_client, cleared, datasource))
    assert "needs a client certificate" in " ".join(errors["client_authentication"])
    cleared.update(client_authentication="basic", client_secret="a-secret-for-basic-auth")
    assert post_form(staff_client, cleared, datasource).status_code == 302
    datasource.refresh_from_db()
    assert datasource.tls_client_certificate is None and datasource.tls_client_key is None


def test_deleted_datasource_tokens_revoked_with_the_certificate(op, pki, staff_client):
    """Deleting revokes in a worker from an encrypted payload: it carries the certificate,
    the key and the CA bundle too."""
    from datasources.admin import jobs as adminjobs

    import_datasources(
        [entry(op, pki, slug="mtls-revoke", revocation_url=op.revocation_url)],
        environ=environ(pki["web"]),
    )
    datasource = Datasource.objects.get(slug="mtls-revoke")
    authorized_token(staff_client, op, datasource)
    payload = adminjobs.revocation_payload(datasource)
    assert pki["web"].key_pem.splitlines()[1] not in payload
    datasource.delete()
    op.reset()
    assert adminjobs.revoke_from_payload(payload) == []
    revocations = op.requests("revocation")
    assert len(revocations) == 2 and all(
        (e["client_auth"], e["status"]) == ("tls_client_auth", 200) for e in revocations
    )
