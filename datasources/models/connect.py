"""Connect sessions: a short-lived, single-use link that lets an end user of an application
connect their own account to a datasource."""

from __future__ import annotations

import uuid

from django.db import models
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from .apikey import ApiKey
from .datasource import Datasource


class ConnectSession(models.Model):
    """Created by an application (an API key with the ``connect`` permission) for one end user.

    The link's secret travels in the URL; only its SHA-256 is stored (like an API key's). The
    session is claimed by the first browser that presses *Connect* (``browser_hash``: a hash of
    that browser's session), so the same link cannot be finished elsewhere, and it ends with
    one ``outcome``. The ``public_id`` is what the application sees (in the API's answer and in
    the return URL), never the secret.
    """

    class Outcome(models.TextChoices):
        CONNECTED = "connected", _("Connected")
        ACCESS_DENIED = "access_denied", _("Refused at the provider")
        PROVIDER_ERROR = "provider_error", _("Provider error")
        IDENTITY_MISMATCH = "identity_mismatch", _("Another account")

    public_id = models.UUIDField(_("session"), default=uuid.uuid4, unique=True, editable=False)
    secret_hash = models.CharField(max_length=64, unique=True, editable=False)
    datasource = models.ForeignKey(
        Datasource,
        on_delete=models.CASCADE,
        related_name="connect_sessions",
        verbose_name=_("datasource"),
    )
    end_user = models.CharField(_("end user"), max_length=255)
    display_name = models.CharField(_("display name"), max_length=255, blank=True)
    return_url = models.CharField(_("return URL"), max_length=2000)
    api_key = models.ForeignKey(
        ApiKey,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        verbose_name=_("created with key"),
    )
    created_at = models.DateTimeField(_("created"), default=timezone.now)
    expires_at = models.DateTimeField(_("expires"), db_index=True)
    claimed_at = models.DateTimeField(_("claimed"), null=True, blank=True)
    browser_hash = models.CharField(max_length=64, blank=True, editable=False)
    finished_at = models.DateTimeField(_("finished"), null=True, blank=True)
    outcome = models.CharField(_("outcome"), max_length=32, choices=Outcome.choices, blank=True)

    class Meta:
        verbose_name = _("connect session")
        verbose_name_plural = _("connect sessions")
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"Connect session {self.public_id} for {self.end_user}"

    def __repr__(self) -> str:
        return f"<ConnectSession {self.pk}: datasource={self.datasource_id}>"

    @property
    def shown_name(self) -> str:
        """Who is connecting, as the connect page says it."""
        return self.display_name or self.end_user
