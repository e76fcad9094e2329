"""The datasource: one upstream API, its authorization server and how calls reach it.

Secrets (client secret, private keys) are Fernet-encrypted columns; ``__str__`` and
``__repr__`` never include them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.urls import reverse
from django.utils import timezone
from django.utils.translation import gettext_lazy as _
from fernet_fields import EncryptedTextField

from ..security import dpop
from ..security.policy import validate_secure_url
from . import validation
from .calls import CallSettings
from .choices import (
    MACHINE_GRANTS,
    ClientAuthentication,
    GrantType,
    ScopeSeparator,
    TokenPlacement,
    TokenSharing,
    TokenStatus,
)
from .sender import SenderConstraintSettings
from .signing import SigningSettings
from .values import (
    normalize_scopes,
)

if TYPE_CHECKING:
    from ..client import DatasourceSession
    from .token import Token


class Datasource(SigningSettings, SenderConstraintSettings, CallSettings):
    """An upstream API: where it lives, its authorization server, and how tokens are obtained
    and sent. The signing-key, sender-constraint and call settings are declared in their own
    modules (:mod:`.signing`, :mod:`.sender`, :mod:`.calls`); all are columns of this table."""

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
    allowed_return_urls = models.TextField(
        _("allowed return URLs"),
        blank=True,
        help_text=_(
            "Where a connect link may send the end user back to when they are done, one per "
            "line: an origin (https://app.example.com: any path on it) or a URL prefix "
            "(https://app.example.com/settings/). Nothing is allowed until you add one."
        ),
    )
    userinfo_url = models.URLField(
        _("userinfo URL"),
        max_length=2000,
        blank=True,
        validators=[validate_secure_url],
        help_text=_(
            "A “who am I” call that names the signed-in account (GitHub: "
            "https://api.github.com/user), used when the provider sends no OpenID Connect ID "
            "token: a reconnect of an end user or a per-user token must sign in the same "
            "account. With neither, reconnects are not checked."
        ),
    )
    userinfo_identity_field = models.CharField(
        _("identity field"),
        max_length=100,
        blank=True,
        help_text=_("The field of the userinfo answer that names the account (GitHub: id)."),
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

        Token.objects.get_or_create(datasource=self, user=None, end_user="")
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
        """The settings' rules (:mod:`.validation`): problems by field, values normalised."""
        outcome = validation.check(self)
        for name, value in outcome.values.items():
            setattr(self, name, value)
        if outcome.problems:
            raise ValidationError(outcome.problems)

    @property
    def token(self) -> Token:
        """The shared token (the one used unless tokens are per user)."""
        from .token import Token

        cached = getattr(self, "_shared_token", None)
        if cached is None:
            cached, _ = Token.objects.get_or_create(datasource=self, user=None, end_user="")
            self._shared_token = cached
        return cached

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

    @property
    def has_client_secret(self) -> bool:
        return bool(self.client_secret)

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

    def get_access_token(self, user=None, *, end_user: str = "") -> str:
        """A valid access token, refreshed first when it is about to expire.

        ``user`` selects whose token when tokens are per user; ``end_user`` an end user's (who
        connected through a connect link; NotConnected when they have none, never the shared
        token instead).
        """
        from ..tokens import get_access_token

        return get_access_token(self, user=user, end_user=end_user)

    def session(self, user=None, timeout=None, *, end_user: str = "") -> DatasourceSession:
        """A requests session that talks to ``base_url`` with the (user's, or ``end_user``'s)
        token attached; ``timeout`` (seconds or (connect, read)) defaults to
        DATASOURCES['CLIENT_TIMEOUT']."""
        from ..client import DatasourceSession

        return DatasourceSession(self, user=user, timeout=timeout, end_user=end_user)
