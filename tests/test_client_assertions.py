"""private_key_jwt and client_secret_jwt (RFC 7523 §2.2, OpenID Connect Core §9) against panva's
oidc-provider: the builder's journey in the admin, every token-endpoint call authenticated with
a fresh assertion (asserted at the server), proxy calls accepted by the resource server, and
the failures a builder meets (wrong key, corrupt key, key/algorithm mismatch)."""

from __future__ import annotations

import json
import re
from html import unescape

import jwt
import pytest
import requests

from datasources import tokens
from datasources.models import Datasource, Token
from datasources.ops import config_io
from datasources.security import jose

from .oidcjourney import (
    REDIRECT_URI,
    assertions,
    authorize_in_admin,
    form_data,
    form_errors,
    jwks,
    new_key,
    post_form,
    proxy_client,
    proxy_url,
)
from .oidcprovider import start_oidc_provider

pytestmark = pytest.mark.django_db

EC_KEY, EC_PEM = new_key("ec")
RSA_KEY, RSA_PEM = new_key("rsa")
OTHER_KEY, OTHER_PEM = new_key("ec")
SECRET = "client-secret-for-hs256-at-least-32-bytes-long"


@pytest.fixture(scope="module")
def op_config():
    return {
        "clients": [
            {
                "client_id": "pkjwt-web",
                "token_endpoint_auth_method": "private_key_jwt",
                "token_endpoint_auth_signing_alg": "ES256",
                "jwks": jwks(EC_KEY, "ec-1"),
                "redirect_uris": [REDIRECT_URI],
                "grant_types": ["authorization_code", "refresh_token"],
                "response_types": ["code"],
                "scope": "openid offline_access",
            },
            {
                "client_id": "pkjwt-svc",
                "token_endpoint_auth_method": "private_key_jwt",
                "jwks": jwks(RSA_KEY, "rsa-1"),
                "grant_types": ["client_credentials"],
                "response_types": [],
                "redirect_uris": [],
                "scope": "api",
            },
            {
                "client_id": "csjwt-svc",
                "client_secret": SECRET,
                "token_endpoint_auth_method": "client_secret_jwt",
                "grant_types": ["client_credentials"],
                "response_types": [],
                "redirect_uris": [],
                "scope": "api",
            },
        ],
        "ttl": {"AccessToken": 300, "ClientCredentials": 300},
    }


def test_private_key_jwt_code_flow_refresh_proxy_and_revocation(op, staff_client):
    response = post_form(
        staff_client,
        form_data(
            op,
            client_id="pkjwt-web",
            private_key=EC_PEM,
            private_key_id="ec-1",
            revocation_url=op.revocation_url,
        ),
    )
    assert response.status_code == 302, form_errors(response)
    datasource = Datasource.objects.get(slug="enterprise")
    assert datasource.private_key.strip() == EC_PEM.strip()

    authorize_in_admin(staff_client, op, datasource)
    first = Token.objects.get(datasource=datasource).refresh_token
    result = tokens.refresh_token(datasource, force=True)
    assert result.outcome == "refreshed", result
    assert Token.objects.get(datasource=datasource).refresh_token != first  # rotated

    answer = proxy_client(datasource).get(proxy_url(datasource, "me"))
    assert answer.status_code == 200, answer.content
    assert answer.json()["sub"] == "test-user"  # the provider's userinfo accepted the token

    token_calls = op.requests("token")
    assert [(e["grant_type"], e["client_auth"], e["status"]) for e in token_calls] == [
        ("authorization_code", "private_key_jwt", 200),
        ("refresh_token", "private_key_jwt", 200),
    ]
    sent = assertions(op)
    assert all(a["iss"] == a["sub"] == "pkjwt-web" for a in sent)
    assert all(a["aud"] == op.token_url and 0 < a["exp"] - a["iat"] <= 60 for a in sent)
    assert len({a["jti"] for a in sent}) == 2
    assert jwt.get_unverified_header(token_calls[0]["client_assertion"])["kid"] == "ec-1"

    # Disconnect revokes with a client assertion too.
    staff_client.post(f"/admin/datasources/datasource/{datasource.pk}/disconnect/")
    revocations = op.requests("revocation")
    assert revocations and all(
        e["client_auth"] == "private_key_jwt" and e["status"] == 200 for e in revocations
    )


