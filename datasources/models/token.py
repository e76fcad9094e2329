"""Tokens (one per owner of a datasource) and the audit trail of what happened to them.

The access and refresh tokens are encrypted columns, never in ``__str__`` or ``__repr__``.
"""

from __future__ import annotations

from datetime import datetime

from django.conf import settings
from django.db import models
from django.utils import timezone
from django.utils.translation import gettext_lazy as _
from fernet_fields import EncryptedTextField

from .choices import FailureKindChoices, TokenStatus
from .datasource import Datasource
from .querysets import TokenQuerySet


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
    end_user = models.CharField(
        _("end user"),
        max_length=255,
        blank=True,
        default="",
        help_text=_(
            "Whose token, for an end user of an application (an id the application chose, who "
            "connected through a connect link); empty: the shared or a Django user's token."
        ),
    )
    identity = models.CharField(
        _("account"),
        max_length=500,
        blank=True,
        help_text=_(
            "The upstream account the token was authorized for (ID token issuer and subject, or "
            "the userinfo field): a reconnect must sign in the same one. Not a secret."
        ),
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
    rejection_refreshed_at = models.DateTimeField(
        _("last refreshed after a rejection"),
        null=True,
        blank=True,
        help_text=_(
            "When the upstream API last rejected this token and that rejection caused a "
            "refresh. Another rejection within REJECTION_COOLDOWN is passed on to the caller "
            "instead, so an API that always answers 401 costs one refresh per cooldown."
        ),
    )
    lease_id = models.CharField(_("refresh lease"), max_length=64, blank=True, editable=False)
    lease_expires_at = models.DateTimeField(
        _("refresh lease expires at"), null=True, blank=True, editable=False
    )
    refresh_started_at = models.DateTimeField(
        _("refresh started at"),
        null=True,
        blank=True,
        editable=False,
        help_text=_(
            "When the holder of the current (or last) refresh lease took it, moments before it "
            "sent its request: if the holder dies, this is when the lost request was sent."
        ),
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
                condition=models.Q(user__isnull=True, end_user=""),
                name="ds_token_one_shared",
            ),
            models.UniqueConstraint(fields=["datasource", "user"], name="ds_token_one_per_user"),
            # Also the index that lists a datasource's end users in order (paginated).
            models.UniqueConstraint(
                fields=["datasource", "end_user"],
                condition=~models.Q(end_user=""),
                name="ds_token_one_per_end_user",
            ),
            models.CheckConstraint(
                condition=models.Q(user__isnull=True) | models.Q(end_user=""),
                name="ds_token_one_owner",
            ),
        ]

    def __str__(self) -> str:
        whose = (
            f", user {self.user_id}"
            if self.user_id
            else f", end user {self.end_user}"
            if self.end_user
            else ""
        )
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
        SCOPE_REFUSED = "scope_refused", _("Scope refused by the API")
        TOKEN_READ = "token_read", _("Access token read through the API")
        IDENTITY_MISMATCH = "identity_mismatch", _("Reconnect refused: another account")

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
