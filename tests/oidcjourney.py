"""The builder's journey against the oidc-provider harness (tests/oidcprovider.py): the admin
form posted with the Django test client, authorization through the admin's authorize URL and
the provider's automatic login and consent, proxy calls through an API key."""

from __future__ import annotations

from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from django.test import Client

from datasources.models import Datasource, Token
from datasources.proxy.apikeys import create_api_key
from datasources.security import jose

from .conftest import CALLBACK_PATH
from .oidcprovider import OidcProvider, callback_query

REDIRECT_URI = f"http://testserver{CALLBACK_PATH}"
ADD_URL = "/admin/datasources/datasource/add/"


def new_key(kind: str = "ec") -> tuple[Any, str]:
    """A private key and its PEM."""
    key = (
        ec.generate_private_key(ec.SECP256R1())
        if kind == "ec"
        else rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    return key, jose.private_pem(key)


def jwks(key, kid: str) -> dict[str, Any]:
    return {"keys": [jose.public_jwk(key, kid=kid)]}


def form_data(op: OidcProvider | None = None, **fields: Any) -> dict[str, Any]:
    """Every field of the datasource form, as a builder submits it."""
    issuer = op.issuer if op else "https://op.example"
    data = {
        "name": "Enterprise API",
        "slug": "enterprise",
        "base_url": f"{issuer}/",
        "grant_type": "authorization_code",
        "token_sharing": "shared",
        "authorization_url": f"{issuer}/auth",
        "access_token_url": f"{issuer}/token",
        "issuer": "",
        "client_id": "",
        "client_secret": "",
        "client_authentication": "private_key_jwt",
        "assertion_audience": "token_endpoint",
        "private_key": "",
        "private_key_id": "",
        "signing_algorithm": "",
        "signing_certificate": "",
        "assertion_subject": "",
        "service_account_key": "",
        "scopes": "openid offline_access",
        "scope_separator": " ",
        "custom_auth_params": "{}",
        "token_placement": "header",
        "header_prefix": "Bearer",
        "query_param_name": "access_token",
        "allowed_methods": "GET,HEAD,POST",
        "default_headers": "{}",
        "default_query_params": "{}",
        "use_pkce": "on",
        "audience": "",
        "resource": "",
        "revocation_url": "",
        "pushed_authorization_request_url": "",
        "issuer_returns_iss": "on",
        "token_lifetime": "",
        "expiry_status_codes": "401",
        "owner": "",
        "_continue": "Save and continue editing",
    }
    data.update(fields)
    return {k: v for k, v in data.items() if v is not None}


def post_form(client: Client, data: dict[str, Any], datasource: Datasource | None = None):
    url = datasource.get_admin_url() if datasource else ADD_URL
    return client.post(url, data)


def form_errors(response) -> dict[str, list[str]]:
    form = response.context["adminform"].form
    return {name: list(errors) for name, errors in form.errors.items()}


def authorize_in_admin(client: Client, op: OidcProvider, datasource: Datasource) -> str:
    """Start at the admin's authorize URL, consent at the provider, land on the callback;
    returns the provider URL the browser was first sent to."""
    start = client.get(datasource.get_authorize_url())
    assert start.status_code == 302, start.content[:500]
    provider_url = start["Location"]
    callback = op.consent(provider_url, REDIRECT_URI)
    response = client.get(CALLBACK_PATH, callback_query(callback))
    assert response.status_code == 302, response.content.decode()[:1000]
    token = Token.objects.get(datasource=datasource, user=None)
    assert token.status == "active", token.last_error
    return provider_url


def authorized_token(client: Client, op: OidcProvider, datasource: Datasource) -> Token:
    """:func:`authorize_in_admin`, then the datasource's shared token (active)."""
    authorize_in_admin(client, op, datasource)
    return Token.objects.get(datasource=datasource, user=None)


def proxy_client(datasource: Datasource) -> Client:
    _, key = create_api_key("app", datasources=[datasource])
    return Client(HTTP_AUTHORIZATION=f"Api-Key {key}")


def proxy_url(datasource: Datasource, path: str) -> str:
    return f"/api/v1/datasources/{datasource.slug}/proxy/{path}"


def assertions(op: OidcProvider, endpoint: str = "token") -> list[dict[str, Any]]:
    """The client assertions that reached ``endpoint``, decoded (the server verified them)."""
    return [
        jwt.decode(entry["client_assertion"], options={"verify_signature": False})
        for entry in op.requests(endpoint)
        if entry.get("client_assertion")
    ]
