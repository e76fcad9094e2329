"""Datasources, their tokens, the audit trail and pending authorization requests.

Secrets (client secret, tokens, PKCE verifiers) are Fernet-encrypted columns; ``__str__`` and
``__repr__`` never include them.
"""

from __future__ import annotations

import functools
import hashlib
import re
from datetime import datetime
from typing import TYPE_CHECKING

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.urls import reverse
from django.utils import timezone
from django.utils.translation import gettext_lazy as _
from fernet_fields import EncryptedTextField

from .authserver.oauth import RESERVED_AUTH_PARAMS
from .querysets import TokenQuerySet
from .security import dpop
from .security.policy import validate_secure_url

if TYPE_CHECKING:
    from .client import DatasourceSession

_SCOPE_SPLIT = re.compile(r"[\s,]+")


def normalize_scopes(value: str) -> str:
    """Accept commas and/or whitespace between scopes; store them space-delimited (RFC 6749 §3.3)."""
    seen: dict[str, None] = {}
    for scope in _SCOPE_SPLIT.split(value or ""):
        if scope:
            seen.setdefault(scope, None)
    return " ".join(seen)


@functools.lru_cache(maxsize=256)
def parse_status_codes(value: str) -> frozenset[int]:
    """``"401, 403"`` → {401, 403}; ValueError saying what is wrong. Cached: the proxy asks on
    every call."""
    codes = set()
    for part in re.split(r"[\s,]+", value or ""):
        if not part:
            continue
        if not part.isdigit() or not 400 <= int(part) <= 599:
            raise ValueError(
                f"{part!r} is not an HTTP error status (400-599); separate codes with commas."
            )
        codes.add(int(part))
    return frozenset(codes)


#: The most retries a datasource may ask for.
MAX_RETRIES = 10
#: Statuses a datasource may retry on (mirrors datasources.calls.retries.RETRYABLE_STATUSES).
RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})

#: Methods the proxy forwards unless a datasource says otherwise.
DEFAULT_ALLOWED_METHODS = "GET,HEAD,POST,PUT,PATCH,DELETE,OPTIONS"
#: Methods never forwarded: TRACE/TRACK echo the request (with the token) back to the caller,
#: CONNECT opens a tunnel.
FORBIDDEN_METHODS = frozenset({"TRACE", "TRACK", "CONNECT"})
_METHOD = re.compile(r"^[A-Z][A-Z0-9_-]{0,31}$")
#: RFC 9110 field names (tokens) and values without control characters.
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,100}$")
_HEADER_VALUE = re.compile(r"^[\t\x20-\x7e\x80-\xff]{0,4000}$")
#: Headers a datasource's default headers may not set: the caller's identity, what the
#: transport sets itself, and the proxy and override headers the proxy strips from callers.
RESERVED_DEFAULT_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "dpop",
        "cookie",
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "expect",
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-original-url",
        "x-rewrite-url",
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
    }
)


@functools.lru_cache(maxsize=256)
def parse_methods(value: str) -> frozenset[str]:
    """``"get, post"`` → {"GET", "POST"}; ValueError saying what is wrong."""
    methods = set()
    for part in re.split(r"[\s,]+", value or ""):
        if not part:
            continue
        method = part.upper()
        if not _METHOD.match(method):
            raise ValueError(f"{part!r} is not an HTTP method; separate methods with commas.")
        if method in FORBIDDEN_METHODS:
            raise ValueError(
                f"{method} is never forwarded (TRACE echoes the access token back, CONNECT "
                "opens a tunnel)."
            )
        methods.add(method)
    return frozenset(methods)


def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


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