def test_private_key_never_leaves_the_database(op, staff_client):
    post_form(
        staff_client,
        form_data(op, client_id="pkjwt-web", private_key=EC_PEM, private_key_id="ec-1"),
    )
    datasource = Datasource.objects.get(slug="enterprise")
    body = EC_PEM.splitlines()[1]
    page = staff_client.get(datasource.get_admin_url()).content.decode()
    assert body not in page and "A private key is stored" in page
    public = json.loads(unescape(re.search(r'datasource-public-jwk">(.*?)</pre>', page, re.S)[1]))
    assert public["keys"][0] == {**jose.public_jwk(EC_KEY, kid="ec-1", alg="ES256")}
    assert "d" not in public["keys"][0]
    exported = json.dumps(config_io.export_datasources())
    assert body not in exported and "private_key_id" in exported
    assert body not in repr(datasource) and body not in str(datasource)
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT private_key FROM datasources_datasource")
        stored = cursor.fetchone()[0]
    stored = stored.encode() if isinstance(stored, str) else bytes(stored)
    assert body.encode() not in stored  # encrypted at rest


def test_private_key_jwt_client_credentials_fetched_on_save(
    op, staff_client, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        response = post_form(
            staff_client,
            form_data(
                op,
                grant_type="client_credentials",
                authorization_url="",
                client_id="pkjwt-svc",
                private_key=RSA_PEM,
                private_key_id="rsa-1",
                signing_algorithm="PS256",
                scopes="api",
                use_pkce="",
            ),
        )
    assert response.status_code == 302, form_errors(response)
    datasource = Datasource.objects.get(slug="enterprise")
    assert Token.objects.get(datasource=datasource).status == "active"
    answer = proxy_client(datasource).get(proxy_url(datasource, "_test/resource/items"))
    assert answer.status_code == 200 and answer.json()["client_id"] == "pkjwt-svc"
    (call,) = op.requests("token")
    assert (call["grant_type"], call["client_auth"]) == ("client_credentials", "private_key_jwt")
    assert jwt.get_unverified_header(call["client_assertion"])["alg"] == "PS256"


def test_client_secret_jwt_and_issuer_audience(op, staff_client):
    from .conftest import make_datasource

    datasource = make_datasource(
        slug="hs",
        base_url=f"{op.issuer}/",
        grant_type="client_credentials",
        authorization_url="",
        access_token_url=op.token_url,
        issuer=op.issuer,
        client_id="csjwt-svc",
        client_secret=SECRET,
        client_authentication="client_secret_jwt",
        assertion_audience="issuer",
        scopes="api",
    )
    assert tokens.refresh_token(datasource, force=True).outcome == "refreshed"
    assert tokens.refresh_token(datasource, force=True).outcome == "refreshed"  # new jti
    calls = op.requests("token")
    assert [e["client_auth"] for e in calls] == ["client_secret_jwt", "client_secret_jwt"]
    sent = assertions(op)
    assert [a["aud"] for a in sent] == [op.issuer, op.issuer]
    assert sent[0]["jti"] != sent[1]["jti"]
    assert jwt.get_unverified_header(calls[0]["client_assertion"])["alg"] == "HS256"
    # The server refuses an assertion seen before: replaying ours fails, so each call's
    # success above proves each assertion was new.
    replay = requests.post(
        op.token_url,
        data={
            "grant_type": "client_credentials",
            "client_assertion_type": jose.CLIENT_ASSERTION_TYPE,
            "client_assertion": calls[0]["client_assertion"],
        },
        timeout=10,
    )
    assert replay.status_code == 401 and replay.json()["error"] == "invalid_client"


def test_wrong_key_is_explained(op, staff_client):
    from .conftest import make_datasource

    datasource = make_datasource(
        slug="wrong",
        base_url=f"{op.issuer}/",
        grant_type="client_credentials",
        authorization_url="",
        access_token_url=op.token_url,
        client_id="pkjwt-svc",
        client_secret=None,
        client_authentication="private_key_jwt",
        private_key=OTHER_PEM,  # not the key registered for pkjwt-svc
        private_key_id="rsa-1",
        scopes="api",
    )
    result = tokens.refresh_token(datasource, force=True)
    assert result.outcome == "reauthorization", result
    token = Token.objects.get(datasource=datasource)
    assert token.status == "needs_reauthorization"
    assert "rejected the client assertion (private_key_jwt)" in token.last_error
    assert "key ID" in token.last_error
    page = staff_client.get(datasource.get_admin_url()).content.decode()
    assert "check that the key ID" in unescape(page)
    assert op.requests("token")[0]["error"] == "invalid_client"


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"private_key": "not a key"}, "private_key", "not a PEM private key"),
        (
            {"private_key": EC_PEM.replace(EC_PEM.splitlines()[2], "AAAA" * 16)},
            "private_key",
            "corrupt or incomplete",
        ),
        (
            {"private_key": jose.public_pem(EC_KEY)},
            "private_key",
            "public key or certificate",
        ),
        ({"private_key": RSA_PEM, "signing_algorithm": "ES256"}, "signing_algorithm", "RSA key"),
        ({"private_key": EC_PEM, "signing_algorithm": "RS256"}, "signing_algorithm", "EC key"),
        ({}, "private_key", "private_key_jwt needs a private key"),
        (
            {"private_key": EC_PEM, "signing_certificate": "garbage"},
            "signing_certificate",
            "not a PEM X.509 certificate",
        ),
        (
            {
                "private_key": EC_PEM,
                "signing_certificate": jose.self_signed_certificate(OTHER_KEY, "x"),
            },
            "signing_certificate",
            "not for this private key",
        ),
    ],
)
def test_form_refuses_unusable_keys_naming_the_cause(staff_client, fields, field, message):
    response = post_form(staff_client, form_data(None, client_id="c", **fields))
    assert response.status_code == 200
    errors = form_errors(response)
    assert any(message in text for text in errors.get(field, [])), errors
    assert not Datasource.objects.exists()
    if fields.get("private_key", "").startswith("-----BEGIN PRIVATE"):
        # Kept server-side for the next submission, never echoed into the page.
        assert fields["private_key"].splitlines()[1] not in response.content.decode()


