"""Pending authorization-code requests."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone
from django.utils.translation import gettext_lazy as _
from fernet_fields import EncryptedTextField

from .datasource import Datasource


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
    #: Started from a connect link: the token is the end user's, and the person goes back to
    #: the application's return URL.
    connect_session = models.ForeignKey(
        "datasources.ConnectSession", on_delete=models.CASCADE, null=True, related_name="+"
    )

    class Meta:
        verbose_name = _("authorization request")
        verbose_name_plural = _("authorization requests")

    def __str__(self) -> str:
        return f"Authorization request for {self.datasource_id}"

    def __repr__(self) -> str:
        return f"<AuthorizationRequest {self.pk}: datasource={self.datasource_id}>"