class Datasource(models.Model):
    name = models.CharField(_("name"), max_length=200, help_text=_("A human name for this API."))
    slug = models.SlugField(
        _("slug"),
        max_length=100,
        unique=True,
        help_text=_("URL-safe unique key; the proxy serves /api/v1/datasources/SLUG/proxy/…"),
    )
    base_url = models.URLField(
        _("base URL"),
        max_length=2000,
        validators=[validate_secure_url],
        help_text=_(
            "Root URL of the upstream API. The proxy only ever forwards to URLs below it, "
            "e.g. https://api.example.com/v1/."
        ),
    )
    grant_type = models.CharField(
        _("grant type"),
        max_length=32,
        choices=GrantType.choices,
        default=GrantType.AUTHORIZATION_CODE,
        help_text=_(
            "Authorization code: a person grants access once and the token is refreshed without "
            "them. Client credentials: server-to-server, no person involved."
        ),
    )
    authorization_url = models.URLField(
        _("authorization URL"),
        max_length=2000,
        blank=True,
        validators=[validate_secure_url],
        help_text=_(
            "The URL the user is redirected to to grant access (RFC 6749 §4.1.1). "
            "Authorization code only."
        ),
    )
    access_token_url = models.URLField(
        _("access token URL"),
        max_length=2000,
        validators=[validate_secure_url],
        help_text=_("A POST endpoint on the authorization server that issues access tokens."),
    )
    client_id = models.CharField(
        _("client ID"),
        max_length=500,
        help_text=_("The identifier of the credentials configured at the authorization server."),
    )
    client_secret = EncryptedTextField(
        _("client secret"),
        null=True,
        blank=True,
        help_text=_(
            "The secret of these credentials. Encrypted at rest and never shown again after saving."
        ),
    )
    scopes = models.CharField(
        _("scope(s)"),
        max_length=2000,
        blank=True,
        help_text=_(
            "Resources these credentials may access. Separate scopes with commas or spaces; "
            "they are sent space-delimited."
        ),
    )
    custom_auth_params = models.JSONField(
        _("custom authentication parameters"),
        default=dict,
        blank=True,
        help_text=_(
            "Extra query parameters for the authorization redirect, as a JSON object of strings, "
            'e.g. {"access_type": "offline", "prompt": "consent"} so the server returns a '
            "refresh token."
        ),
    )
    token_placement = models.CharField(
        _("add access token to"),
        max_length=16,
        choices=TokenPlacement.choices,
        default=TokenPlacement.HEADER,
        help_text=_(
            "How the access token is sent upstream: an Authorization header, or a query "
            "parameter (discouraged by RFC 9700 §4.3.2: URLs end up in logs)."
        ),
    )
    header_prefix = models.CharField(
        _("header prefix"),
        max_length=50,
        default="Bearer",
        blank=True,
        help_text=_('Prefix for the Authorization header. Empty means "Bearer".'),
    )
    query_param_name = models.CharField(
        _("query parameter name"),
        max_length=100,
        default="access_token",
        blank=True,
        help_text=_("Name of the query parameter when the token is added to the query string."),
    )
    scope_separator = models.CharField(
        _("scope separator"),
        max_length=1,
        choices=ScopeSeparator.choices,
        default=ScopeSeparator.SPACE,
        help_text=_(
            "How scopes are joined when sent. RFC 6749 says spaces; a few APIs want commas."
        ),
    )
    client_authentication = models.CharField(
        _("client authentication"),
        max_length=32,
        choices=ClientAuthentication.choices,
        default=ClientAuthentication.BASIC,
        help_text=_(
            "How the client authenticates at the access token URL: a Basic Authorization "
            "header, client_id/client_secret in the form body, a signed JWT (RFC 7523): "
            "private_key_jwt signs with the private key, client_secret_jwt with the secret; or "
            "mutual TLS (RFC 8705) with the TLS client certificate."
        ),
    )
    private_key = EncryptedTextField(
        _("private key"),
        null=True,
        blank=True,
        help_text=_(
            "PEM private key (RSA or EC P-256) that signs client assertions (private_key_jwt) "
            "and JWT bearer grant assertions. Encrypted at rest and never shown again."
        ),
    )
    private_key_id = models.CharField(
        _("key ID"),
        max_length=200,
        blank=True,
        help_text=_(
            "The kid of the key as registered at the provider (Google: private_key_id); sent "
            "in each assertion's header. Empty: no kid."
        ),
    )
    signing_algorithm = models.CharField(
        _("signing algorithm"),
        max_length=8,
        choices=SigningAlgorithm.choices,
        default=SigningAlgorithm.INFER,
        blank=True,
        help_text=_("JWS algorithm of the assertions. Empty: RS256 for RSA keys, ES256 for EC."),
    )
    signing_certificate = models.TextField(
        _("certificate"),
        blank=True,
        help_text=_(
            "Optional PEM certificate of the key (public). When set, assertions carry its "
            "x5t / x5t#S256 thumbprints, as Microsoft Entra ID expects for certificate "
            "credentials."
        ),
    )
    assertion_audience = models.CharField(
        _("assertion audience"),
        max_length=16,
        choices=AssertionAudience.choices,
        default=AssertionAudience.TOKEN_ENDPOINT,
        help_text=_(
            "The aud of client assertions: the access token URL (RFC 7523, most providers), "
            "the URL of each endpoint called (Okta), or the issuer when the server asks."
        ),
    )
    assertion_subject = models.CharField(
        _("act as (subject)"),
        max_length=500,
        blank=True,
        help_text=_(
            "JWT bearer grant only: the user the service account acts for (the assertion's "
            "sub; Google domain-wide delegation). Empty: the service account itself."
        ),
    )
    pushed_authorization_request_url = models.URLField(
        _("pushed authorization request URL"),
        max_length=2000,
        blank=True,
        validators=[validate_secure_url],
        help_text=_(
            "Optional PAR endpoint (RFC 9126). When set, the authorization request is sent "
            "there first (with client authentication) and the browser carries only a "
            "request_uri."
        ),
    )
    require_pushed_authorization_requests = models.BooleanField(
        _("server requires PAR"),
        default=False,
        help_text=_(
            "The server accepts authorization requests only through its PAR endpoint "
            "(require_pushed_authorization_requests in its metadata)."
        ),
    )
    token_endpoint_auth_methods_supported = models.CharField(
        _("client authentication methods supported"),
        max_length=500,
        blank=True,
        help_text=_(
            "What the server's metadata lists (token_endpoint_auth_methods_supported), filled "
            "by discovery; space separated."
        ),
    )
    use_pkce = models.BooleanField(
        _("use PKCE"),
        default=True,
        help_text=_(
            "Send a PKCE S256 challenge (RFC 7636). Leave on unless the server rejects it."
        ),
    )
    audience = models.CharField(
        _("audience"),
        max_length=500,
        blank=True,
        help_text=_("Optional audience parameter for token requests (Auth0-style)."),
    )
    resource = models.CharField(
        _("resource"),
        max_length=2000,
        blank=True,
        help_text=_("Optional resource indicator for token requests (RFC 8707)."),
    )
    revocation_url = models.URLField(
        _("revocation URL"),
        max_length=2000,
        blank=True,
        validators=[validate_secure_url],
        help_text=_("Optional RFC 7009 endpoint; tokens are revoked there when disconnected."),
    )
    issuer = models.CharField(
        _("issuer"),
        max_length=2000,
        blank=True,
        help_text=_(
            "Optional issuer URL. Used for discovery, and when set an iss parameter in the "
            "callback must equal it (RFC 9207 mix-up defence; see “server returns iss”)."
        ),
    )
    token_sharing = models.CharField(
        _("token sharing"),
        max_length=16,
        choices=TokenSharing.choices,
        default=TokenSharing.SHARED,
        help_text=_(
            "Shared: one authorization serves every caller. Per user: each user authorizes "
            "for themselves (at /api/v1/datasources/SLUG/connect) and the proxy uses the calling "
            "user's token. Authorization code only."
        ),
    )
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        verbose_name=_("owner"),
        help_text=_("Emailed when the datasource needs re-authorization."),
    )
    issuer_returns_iss = models.BooleanField(
        _("server returns iss"),
        default=True,
        help_text=_(
            "The server puts iss in authorization responses (RFC 9207). When on and an issuer is "
            "set, a response without iss is rejected; when off, only a wrong iss is."
        ),
    )
    token_lifetime = models.PositiveIntegerField(
        _("default token lifetime"),
        null=True,
        blank=True,
        help_text=_(
            "Seconds after which a token is refreshed when the server says nothing about its "
            "expiry (no expires_in, and the token is not a JWT with exp). Only schedules "
            "refreshes: such a token is used until the API rejects it. Empty: the "
            "DATASOURCES['DEFAULT_TOKEN_LIFETIME'] setting."
        ),
    )
    expiry_status_codes = models.CharField(
        _("expired-token status codes"),
        max_length=100,
        default="401",
        blank=True,
        help_text=_(
            "HTTP statuses with which this API says the access token is no longer valid, "
            "comma separated (usually 401; some APIs use 403). On such an answer the token is "
            "refreshed once and the call retried once. Empty: never."
        ),
    )
    allowed_methods = models.CharField(
        _("allowed methods"),
        max_length=200,
        default=DEFAULT_ALLOWED_METHODS,
        blank=True,
        help_text=_(
            "HTTP methods the proxy forwards to this API, comma separated; any other method is "
            "answered 405. Empty: GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS. TRACE, TRACK "
            "and CONNECT are never forwarded."
        ),
    )
    default_headers = models.JSONField(
        _("default headers"),
        default=dict,
        blank=True,
        help_text=_(
            "Headers sent with every call unless the caller sends the same header, as a JSON "
            'object of strings, e.g. {"Accept": "application/json", "X-Api-Version": "2"}. '
            "The header that carries the token cannot be set here. Not for secrets: these "
            "values are shown in the admin and exported."
        ),
    )
    default_query_params = models.JSONField(
        _("default query parameters"),
        default=dict,
        blank=True,
        help_text=_(
            "Query parameters added to every call unless the caller sends the same parameter, "
            'as a JSON object of strings, e.g. {"api-version": "2024-01-01"}. The parameter '
            "that carries the token cannot be set here. Not for secrets: these values are "
            "shown in the admin and exported."
        ),
    )
    use_dpop = models.BooleanField(
        _("DPoP (sender-constrained tokens)"),
        default=False,
        help_text=_(
            "Bind tokens to a key pair of this datasource (RFC 9449): every token request and "
            "every API call carries a proof signed with its private key, so a stolen token is "
            "useless without the key. The key pair is generated here; the private key is "
            "encrypted and never shown. Needs the token in the Authorization header."
        ),
    )
    dpop_private_key = EncryptedTextField(
        _("DPoP private key"),
        null=True,
        blank=True,
        editable=False,
        help_text=_("Generated when DPoP is turned on; encrypted at rest and never shown."),
    )
    dpop_jkt = models.CharField(
        _("DPoP key thumbprint"),
        max_length=100,
        blank=True,
        editable=False,
        help_text=_(
            "RFC 7638 SHA-256 thumbprint of the DPoP public key: what the server binds tokens "
            "to (cnf.jkt), and what some providers ask to register."
        ),
    )
    tls_client_certificate = EncryptedTextField(
        _("TLS client certificate"),
        null=True,
        blank=True,
        help_text=_(
            "PEM certificate (and chain) presented in mutual TLS (RFC 8705): for the mutual-TLS "
            "client authentications and for certificate-bound tokens. Encrypted at rest; "
            "shown again only as its subject, expiry and thumbprint."
        ),
    )
    tls_client_key = EncryptedTextField(
        _("TLS client private key"),
        null=True,
        blank=True,
        help_text=_(
            "The certificate's PEM private key (unencrypted PEM, stored encrypted, never shown "
            "again)."
        ),
    )
    certificate_bound_tokens = models.BooleanField(
        _("certificate-bound tokens"),
        default=False,
        help_text=_(
            "The server binds tokens to the client certificate (RFC 8705 §3): present the "
            "certificate on API calls too (proxy, Python client, Test)."
        ),
    )
    tls_ca_bundle = models.TextField(
        _("trusted CA certificates"),
        blank=True,
        help_text=_(
            "PEM certificates of a private CA that issued the authorization server's or the "
            "API's certificate, trusted for this datasource in addition to the system's. "
            "Server certificates are always verified."
        ),
    )
    retry_count = models.PositiveSmallIntegerField(
        _("retries"),
        default=0,
        validators=[MaxValueValidator(MAX_RETRIES)],
        help_text=_(
            "How many times a failed call is sent again (0: never). Only idempotent methods "
            "(GET, HEAD, OPTIONS, PUT, DELETE) or calls with an Idempotency-Key header, and only "
            "when the request body could be kept in memory. A caller may ask for fewer with the "
            "X-Datasource-Retries header."
        ),
    )
    retry_statuses = models.CharField(
        _("retry on statuses"),
        max_length=50,
        default="429,502,503,504",
        blank=True,
        help_text=_(
            "Upstream statuses after which a call is retried, comma separated: any of 429, 502, "
            "503, 504. The server's Retry-After is honoured; otherwise exponential backoff with "
            "jitter."
        ),
    )
    retry_on_connection_errors = models.BooleanField(
        _("retry on connection errors"),
        default=True,
        help_text=_("Also retry when the connection is refused, reset or times out."),
    )
    retry_budget = models.PositiveSmallIntegerField(
        _("retry budget (seconds)"),
        default=10,
        validators=[MinValueValidator(1), MaxValueValidator(300)],
        help_text=_(
            "The longest a call may take with its retries and waits: a retry whose wait would "
            "end later is not made, and the last answer is passed on."
        ),
    )
    created_at = models.DateTimeField(_("created"), auto_now_add=True)
    updated_at = models.DateTimeField(_("updated"), auto_now=True)

    class Meta:
        verbose_name = _("datasource")
        verbose_name_plural = _("datasources")
        ordering = ["name"]
        permissions = [("use_datasource", "Can call datasources through the proxy")]

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"<Datasource {self.pk}: {self.slug}>"

    def save(self, *args, **kwargs) -> None:
        self.scopes = normalize_scopes(self.scopes)
        if self.use_dpop and not self.dpop_private_key:
            self.set_dpop_key(dpop.generate_private_key_pem())
        super().save(*args, **kwargs)
        Token.objects.get_or_create(datasource=self, user=None)
        if self.machine_grant:
            # Nobody authorizes a client-credentials or JWT bearer datasource: the sweep
            # fetches its token.
            Token.objects.filter(
                datasource=self,
                access_token__isnull=True,
                refresh_due_at__isnull=True,
                status=TokenStatus.NOT_AUTHORIZED,
            ).update(refresh_due_at=timezone.now())

    def clean(self) -> None:
        errors: dict[str, str] = {}
        if self.grant_type == GrantType.AUTHORIZATION_CODE and not self.authorization_url:
            errors["authorization_url"] = _(
                "The authorization code grant needs an authorization URL."
            )
        if (
            self.grant_type == GrantType.AUTHORIZATION_CODE
            and self.require_pushed_authorization_requests
            and not self.pushed_authorization_request_url
        ):
            errors["pushed_authorization_request_url"] = _(
                "The server requires pushed authorization requests: enter its PAR endpoint "
                "(or fill the endpoints from the issuer's metadata)."
            )
        params = self.custom_auth_params
        if params in (None, ""):
            self.custom_auth_params = {}
        elif not isinstance(params, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in params.items()
        ):
            errors["custom_auth_params"] = _(
                'Enter a JSON object whose values are strings, e.g. {"prompt": "consent"}.'
            )
        elif reserved := sorted(RESERVED_AUTH_PARAMS.intersection(params)):
            errors["custom_auth_params"] = _(
                "These parameters are set by the flow itself and cannot be overridden: %(names)s."
            ) % {"names": ", ".join(reserved)}
        if (
            self.token_sharing == TokenSharing.PER_USER
            and self.grant_type != GrantType.AUTHORIZATION_CODE
        ):
            errors["token_sharing"] = _(
                "Per-user tokens need the authorization code grant: with client credentials "
                "or a JWT bearer grant there is no user."
            )
        if self.use_dpop and self.token_placement == TokenPlacement.QUERY:
            errors["token_placement"] = _(
                "DPoP sends the token in the Authorization header (RFC 9449 §7.1): choose "
                "“Request header”, or turn DPoP off."
            )
        errors.update(self._tls_problems())
        if self.token_placement == TokenPlacement.QUERY and not self.query_param_name:
            self.query_param_name = "access_token"
        if self.issuer:
            problem = validate_issuer(self.issuer)
            if problem:
                errors["issuer"] = problem
        try:
            codes = parse_status_codes(self.expiry_status_codes)
        except ValueError as err:
            errors["expiry_status_codes"] = str(err)
        else:
            self.expiry_status_codes = ",".join(str(code) for code in sorted(codes))
        try:
            codes = parse_status_codes(self.retry_statuses)
            if codes - RETRYABLE_STATUSES:
                raise ValueError(
                    f"Only {', '.join(map(str, sorted(RETRYABLE_STATUSES)))} can be retried "
                    f"(not {', '.join(map(str, sorted(codes - RETRYABLE_STATUSES)))}): a 401 "
                    "gets one refresh-and-retry, other errors are answers."
                )
        except ValueError as err:
            errors["retry_statuses"] = str(err)
        else:
            self.retry_statuses = ",".join(str(code) for code in sorted(codes))
        try:
            methods = parse_methods(self.allowed_methods)
        except ValueError as err:
            errors["allowed_methods"] = str(err)
        else:
            self.allowed_methods = ",".join(sorted(methods)) or DEFAULT_ALLOWED_METHODS
        for name, problem in self._default_problems().items():
            errors[name] = problem
        self.scopes = normalize_scopes(self.scopes)
        if errors:
            raise ValidationError(errors)

    def _tls_problems(self) -> dict[str, str]:
        from .security import tls

        problems: dict[str, str] = {}
        has_pair = bool(self.tls_client_certificate and self.tls_client_key)
        if self.tls_client_certificate or self.tls_client_key:
            if not has_pair:
                problems["tls_client_certificate"] = _(
                    "Mutual TLS needs both the client certificate and its private key."
                )
            else:
                try:
                    tls.check_client_pair(self.tls_client_certificate, self.tls_client_key)
                except tls.TLSConfigError as err:
                    problems["tls_client_certificate"] = str(err)
        if self.client_authentication in MTLS_METHODS and not has_pair:
            problems.setdefault(
                "client_authentication",
                _("Mutual TLS client authentication needs a client certificate and key."),
            )
        if self.client_authentication in MTLS_METHODS and not self.access_token_url.startswith(
            "https://"
        ):
            problems.setdefault(
                "access_token_url", _("Mutual TLS needs an https:// access token URL.")
            )
        if self.certificate_bound_tokens and not has_pair:
            problems.setdefault(
                "certificate_bound_tokens",
                _("Certificate-bound tokens need a client certificate and key."),
            )
        if self.tls_ca_bundle:
            self.tls_ca_bundle = self.tls_ca_bundle.replace("\r\n", "\n").strip() + "\n"
            try:
                tls.check_ca_bundle(self.tls_ca_bundle)
            except tls.TLSConfigError as err:
                problems["tls_ca_bundle"] = str(err)
        return problems

    def _default_problems(self) -> dict[str, str]:
        problems: dict[str, str] = {}
        for field in ("default_headers", "default_query_params"):
            value = getattr(self, field)
            if value in (None, ""):
                setattr(self, field, {})
            elif not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()
            ):
                problems[field] = _(
                    'Enter a JSON object whose values are strings, e.g. {"a": "b"}.'
                )
        if "default_headers" not in problems:
            for name, value in self.default_headers.items():
                if not _HEADER_NAME.match(name):
                    problems["default_headers"] = _("%(name)r is not a valid header name.") % {
                        "name": name
                    }
                elif name.lower() in RESERVED_DEFAULT_HEADERS or name.lower().startswith(
                    "x-forwarded-"
                ):
                    problems["default_headers"] = _(
                        "%(name)s cannot be set here: it carries credentials or is set by the "
                        "proxy itself."
                    ) % {"name": name}
                elif not _HEADER_VALUE.match(value):
                    problems["default_headers"] = _(
                        "The value of %(name)s has control or non-Latin-1 characters, or is too long."
                    ) % {"name": name}
        if "default_query_params" not in problems:
            token_param = self.query_param_name or "access_token"
            for name, value in self.default_query_params.items():
                if not name or any(ord(c) < 0x20 or ord(c) == 0x7F for c in name + value):
                    problems["default_query_params"] = _(
                        "Parameter names must be non-empty and names and values free of control "
                        "characters."
                    )
                elif self.token_placement == TokenPlacement.QUERY and name == token_param:
                    problems["default_query_params"] = _(
                        "%(name)s carries the access token and cannot be set here."
                    ) % {"name": name}
        return problems

    @property
    def token(self) -> Token:
        """The shared token (the one used unless tokens are per user)."""
        cached = getattr(self, "_shared_token", None)
        if cached is None:
            cached, _ = Token.objects.get_or_create(datasource=self, user=None)
            self._shared_token = cached
        return cached

    @property
    def expiry_statuses(self) -> frozenset[int]:
        """The upstream statuses that mean "token expired" (see ``expiry_status_codes``)."""
        try:
            return parse_status_codes(self.expiry_status_codes)
        except ValueError:
            return frozenset({401})

    @property
    def retry_status_set(self) -> frozenset[int]:
        """The upstream statuses retried (see ``retry_statuses``); never anything else."""
        try:
            return parse_status_codes(self.retry_statuses) & RETRYABLE_STATUSES
        except ValueError:
            return frozenset()

    @property
    def allowed_method_set(self) -> frozenset[str]:
        """The methods the proxy forwards (see ``allowed_methods``)."""
        try:
            return parse_methods(self.allowed_methods) or parse_methods(DEFAULT_ALLOWED_METHODS)
        except ValueError:
            return parse_methods(DEFAULT_ALLOWED_METHODS)

    @property
    def per_user(self) -> bool:
        return self.token_sharing == TokenSharing.PER_USER

    @property
    def scope_list(self) -> list[str]:
        return self.scopes.split() if self.scopes else []

    @property
    def scope_param(self) -> str:
        """The scopes as sent to the server."""
        return (self.scope_separator or " ").join(self.scope_list)

    @property
    def effective_header_prefix(self) -> str:
        return self.header_prefix.strip() or "Bearer"

    @property
    def effective_token_lifetime(self) -> int:
        from .conf import app_settings

        return self.token_lifetime or app_settings.DEFAULT_TOKEN_LIFETIME

    def set_dpop_key(self, private_key_pem: str) -> None:
        """Use ``private_key_pem`` as the DPoP key (checked: DPoPKeyError if unusable)."""
        self.dpop_jkt = dpop.signer(private_key_pem).thumbprint
        self.dpop_private_key = private_key_pem

    @property
    def dpop_public_jwk(self) -> str:
        """The DPoP public key as a JWK (JSON), or "" without a key."""
        return dpop.public_jwk_json(self.dpop_private_key) if self.dpop_private_key else ""

    @property
    def has_client_secret(self) -> bool:
        return bool(self.client_secret)

    @property
    def has_private_key(self) -> bool:
        return bool(self.private_key)

    @property
    def machine_grant(self) -> bool:
        """Tokens come with no person in the loop (client credentials, JWT bearer)."""
        return self.grant_type in MACHINE_GRANTS

    def get_admin_url(self) -> str:
        return reverse("admin:datasources_datasource_change", args=[self.pk])

    def get_authorize_url(self) -> str:
        return reverse("admin:datasources_datasource_authorize", args=[self.pk])

    def get_connect_url(self) -> str:
        return reverse("datasources:connect", args=[self.slug])

    def get_access_token(self, user=None) -> str:
        """A valid access token, refreshed first when it is about to expire.

        ``user`` selects whose token when tokens are per user.
        """
        from .tokens import get_access_token

        return get_access_token(self, user=user)

    def session(self, user=None, timeout=None) -> DatasourceSession:
        """A requests session that talks to ``base_url`` with the (user's) token attached;
        ``timeout`` (seconds or (connect, read)) defaults to DATASOURCES['CLIENT_TIMEOUT']."""
        from .client import DatasourceSession

        return DatasourceSession(self, user=user, timeout=timeout)


