"""The JWT bearer grant (RFC 7523 §2.1), e.g. a Google service account, against panva's
oidc-provider with a registered ``urn:ietf:params:oauth:grant-type:jwt-bearer`` grant that
verifies the assertion's signature, ``aud``, ``exp`` and ``jti``: the key file imported in the
admin or by ``import_datasources``, tokens fetched with nobody in the loop, renewed with a new
assertion, proxy calls accepted by the provider's userinfo endpoint."""

from __future__ import annotations

import io
import json

import jwt
import pytest
from django.core.management import CommandError, call_command

from datasources import tokens
from datasources.models import Datasource, Token
from datasources.ops import config_io

from .oidcjourney import form_data, form_errors, jwks, new_key, post_form, proxy_client, proxy_url
from .oidcprovider import JWT_BEARER

pytestmark = pytest.mark.django_db

SA_EMAIL = "reporting@project.iam.example"
SA_KEY, SA_PEM = new_key("rsa")
STRANGER_KEY, STRANGER_PEM = new_key("rsa")


@pytest.fixture(scope="module")
def op_config():
    return {
        "clients": [
            {
                "client_id": SA_EMAIL,
                "token_endpoint_auth_method": "none",
                "grant_types": [JWT_BEARER],
                "response_types": [],
                "redirect_uris": [],
                "jwks": jwks(SA_KEY, "sa-key-1"),
                "scope": "openid email api",
            }
        ],
        "jwtBearer": {"maxLifetime": 300},
        "ttl": {"AccessToken": 300},
    }


def key_file(op, **overrides) -> str:
    """A key file in Google's service-account format."""
    data = {
        "type": "service_account",
        "project_id": "project",
        "private_key_id": "sa-key-1",
        "private_key": SA_PEM,
        "client_email": SA_EMAIL,
        "client_id": "1234567890",
        "token_uri": op.token_url,
    }
    data.update(overrides)
    return json.dumps(data)


def jwt_bearer_form(op, **fields):
    defaults = {
        "grant_type": "jwt_bearer",
        "authorization_url": "",
        "client_authentication": "body",
        "access_token_url": "",
        "scopes": "openid email",
        "use_pkce": "",
    }
    return form_data(op, **{**defaults, **fields})


def test_key_file_pasted_in_the_admin_fetches_a_token_and_the_proxy_works(
    op, staff_client, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        response = post_form(
            staff_client,
            jwt_bearer_form(op, service_account_key=key_file(op), assertion_subject="ada"),
        )
    assert response.status_code == 302, form_errors(response)
    datasource = Datasource.objects.get(slug="enterprise")
    # The key file filled the fields it names; its private key is stored, encrypted.
    assert datasource.client_id == SA_EMAIL
    assert datasource.private_key_id == "sa-key-1"
    assert datasource.access_token_url == op.token_url
    assert datasource.private_key.strip() == SA_PEM.strip()
    token = Token.objects.get(datasource=datasource)
    assert token.status == "active" and not token.refresh_token

    answer = proxy_client(datasource).get(proxy_url(datasource, "me"))
    assert answer.status_code == 200, answer.content
    assert answer.json()["sub"] == "ada"  # acting for the user (domain-wide delegation)

    page = staff_client.get(datasource.get_admin_url()).content.decode()
    assert SA_PEM.splitlines()[1] not in page

    # Renewal: a new assertion, not a refresh token.
    assert tokens.refresh_token(datasource, force=True).outcome == "refreshed"
    calls = op.requests("token")
    assert [(e["grant_type"], e["client_auth"], e["status"]) for e in calls] == [
        (JWT_BEARER, "none", 200),
        (JWT_BEARER, "none", 200),
    ]
    log = op.log()
    assert log["counters"]["token"] == {JWT_BEARER: 2} and log["counters"]["userinfo"] == 1


def test_import_reads_the_key_file_from_the_import_directory(op, tmp_path):
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "sa.json").write_text(key_file(op))
    entry = {
        "name": "Reports",
        "slug": "reports",
        "base_url": f"{op.issuer}/",
        "grant_type": "jwt_bearer",
        "access_token_url": "https://replaced.by.the.key.file/token",
        "client_id": "replaced",
        "scopes": "openid",
        "service_account_key": {"file": "keys/sa.json"},
    }
    (tmp_path / "datasources.json").write_text(json.dumps([entry]))
    call_command("import_datasources", str(tmp_path / "datasources.json"), stdout=io.StringIO())
    datasource = Datasource.objects.get(slug="reports")
    assert datasource.client_id == SA_EMAIL and datasource.access_token_url == op.token_url

    access = tokens.get_access_token(datasource)
    answer = proxy_client(datasource).get(proxy_url(datasource, "me"))
    assert answer.status_code == 200 and answer.json()["sub"] == SA_EMAIL
    (call,) = op.requests("token")
    claims = jwt.decode(call["assertion"], options={"verify_signature": False})
    assert claims["iss"] == SA_EMAIL and claims["aud"] == op.token_url and "sub" not in claims
    assert claims["exp"] - claims["iat"] <= 60 and claims["scope"] == "openid"
    assert access

    exported = json.dumps(config_io.export_datasources())
    assert SA_PEM.splitlines()[1] not in exported and "service_account_key" not in exported


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ("../outside.json", "outside the import file's directory"),
        ("missing.json", "is not a file"),
    ],
)
def test_import_refuses_key_files_outside_its_directory(op, tmp_path, reference, message):
    (tmp_path / "outside.json").write_text(key_file(op))
    inner = tmp_path / "inner"
    inner.mkdir()
    entry = {
        "name": "R",
        "slug": "r",
        "base_url": f"{op.issuer}/",
        "grant_type": "jwt_bearer",
        "access_token_url": op.token_url,
        "client_id": SA_EMAIL,
        "service_account_key": {"file": reference},
    }
    (inner / "d.json").write_text(json.dumps([entry]))
    with pytest.raises(CommandError, match=message):
        call_command("import_datasources", str(inner / "d.json"), stdout=io.StringIO())
    assert not Datasource.objects.exists()
    with pytest.raises(config_io.ImportFailed, match="standard input"):
        config_io.import_datasources([entry], base_dir=None)