def test_generated_key_pair_registered_at_the_provider(staff_client):
    """Generate in the admin, register the public JWK shown at a provider, get tokens."""
    from .conftest import make_datasource

    datasource = make_datasource(
        slug="gen",
        grant_type="client_credentials",
        authorization_url="",
        client_id="generated",
        client_secret=None,
        client_authentication="private_key_jwt",
        private_key=EC_PEM,
        signing_algorithm="ES256",
        scopes="api",
    )
    response = staff_client.post(f"/admin/datasources/datasource/{datasource.pk}/generate-key/")
    assert response.status_code == 302
    datasource.refresh_from_db()
    assert datasource.private_key != EC_PEM and datasource.signing_certificate
    page = unescape(staff_client.get(datasource.get_admin_url()).content.decode())
    published = json.loads(re.search(r'datasource-public-jwk">(.*?)</pre>', page, re.S)[1])
    assert published["keys"][0]["kid"] == datasource.private_key_id
    assert "-----BEGIN CERTIFICATE-----" in page
    assert datasource.private_key.splitlines()[1] not in page

    config = {
        "clients": [
            {
                "client_id": "generated",
                "token_endpoint_auth_method": "private_key_jwt",
                "jwks": published,
                "grant_types": ["client_credentials"],
                "response_types": [],
                "redirect_uris": [],
                "scope": "api",
            }
        ]
    }
    with start_oidc_provider(config) as provider:
        Datasource.objects.filter(pk=datasource.pk).update(
            access_token_url=provider.token_url, base_url=f"{provider.issuer}/"
        )
        datasource.refresh_from_db()
        assert tokens.refresh_token(datasource, force=True).outcome == "refreshed"
        answer = proxy_client(datasource).get(proxy_url(datasource, "_test/resource"))
        assert answer.status_code == 200 and answer.json()["client_id"] == "generated"
        (call,) = provider.requests("token")
        header = jwt.get_unverified_header(call["client_assertion"])
        assert call["client_auth"] == "private_key_jwt" and header["alg"] == "ES256"
        assert header["kid"] == datasource.private_key_id
        assert header["x5t#S256"]  # the certificate's thumbprint, for Entra ID


