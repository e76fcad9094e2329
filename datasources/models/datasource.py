"""The datasource: one upstream API, its authorization server and how calls reach it.

Secrets (client secret, private keys) are Fernet-encrypted columns; ``__str__`` and
``__repr__`` never include them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.urls import reverse
from django.utils import timezone
from django.utils.translation import gettext_lazy as _
from fernet_fields import EncryptedTextField

from ..security import dpop
from ..security.policy import validate_secure_url
from .choices import (
    MACHINE_GRANTS,
    MTLS_METHODS,
    AssertionAudience,
    ClientAuthentication,
    GrantType,
    ScopeSeparator,
    SigningAlgorithm,
    TokenPlacement,
    TokenSharing,
    TokenStatus,
)
from .values import (
    _HEADER_NAME,
    _HEADER_VALUE,
    DEFAULT_ALLOWED_METHODS,
    MAX_RETRIES,
    RESERVED_AUTH_PARAMS,
    RESERVED_DEFAULT_HEADERS,
    RETRYABLE_STATUSES,
    normalize_scopes,
    parse_methods,
    parse_status_codes,
    validate_issuer,
)

if TYPE_CHECKING:
    from ..client import DatasourceSession
    from .token import Token


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
        from .token import Token

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
        from ..security import tls

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
        from .token import Token

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
        from ..conf import app_settings

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
        from ..tokens import get_access_token

        return get_access_token(self, user=user)

    def session(self, user=None, timeout=None) -> DatasourceSession:
        """A requests session that talks to ``base_url`` with the (user's) token attached;
        ``timeout`` (seconds or (connect, read)) defaults to DATASOURCES['CLIENT_TIMEOUT']."""
        from ..client import DatasourceSession

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