#: The configuration fields builders edit, in form order (the client secret and private key
#: are handled apart: they are write-only, and never exported).
CONFIG_FIELDS = (
    "name",
    "slug",
    "base_url",
    "grant_type",
    "authorization_url",
    "access_token_url",
    "client_id",
    "scopes",
    "client_authentication",
    "private_key_id",
    "signing_algorithm",
    "signing_certificate",
    "assertion_audience",
    "assertion_subject",
    "use_pkce",
    "token_placement",
    "header_prefix",
    "query_param_name",
    "custom_auth_params",
    "audience",
    "resource",
    "revocation_url",
    "pushed_authorization_request_url",
    "require_pushed_authorization_requests",
    "issuer",
    "issuer_returns_iss",
    "scope_separator",
    "token_lifetime",
    "expiry_status_codes",
    "token_sharing",
    "allowed_methods",
    "default_headers",
    "default_query_params",
    "use_dpop",
    "certificate_bound_tokens",
    "tls_ca_bundle",
    "retry_count",
    "retry_statuses",
    "retry_on_connection_errors",
    "retry_budget",
)


def validate_issuer(value: str) -> str | None:
    from .security.policy import transport_problem

    problem = transport_problem(value)
    return f"The issuer {problem}." if problem else None


class Token(models.Model):
    datasource = models.ForeignKey(
        Datasource, on_delete=models.CASCADE, related_name="tokens", verbose_name=_("datasource")
    )
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="+",
        verbose_name=_("user"),
        help_text=_("Whose token, when the datasource has per-user tokens; empty: shared."),
    )
    access_token = EncryptedTextField(_("access token"), null=True, blank=True)
    refresh_token = EncryptedTextField(_("refresh token"), null=True, blank=True)
    token_type = models.CharField(
        _("token type"), max_length=50, blank=True, help_text=_("As the server reported it.")
    )
    scope = models.CharField(
        _("granted scope"),
        max_length=2000,
        blank=True,
        help_text=_("The scope the server granted (may differ from the one requested)."),
    )
    expires_at = models.DateTimeField(
        _("expires at"),
        null=True,
        blank=True,
        help_text=_("When the access token expires (empty: no known expiry)."),
    )
    expiry_known = models.BooleanField(
        _("expiry known"),
        default=True,
        help_text=_(
            "Off when the server said nothing about the expiry and expires_at is an assumption "
            "that only schedules the next refresh."
        ),
    )
    client_id = models.CharField(
        _("issued to client ID"),
        max_length=500,
        blank=True,
        help_text=_("The client ID the tokens were issued to."),
    )
    obtained_at = models.DateTimeField(
        _("obtained at"), null=True, blank=True, help_text=_("When the authorization was granted.")
    )
    last_refreshed_at = models.DateTimeField(_("last refreshed at"), null=True, blank=True)
    status = models.CharField(
        _("status"),
        max_length=32,
        choices=TokenStatus.choices,
        default=TokenStatus.NOT_AUTHORIZED,
    )
    last_error = models.TextField(
        _("last error"), blank=True, help_text=_("The last refresh failure, without secrets.")
    )
    failure_count = models.PositiveIntegerField(
        _("consecutive failures"), default=0, help_text=_("Reset by a successful refresh.")
    )
    failure_kind = models.CharField(
        _("failure kind"),
        max_length=16,
        choices=FailureKindChoices.choices,
        blank=True,
        help_text=_("What the last failure was, while the token is kept (cleared by a success)."),
    )
    next_attempt_at = models.DateTimeField(
        _("next attempt at"),
        null=True,
        blank=True,
        help_text=_("After a failure, when the background retries the refresh."),
    )
    retry_not_before = models.DateTimeField(
        _("retry not before"),
        null=True,
        blank=True,
        help_text=_("The server asked not to be called again before this (Retry-After)."),
    )
    last_attempt_at = models.DateTimeField(
        _("last attempt at"),
        null=True,
        blank=True,
        help_text=_("When the token endpoint was last asked for this token."),
    )
    outcome_unknown_at = models.DateTimeField(
        _("answer lost at"),
        null=True,
        blank=True,
        help_text=_(
            "A refresh was sent and its answer lost (timeout, stopped worker): the server may "
            "have rotated the refresh token. Cleared by a success."
        ),
    )
    refresh_due_at = models.DateTimeField(
        _("background refresh due"),
        null=True,
        blank=True,
        help_text=_(
            "When the background sweep next looks at this token (refresh margin, daily refresh, "
            "end of a backoff); empty when only a person can help or there is nothing to renew."
        ),
    )
    refresh_count = models.PositiveIntegerField(_("refreshes"), default=0)
    lease_id = models.CharField(_("refresh lease"), max_length=64, blank=True, editable=False)
    lease_expires_at = models.DateTimeField(
        _("refresh lease expires at"), null=True, blank=True, editable=False
    )

    objects = TokenQuerySet.as_manager()

    class Meta:
        verbose_name = _("token")
        verbose_name_plural = _("tokens")
        indexes = [
            models.Index(fields=["status", "expires_at"], name="ds_token_status_expiry"),
            # The sweep: WHERE refresh_due_at <= now ORDER BY refresh_due_at, a range scan over
            # the due tokens only (tokens that need a person have no due time: not indexed).
            models.Index(
                fields=["refresh_due_at"],
                name="ds_token_refresh_due",
                condition=models.Q(refresh_due_at__isnull=False),
            ),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["datasource"],
                condition=models.Q(user__isnull=True),
                name="ds_token_one_shared",
            ),
            models.UniqueConstraint(fields=["datasource", "user"], name="ds_token_one_per_user"),
        ]

    def __str__(self) -> str:
        whose = f", user {self.user_id}" if self.user_id else ""
        return f"Token for {self.datasource_id}{whose} ({self.status})"

    def __repr__(self) -> str:
        return f"<Token {self.pk}: datasource={self.datasource_id} status={self.status}>"

    @property
    def has_access_token(self) -> bool:
        return bool(self.access_token)

    @property
    def has_refresh_token(self) -> bool:
        return bool(self.refresh_token)

    @property
    def is_failing(self) -> bool:
        """Refreshing failed since the last success (transiently, or for good): a success from
        here is a recovery (the ``datasource.recovered`` webhook)."""
        return self.status == TokenStatus.NEEDS_REAUTHORIZATION or self.failure_count > 0

    def is_expired(self, now: datetime | None = None) -> bool:
        """Past a known expiry (an assumed one never makes a token unusable)."""
        if not self.access_token:
            return True
        if self.expires_at is None or not self.expiry_known:
            return False
        return self.expires_at <= (now or timezone.now())


