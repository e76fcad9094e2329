"""The datasource's client-assertion settings: the private key and how the JWTs it signs look
(private_key_jwt client authentication, RFC 7523; the JWT bearer grant)."""

from __future__ import annotations

from django.db import models
from django.utils.translation import gettext_lazy as _
from fernet_fields import EncryptedTextField

from .choices import AssertionAudience, SigningAlgorithm


class SigningSettings(models.Model):
    """Abstract: fields of :class:`~datasources.models.Datasource` (one table)."""

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

    class Meta:
        abstract = True

    @property
    def has_private_key(self) -> bool:
        return bool(self.private_key)
