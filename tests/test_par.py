"""Pushed authorization requests (RFC 9126) against panva's oidc-provider requiring them:
discovery fills the PAR endpoint, the authorize start pushes the request with a client
assertion and redirects with ``client_id`` + ``request_uri`` only; refusals are explained."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest
from django.contrib.messages import get_messages

from datasources.models import Datasource, Token

from .conftest import CALLBACK_PATH
from .oidcjourney import (
    REDIRECT_URI,
    authorize_in_admin,
    form_data,
    form_errors,
    jwks,
    new_key,
    post_form,
    proxy_client,
    proxy_url,
)
from .oidcprovider import callback_query

pytestmark = pytest.mark.django_db

KEY, PEM = new_key("ec")
_, WRONG_PEM = new_key("ec")


@pytest.fixture(scope="module")
def op_config():
    return {
        "clients": [
            {
                "client_id": "par-web",
                "token_endpoint_auth_method": "private_key_jwt",
                "jwks": jwks(KEY, "par-1"),
                "redirect_uris": [REDIRECT_URI],
                "grant_types": ["authorization_code", "refresh_token"],
                "response_types": ["code"],
                "scope": "openid offline_access",
            }
        ],
        "clientAuthMethods": ["none", "private_key_jwt"],
        "features": {"par": {"enabled": True, "require": True}},
    }


def discovered_form(op, **fields):
    defaults = {
        "issuer": op.issuer,
        "discover": "on",
        "authorization_url": "",
        "access_token_url": "",
        "client_id": "par-web",
        "private_key": PEM,
        "private_key_id": "par-1",
    }
    return form_data(op, **{**defaults, **fields})


def test_discovery_then_pushed_authorization_and_proxy(op, staff_client):
    response = post_form(staff_client, discovered_form(op))
    assert response.status_code == 302, form_errors(response)
    datasource = Datasource.objects.get(slug="enterprise")
    assert datasource.pushed_authorization_request_url == op.par_url
    assert datasource.require_pushed_authorization_requests is True
    assert datasource.token_endpoint_auth_methods_supported == "none private_key_jwt"

    provider_url = authorize_in_admin(staff_client, op, datasource)
    # The browser carried only a reference: no state, PKCE challenge, scope or redirect URI.
    assert set(parse_qs(urlsplit(provider_url).query)) == {"client_id", "request_uri"}
    (pushed,) = op.requests("par")
    assert pushed["client_auth"] == "private_key_jwt" and pushed["status"] == 201
    assert [e["grant_type"] for e in op.requests("token")] == ["authorization_code"]
    answer = proxy_client(datasource).get(proxy_url(datasource, "me"))
    assert answer.status_code == 200 and answer.json()["sub"] == "test-user"


def test_discovery_names_the_supported_client_authentication(op, staff_client):
    response = post_form(staff_client, discovered_form(op, client_authentication="basic"))
    errors = form_errors(response)["client_authentication"]
    assert "client_secret_basic" in errors[0] and "none, private_key_jwt" in errors[0]


def test_par_required_but_endpoint_removed(op, staff_client):
    post_form(staff_client, discovered_form(op))
    datasource = Datasource.objects.get(slug="enterprise")
    fields = {
        "issuer": op.issuer,
        "client_id": "par-web",
        "private_key_id": "par-1",
        "require_pushed_authorization_requests": "on",
        "pushed_authorization_request_url": "",
    }
    response = post_form(staff_client, form_data(op, **fields), datasource)
    assert "requires pushed authorization requests" in str(form_errors(response))

    # The builder insists (unticks "server requires PAR"): the provider refuses the plain
    # request and the admin says why and what to do.
    fields.pop("require_pushed_authorization_requests")
    response = post_form(staff_client, form_data(op, **fields), datasource)
    assert response.status_code == 302, form_errors(response)
    start = staff_client.get(datasource.get_authorize_url())
    callback = op.consent(start["Location"], REDIRECT_URI)
    response = staff_client.get(CALLBACK_PATH, callback_query(callback))
    text = " ".join(str(m) for m in get_messages(response.wsgi_request))
    assert "Pushed Authorization Request must be used" in text
    assert "enter its PAR endpoint" in text
    assert Token.objects.get(datasource=datasource).status == "not_authorized"
    assert op.requests("par") == []


def test_refused_push_is_explained_and_nothing_redirects(op, staff_client):
    post_form(staff_client, discovered_form(op, private_key=WRONG_PEM))
    datasource = Datasource.objects.get(slug="enterprise")
    start = staff_client.get(datasource.get_authorize_url())
    assert start["Location"] == datasource.get_admin_url()  # back to the admin, not the provider
    text = " ".join(str(m) for m in get_messages(start.wsgi_request))
    assert "Cannot start the authorization" in text
    assert "rejected the client assertion (private_key_jwt)" in text
    (pushed,) = op.requests("par")
    assert pushed["status"] == 401 and pushed["error"] == "invalid_client"