class TokenEvent(models.Model):
    class Kind(models.TextChoices):
        AUTHORIZED = "authorized", _("Authorized")
        REFRESHED = "refreshed", _("Refreshed")
        REFRESH_FAILED = "refresh_failed", _("Refresh failed")
        REAUTHORIZATION_REQUIRED = "reauthorization_required", _("Re-authorization required")
        REVOKED = "revoked", _("Revoked")
        LOST_RESPONSE = "lost_response", _("Refresh answer lost")

    datasource = models.ForeignKey(
        Datasource, on_delete=models.CASCADE, related_name="events", verbose_name=_("datasource")
    )
    kind = models.CharField(_("event"), max_length=32, choices=Kind.choices)
    created_at = models.DateTimeField(_("time"), default=timezone.now, db_index=True)
    detail = models.CharField(_("detail"), max_length=500, blank=True)

    class Meta:
        verbose_name = _("token event")
        verbose_name_plural = _("token events")
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["datasource", "-created_at"], name="ds_event_recent")]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} at {self.created_at:%Y-%m-%d %H:%M:%S}"


class AuthorizationRequest(models.Model):
    """A pending authorization-code request: single-use, bound to a browser session, expiring.

    Only a hash of ``state`` is stored (it travels through the browser); the PKCE verifier is
    encrypted because it must be sent back to the token endpoint.
    """

    datasource = models.ForeignKey(Datasource, on_delete=models.CASCADE, related_name="+")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, null=True, related_name="+"
    )
    state_hash = models.CharField(max_length=64, unique=True)
    session_binding_hash = models.CharField(max_length=64, db_index=True)
    code_verifier = EncryptedTextField(null=True, blank=True)
    redirect_uri = models.CharField(max_length=2000)
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField(db_index=True)
    used_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = _("authorization request")
        verbose_name_plural = _("authorization requests")

    def __str__(self) -> str:
        return f"Authorization request for {self.datasource_id}"

    def __repr__(self) -> str:
        return f"<AuthorizationRequest {self.pk}: datasource={self.datasource_id}>"