def test_uploaded_key_and_key_kept_across_a_form_error(staff_client):
    from django.core.files.uploadedfile import SimpleUploadedFile

    upload = SimpleUploadedFile("key.pem", RSA_PEM.encode(), content_type="application/x-pem-file")
    data = form_data(None, client_id="c", base_url="not a url", private_key_file=upload)
    response = post_form(staff_client, data)
    assert "base_url" in form_errors(response)
    page = response.content.decode()
    assert RSA_PEM.splitlines()[1] not in page
    assert "The private key you gave is kept for this form" in page
    hold = re.search(r'name="key_hold" value="([^"]+)"', page)[1]
    response = post_form(staff_client, form_data(None, client_id="c", key_hold=hold))
    assert response.status_code == 302, form_errors(response)
    datasource = Datasource.objects.get(slug="enterprise")
    assert datasource.private_key.strip() == RSA_PEM.strip()

    # Clearing is explicit; a blank box keeps the stored key.
    post_form(staff_client, form_data(None, client_id="c", private_key_id="k2"), datasource)
    datasource.refresh_from_db()
    assert datasource.private_key and datasource.private_key_id == "k2"
    response = post_form(
        staff_client,
        form_data(None, client_id="c", client_authentication="basic", clear_private_key="on"),
        datasource,
    )
    assert response.status_code == 302, form_errors(response)
    datasource.refresh_from_db()
    assert datasource.private_key is None


def test_deleted_datasource_tokens_revoked_with_a_client_assertion(op, staff_client):
    """Deleting revokes in a worker from an encrypted payload: it carries the key too."""
    from datasources.admin import jobs as adminjobs

    post_form(
        staff_client,
        form_data(
            op,
            client_id="pkjwt-web",
            private_key=EC_PEM,
            private_key_id="ec-1",
            revocation_url=op.revocation_url,
        ),
    )
    datasource = Datasource.objects.get(slug="enterprise")
    authorize_in_admin(staff_client, op, datasource)
    payload = adminjobs.revocation_payload(datasource)
    assert EC_PEM.splitlines()[1] not in payload
    datasource.delete()
    assert adminjobs.revoke_from_payload(payload) == []
    revocations = op.requests("revocation")
    assert len(revocations) == 2 and all(
        (e["client_auth"], e["status"]) == ("private_key_jwt", 200) for e in revocations
    )
    assert all(a["aud"] == op.token_url for a in assertions(op, "revocation"))


def test_export_then_import_keeps_the_new_options(op):
    from .conftest import make_datasource

    make_datasource(
        slug="round",
        grant_type="client_credentials",
        authorization_url="",
        client_secret=None,
        client_authentication="private_key_jwt",
        private_key=RSA_PEM,
        private_key_id="rsa-1",
        signing_algorithm="PS256",
        signing_certificate=jose.self_signed_certificate(RSA_KEY, "round"),
        assertion_audience="endpoint",
        pushed_authorization_request_url=op.par_url,
    )
    exported = config_io.export_datasources()
    assert RSA_PEM.splitlines()[1] not in json.dumps(exported)
    Datasource.objects.all().delete()
    # The key is import-only: without it the entry is refused, naming the field.
    with pytest.raises(config_io.ImportFailed, match="private_key: private_key_jwt needs a"):
        config_io.import_datasources(exported, environ={})
    exported[0]["private_key"] = {"env": "DATASOURCE_SECRET_ROUND"}
    config_io.import_datasources(exported, environ={"DATASOURCE_SECRET_ROUND": RSA_PEM})
    restored = Datasource.objects.get(slug="round")
    assert (restored.signing_algorithm, restored.assertion_audience) == ("PS256", "endpoint")
    assert restored.pushed_authorization_request_url == op.par_url
    assert restored.private_key == RSA_PEM and restored.signing_certificate
