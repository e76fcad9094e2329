"""The choices of the datasource and token fields, and the sets of them the code branches on."""

from __future__ import annotations

from django.db import models
from django.utils.translation import gettext_lazy as _


class GrantType(models.TextChoices):
    AUTHORIZATION_CODE = "authorization_code", _("Authorization code")
    CLIENT_CREDENTIALS = "client_credentials", _("Client credentials")
    JWT_BEARER = "jwt_bearer", _("JWT bearer (service account)")


#: Grants that get tokens with no person in the loop: fetched on save and by the sweep.
MACHINE_GRANTS = frozenset({GrantType.CLIENT_CREDENTIALS, GrantType.JWT_BEARER})


class TokenPlacement(models.TextChoices):
    HEADER = "header", _("Request header")
    QUERY = "query", _("Query parameter")


class ClientAuthentication(models.TextChoices):
    BASIC = "basic", _("Send as Basic Auth header")
    BODY = "body", _("Send client credentials in body")
    PRIVATE_KEY_JWT = "private_key_jwt", _("Sign a JWT with a private key (private_key_jwt)")
    CLIENT_SECRET_JWT = (
        "client_secret_jwt",
        _("Sign a JWT with the client secret (client_secret_jwt)"),
    )
    TLS_CLIENT_AUTH = "tls_client_auth", _("Mutual TLS: CA-issued client certificate (RFC 8705)")
    SELF_SIGNED_TLS_CLIENT_AUTH = (
        "self_signed_tls_client_auth",
        _("Mutual TLS: self-signed client certificate (RFC 8705)"),
    )


#: Client authentication methods that authenticate with the TLS client certificate.
MTLS_METHODS = frozenset(
    {ClientAuthentication.TLS_CLIENT_AUTH, ClientAuthentication.SELF_SIGNED_TLS_CLIENT_AUTH}
)


#: Client authentication methods that send a signed JWT (RFC 7523 §2.2).
ASSERTION_AUTH_METHODS = frozenset(
    {ClientAuthentication.PRIVATE_KEY_JWT, ClientAuthentication.CLIENT_SECRET_JWT}
)


class SigningAlgorithm(models.TextChoices):
    INFER = "", _("From the key (RSA: RS256, EC P-256: ES256)")
    RS256 = "RS256", "RS256"
    PS256 = "PS256", "PS256"
    ES256 = "ES256", "ES256"


class AssertionAudience(models.TextChoices):
    TOKEN_ENDPOINT = "token_endpoint", _("The access token URL (RFC 7523)")
    ENDPOINT = "endpoint", _("The URL of the endpoint called (token, revocation, PAR)")
    ISSUER = "issuer", _("The issuer")


class ScopeSeparator(models.TextChoices):
    SPACE = " ", _("Space (RFC 6749)")
    COMMA = ",", _("Comma (e.g. Slack, Zoho)")


class TokenSharing(models.TextChoices):
    SHARED = "shared", _("One authorization shared by all users")
    PER_USER = "per_user", _("Each user authorizes for themselves")


class FailureKindChoices(models.TextChoices):
    TRANSIENT = "transient", _("Transient (retrying)")
    CONFIGURATION = "configuration", _("Configuration error (retrying)")


class TokenStatus(models.TextChoices):
    NOT_AUTHORIZED = "not_authorized", _("Not authorized")
    ACTIVE = "active", _("Active")
    REFRESHING = "refreshing", _("Refreshing")
    NEEDS_REAUTHORIZATION = "needs_reauthorization", _("Needs re-authorization")