API_KEY_PREFIX = "dsk_"


class ApiKey(models.Model):
    """A credential for application code calling the proxy. Only a SHA-256 of the key is stored
    (keys are 256-bit random, so a fast hash is enough); the key is shown once at creation."""

    name = models.CharField(_("name"), max_length=200, help_text=_("Who or what uses this key."))
    prefix = models.CharField(_("prefix"), max_length=8, unique=True, editable=False)
    key_hash = models.CharField(max_length=64, editable=False)
    all_datasources = models.BooleanField(
        _("all datasources"),
        default=False,
        help_text=_(
            "The key may call every datasource, including ones added later. Off: only the "
            "datasources selected below (none left, e.g. after they were deleted: nothing)."
        ),
    )
    datasources = models.ManyToManyField(
        Datasource,
        blank=True,
        related_name="api_keys",
        verbose_name=_("datasources"),
        help_text=_("The datasources this key may call (unless it may call all of them)."),
    )
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="+",
        verbose_name=_("acts for user"),
        help_text=_("Optional: the user this key acts for."),
    )
    created_at = models.DateTimeField(_("created"), auto_now_add=True)
    last_used_at = models.DateTimeField(_("last used"), null=True, blank=True, editable=False)
    revoked_at = models.DateTimeField(_("revoked"), null=True, blank=True)

    class Meta:
        verbose_name = _("API key")
        verbose_name_plural = _("API keys")
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name} ({API_KEY_PREFIX}{self.prefix}_…)"

    def __repr__(self) -> str:
        return f"<ApiKey {self.pk}: {self.prefix}>"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None


