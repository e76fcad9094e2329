"""Webhook endpoints, the deliveries of events to them and each attempt."""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.db import models
from django.urls import reverse
from django.utils import timezone
from django.utils.translation import gettext_lazy as _
from fernet_fields import EncryptedTextField

from ..security.policy import validate_secure_url
from .datasource import Datasource


class WebhookEvent(models.TextChoices):
    """Event types sent to webhook endpoints (the ``type`` of the payload)."""

    DATASOURCE_AUTHORIZED = "datasource.authorized", _("Datasource authorized")
    TOKEN_REFRESH_FAILED = "token.refresh_failed", _("Token refresh failed")
    REAUTHORIZATION_REQUIRED = (
        "datasource.reauthorization_required",
        _("Datasource needs re-authorization"),
    )
    DATASOURCE_RECOVERED = "datasource.recovered", _("Datasource recovered")
    IDENTITY_MISMATCH = (
        "connection.identity_mismatch",
        _("Reconnect refused: another account signed in"),
    )


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
    (and retried) by Celery. Before sending, a worker claims the row: ``claimed_until`` and
    ``next_attempt_at`` move past the attempt's deadline in one conditional UPDATE, so nobody
    else (another worker, Retry now) sends it meanwhile, and a lost task or a killed worker
    leaves a row the sweep sends again once the claim has lapsed."""

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
    claimed_until = models.DateTimeField(
        _("being sent until"),
        null=True,
        blank=True,
        editable=False,
        help_text=_(
            "Set while a worker sends an attempt (the claim): nobody else may send it, not even "
            "Retry now, until the attempt is recorded or this time has passed."
        ),
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