def test_private_key_from_the_environment(op):
    entry = {
        "name": "R",
        "slug": "r",
        "base_url": f"{op.issuer}/",
        "grant_type": "jwt_bearer",
        "access_token_url": op.token_url,
        "client_id": SA_EMAIL,
        "private_key_id": "sa-key-1",
        "scopes": "openid",
        "private_key": {"env": "DATASOURCE_SECRET_SA_KEY"},
    }
    config_io.import_datasources([entry], environ={"DATASOURCE_SECRET_SA_KEY": SA_PEM})
    datasource = Datasource.objects.get(slug="r")
    assert tokens.refresh_token(datasource, force=True).outcome == "refreshed"
    assert op.log()["counters"]["token"] == {JWT_BEARER: 1}


def test_a_key_the_provider_does_not_know_is_refused_and_said(op, staff_client):
    from .conftest import make_datasource

    datasource = make_datasource(
        slug="stranger",
        base_url=f"{op.issuer}/",
        grant_type="jwt_bearer",
        authorization_url="",
        access_token_url=op.token_url,
        client_id=SA_EMAIL,
        client_secret=None,
        private_key=STRANGER_PEM,
        private_key_id="sa-key-1",
        scopes="openid",
    )
    result = tokens.refresh_token(datasource, force=True)
    assert result.outcome == "reauthorization", result
    token = Token.objects.get(datasource=datasource)
    assert token.status == "needs_reauthorization"
    assert "rejected the JWT bearer assertion" in token.last_error
    assert "assertion rejected" in token.last_error  # what the server said
    page = staff_client.get(datasource.get_admin_url()).content.decode()
    assert "refused the signed assertion of the service account" in page
    assert op.requests("token")[0]["error"] == "invalid_grant"


def test_key_file_problems_are_named_in_the_form(op, staff_client):
    for text, message in [
        ("{not json", "not JSON"),
        (json.dumps({"private_key": SA_PEM}), "no client_email"),
        (
            key_file(
                op, private_key="-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----"
            ),
            "corrupt or incomplete",
        ),
    ]:
        response = post_form(staff_client, jwt_bearer_form(op, service_account_key=text))
        errors = form_errors(response)
        assert any(message in e for e in errors.get("service_account_key", [])), errors
        assert SA_PEM.splitlines()[1] not in response.content.decode()
    response = post_form(
        staff_client, jwt_bearer_form(op, access_token_url=op.token_url, client_id="x")
    )
    assert "The JWT bearer grant needs a private key" in str(form_errors(response))
    assert not Datasource.objects.exists()


def test_key_file_uploaded(op, staff_client):
    from django.core.files.uploadedfile import SimpleUploadedFile

    upload = SimpleUploadedFile("sa.json", key_file(op).encode(), content_type="application/json")
    response = post_form(staff_client, jwt_bearer_form(op, service_account_key_file=upload))
    assert response.status_code == 302, form_errors(response)
    datasource = Datasource.objects.get(slug="enterprise")
    assert (datasource.client_id, datasource.private_key_id) == (SA_EMAIL, "sa-key-1")
    assert tokens.refresh_token(datasource, force=True).outcome == "refreshed"