#: Upper bounds (ms) of the proxy latency histogram's buckets (DatasourceUsage.latency_le_*).
LATENCY_BUCKETS_MS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)


class DatasourceUsage(models.Model):
    """Proxy call counters, flushed from each process at most once a second."""

    datasource = models.OneToOneField(
        Datasource, on_delete=models.CASCADE, primary_key=True, related_name="usage"
    )
    calls = models.PositiveBigIntegerField(_("proxied calls"), default=0)
    errors = models.PositiveBigIntegerField(
        _("errors"), default=0, help_text=_("Calls answered with a 5xx or not forwarded.")
    )
    total_duration_ms = models.PositiveBigIntegerField(default=0)
    last_status = models.PositiveSmallIntegerField(_("last status"), null=True, blank=True)
    last_called_at = models.DateTimeField(_("last called"), null=True, blank=True)
    # Latency histogram (calls per bucket, not cumulative; above the last: calls minus the sum).
    latency_le_5 = models.PositiveBigIntegerField(default=0, editable=False)
    latency_le_10 = models.PositiveBigIntegerField(default=0, editable=False)
    latency_le_25 = models.PositiveBigIntegerField(default=0, editable=False)
    latency_le_50 = models.PositiveBigIntegerField(default=0, editable=False)
    latency_le_100 = models.PositiveBigIntegerField(default=0, editable=False)
    latency_le_250 = models.PositiveBigIntegerField(default=0, editable=False)
    latency_le_500 = models.PositiveBigIntegerField(default=0, editable=False)
    latency_le_1000 = models.PositiveBigIntegerField(default=0, editable=False)
    latency_le_2500 = models.PositiveBigIntegerField(default=0, editable=False)
    latency_le_5000 = models.PositiveBigIntegerField(default=0, editable=False)
    latency_le_10000 = models.PositiveBigIntegerField(default=0, editable=False)

    class Meta:
        verbose_name = _("datasource usage")
        verbose_name_plural = _("datasource usage")

    def __str__(self) -> str:
        return f"Usage of {self.datasource_id}"


