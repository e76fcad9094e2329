"""API keys: the credentials of application code calling the proxy."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils.translation import gettext_lazy as _

from .datasource import Datasource

API_KEY_PREFIX = "dsk_"

#: What an API key may do, by the name used in the API, the admin and ``create_api_key``, with
#: the field that grants it. ``proxy`` is today's behaviour and the default; ``token`` hands out
#: access tokens, so it is off unless granted and every use is recorded.
PERMISSIONS = {
    "proxy": "may_proxy",
    "connect": "may_connect",
    "manage": "may_manage",
    "token": "may_read_token",
}


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
    may_proxy = models.BooleanField(
        _("proxy"), default=True, help_text=_("Call the datasources through the proxy.")
    )
    may_connect = models.BooleanField(
        _("connect"),
        default=False,
        help_text=_("Create connect links for end users to connect their own accounts."),
    )
    may_manage = models.BooleanField(
        _("manage"),
        default=False,
        help_text=_("Read and manage datasources and connections through the JSON API."),
    )
    may_read_token = models.BooleanField(
        _("read access tokens"),
        default=False,
        help_text=_(
            "Read a fresh access token through the JSON API (the refresh token never). Every "
            "use is recorded as a token event."
        ),
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

    @property
    def permissions(self) -> frozenset[str]:
        """The names (:data:`PERMISSIONS`) this key is granted."""
        return frozenset(name for name, field in PERMISSIONS.items() if getattr(self, field))