class UsageSample(models.Model):
    """A snapshot of a datasource's proxy counters (:class:`DatasourceUsage`), taken every few
    minutes by the ``sample_usage`` task; differences between snapshots give the calls, errors
    and latency per hour that the admin charts."""

    datasource = models.ForeignKey(
        Datasource,
        on_delete=models.CASCADE,
        related_name="usage_samples",
        verbose_name=_("datasource"),
    )
    taken_at = models.DateTimeField(_("taken at"), default=timezone.now)
    calls = models.PositiveBigIntegerField(_("proxied calls"), default=0)
    errors = models.PositiveBigIntegerField(_("errors"), default=0)
    total_duration_ms = models.PositiveBigIntegerField(_("total duration (ms)"), default=0)

    class Meta:
        verbose_name = _("usage sample")
        verbose_name_plural = _("usage samples")
        ordering = ["taken_at"]
        indexes = [models.Index(fields=["datasource", "taken_at"], name="ds_usage_sample_time")]

    def __str__(self) -> str:
        return f"Usage of {self.datasource_id} at {self.taken_at:%Y-%m-%d %H:%M}"


class UpstreamHealth(models.Model):
    """The database's copy of an upstream's shared health (rate limit, circuit breaker), used
    when no Redis is configured; see :mod:`datasources.calls.limits`. One row per datasource
    that has something to remember, changed under a row lock."""

    datasource = models.OneToOneField(
        Datasource, on_delete=models.CASCADE, primary_key=True, related_name="upstream_health"
    )
    rate_limited_until = models.DateTimeField(_("rate-limited until"), null=True, blank=True)
    failures = models.PositiveIntegerField(_("consecutive failures"), default=0)
    first_failure_at = models.DateTimeField(_("first failure of the run"), null=True, blank=True)
    open_until = models.DateTimeField(_("circuit open until"), null=True, blank=True)
    opened_at = models.DateTimeField(_("circuit opened at"), null=True, blank=True)
    probe_until = models.DateTimeField(_("probe under way until"), null=True, blank=True)

    class Meta:
        verbose_name = _("upstream health")
        verbose_name_plural = _("upstream health")

    def __str__(self) -> str:
        return f"Upstream health of {self.datasource_id}"


class ProxyCall(models.Model):
    """One proxied call, for the call log: who called which datasource, what method and path
    (never the query string, headers or bodies), the outcome and its cost. Written in batches
    (:mod:`datasources.proxy.calllog`), pruned after CALL_LOG_RETENTION_DAYS."""

    called_at = models.DateTimeField(_("time"), db_index=True)
    # No database constraints: the log outlives deleted datasources, keys and users (rows age
    # out with the retention), and deleting a datasource does not walk millions of log rows.
    # No index of its own either: ds_call_recent (below) starts with it, and every index is
    # written for every logged call.
    datasource = models.ForeignKey(
        Datasource,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        db_index=False,
        null=True,
        related_name="+",
        verbose_name=_("datasource"),
    )
    api_key = models.ForeignKey(
        ApiKey,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        null=True,
        blank=True,
        related_name="+",
        verbose_name=_("API key"),
    )
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        null=True,
        blank=True,
        related_name="+",
        verbose_name=_("user"),
        help_text=_("The signed-in user, or the user the API key acts for."),
    )
    method = models.CharField(_("method"), max_length=16)
    path = models.CharField(
        _("path"), max_length=1000, help_text=_("Below the base URL; never the query string.")
    )
    status = models.PositiveSmallIntegerField(_("status"))
    error = models.CharField(
        _("refused as"),
        max_length=40,
        blank=True,
        help_text=_(
            "The proxy's own answer (e.g. rate_limited, upstream_timeout); empty: the upstream's."
        ),
    )
    latency_ms = models.PositiveIntegerField(_("latency (ms)"))
    request_bytes = models.PositiveBigIntegerField(_("request bytes"), default=0)
    response_bytes = models.PositiveBigIntegerField(_("response bytes"), default=0)
    retries = models.PositiveSmallIntegerField(_("retries"), default=0)
    refreshed = models.BooleanField(
        _("refreshed"),
        default=False,
        help_text=_("The token was refreshed after an expired answer."),
    )

    class Meta:
        verbose_name = _("proxy call")
        verbose_name_plural = _("call log")
        ordering = ["-called_at", "-id"]
        indexes = [models.Index(fields=["datasource", "-called_at"], name="ds_call_recent")]

    def __str__(self) -> str:
        return f"{self.method} {self.path} → {self.status}"


class WebhookEvent(models.TextChoices):
    """Event types sent to webhook endpoints (the ``type`` of the payload)."""

    DATASOURCE_AUTHORIZED = "datasource.authorized", _("Datasource authorized")
    TOKEN_REFRESH_FAILED = "token.refresh_failed", _("Token refresh failed")
    REAUTHORIZATION_REQUIRED = (
        "datasource.reauthorization_required",
        _("Datasource needs re-authorization"),
    )
    DATASOURCE_RECOVERED = "datasource.recovered", _("Datasource recovered")


#: The type of the event the admin's "Send test event" button sends (not subscribable).
WEBHOOK_TEST_EVENT = "webhook.test"


def default_webhook_events() -> list[str]:
    return list(WebhookEvent.values)


class WebhookEndpoint(models.Model):
    """A URL that receives signed events (Standard Webhooks). The secret is encrypted and shown
    once, when created or rotated; after a rotation the previous one keeps signing (a second
    signature) for WEBHOOK_SECRET_ROTATION_GRACE seconds, so receivers can switch without
    losing events."""

    name = models.CharField(_("name"), max_length=200, help_text=_("Who receives these events."))
    url = models.URLField(
        _("URL"),
        max_length=2000,
        validators=[validate_secure_url],
        help_text=_(
            "Receives a POST per event. https:// (http:// only for loopback hosts); redirects "
            "are not followed."
        ),
    )
    datasource = models.ForeignKey(
        Datasource,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="webhook_endpoints",
        verbose_name=_("datasource"),
        help_text=_("Only this datasource's events; empty: every datasource's (project-wide)."),
    )
    event_types = models.JSONField(
        _("events"),
        default=default_webhook_events,
        help_text=_("The event types sent to this URL."),
    )
    active = models.BooleanField(
        _("active"), default=True, help_text=_("Off: no new events are queued for this URL.")
    )
    secret = EncryptedTextField(
        _("signing secret"),
        editable=False,
        help_text=_("whsec_…, encrypted; shown once, when created or rotated."),
    )
    previous_secret = EncryptedTextField(
        _("previous signing secret"),
        blank=True,
        editable=False,
        help_text=_("The secret before the last rotation, encrypted; signs during the grace."),
    )
    previous_secret_expires_at = models.DateTimeField(
        _("previous secret signs until"),
        null=True,
        blank=True,
        editable=False,
        help_text=_("Until then events carry a second signature, made with the previous secret."),
    )
    secret_created_at = models.DateTimeField(
        _("secret created"),
        null=True,
        editable=False,
        help_text=_("When the current secret was made (creation or last rotation)."),
    )
    created_at = models.DateTimeField(_("created"), auto_now_add=True)
    updated_at = models.DateTimeField(_("updated"), auto_now=True)

    class Meta:
        verbose_name = _("webhook endpoint")
        verbose_name_plural = _("webhook endpoints")
        ordering = ["name", "id"]

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"<WebhookEndpoint {self.pk}: datasource={self.datasource_id}>"

    def clean(self) -> None:
        super().clean()
        unknown = set(self.event_types or []) - set(WebhookEvent.values)
        if not isinstance(self.event_types, list) or unknown or not self.event_types:
            raise ValidationError({"event_types": _("Choose one or more of the event types.")})

    def get_admin_url(self) -> str:
        return reverse("admin:datasources_webhookendpoint_change", args=[self.pk])


class DeliveryStatus(models.TextChoices):
    PENDING = "pending", _("Pending")
    RETRYING = "retrying", _("Failed, retrying")
    DELIVERED = "delivered", _("Delivered")
    GAVE_UP = "gave_up", _("Gave up")


class WebhookDelivery(models.Model):
    """One event for one endpoint: written in the transaction that caused the event, then sent
    (and retried) by Celery. ``next_attempt_at`` is also the claim: a worker moves it forward
    before sending, so a lost task or a killed worker leaves a row the sweep sends again."""

    endpoint = models.ForeignKey(
        WebhookEndpoint,
        on_delete=models.CASCADE,
        related_name="deliveries",
        verbose_name=_("endpoint"),
    )
    datasource = models.ForeignKey(
        Datasource,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        verbose_name=_("datasource"),
    )
    event_id = models.CharField(
        _("event id"),
        max_length=64,
        help_text=_("The webhook-id header: the same on every attempt, for de-duplication."),
    )
    event_type = models.CharField(
        _("event"), max_length=64, help_text=_("The payload's type, e.g. token.refresh_failed.")
    )
    payload = models.JSONField(_("payload"), help_text=_("The JSON body; never a secret."))
    status = models.CharField(
        _("status"),
        max_length=16,
        choices=DeliveryStatus.choices,
        default=DeliveryStatus.PENDING,
    )
    attempts = models.PositiveSmallIntegerField(
        _("attempts"), default=0, help_text=_("HTTP attempts made so far (each listed below).")
    )
    next_attempt_at = models.DateTimeField(
        _("next attempt at"),
        null=True,
        blank=True,
        help_text=_("When it is sent (again); empty once delivered or given up."),
    )
    last_status_code = models.PositiveSmallIntegerField(
        _("last HTTP status"),
        null=True,
        blank=True,
        help_text=_("The receiver's answer to the last attempt; empty: none came."),
    )
    last_error = models.CharField(
        _("last error"),
        max_length=200,
        blank=True,
        help_text=_("Why the last attempt failed, from a fixed vocabulary."),
    )
    created_at = models.DateTimeField(_("created"), default=timezone.now, db_index=True)
    delivered_at = models.DateTimeField(_("delivered"), null=True, blank=True)
    updated_at = models.DateTimeField(_("updated"), auto_now=True)

    class Meta:
        verbose_name = _("webhook delivery")
        verbose_name_plural = _("webhook deliveries")
        ordering = ["-created_at", "-id"]
        indexes = [
            # The sweep: rows still to send whose time has come (delivered ones have none).
            models.Index(
                fields=["next_attempt_at"],
                name="ds_webhook_due",
                condition=models.Q(next_attempt_at__isnull=False),
            ),
        ]
        constraints = [
            models.UniqueConstraint(fields=["endpoint", "event_id"], name="ds_webhook_once"),
        ]

    def __str__(self) -> str:
        return f"{self.event_type} → {self.endpoint_id} ({self.status})"


class WebhookAttempt(models.Model):
    """One HTTP attempt of a delivery, as the admin shows it (no bodies, no headers)."""

    delivery = models.ForeignKey(
        WebhookDelivery,
        on_delete=models.CASCADE,
        related_name="attempt_log",
        verbose_name=_("delivery"),
    )
    number = models.PositiveSmallIntegerField(_("attempt"))
    started_at = models.DateTimeField(_("started"))
    duration_ms = models.PositiveIntegerField(_("duration (ms)"))
    status_code = models.PositiveSmallIntegerField(_("HTTP status"), null=True, blank=True)
    error = models.CharField(
        _("error"),
        max_length=200,
        blank=True,
        help_text=_("What went wrong, from a fixed vocabulary (timeout, refused, HTTP 500 …)."),
    )
    delivered = models.BooleanField(_("delivered"), default=False)

    class Meta:
        verbose_name = _("delivery attempt")
        verbose_name_plural = _("delivery attempts")
        ordering = ["delivery", "number", "id"]

    def __str__(self) -> str:
        return f"Attempt {self.number}"
