"""The datasource's sender-constraint settings: DPoP (RFC 9449) and mutual TLS (RFC 8705), which
tie tokens and client authentication to a key of this datasource."""

from __future__ import annotations

from django.db import models
from django.utils.translation import gettext_lazy as _
from fernet_fields import EncryptedTextField

from ..security import dpop


class SenderConstraintSettings(models.Model):
    """Abstract: fields of :class:`~datasources.models.Datasource` (one table)."""

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

    class Meta:
        abstract = True

    def set_dpop_key(self, private_key_pem: str) -> None:
        """Use ``private_key_pem`` as the DPoP key (checked: DPoPKeyError if unusable)."""
        self.dpop_jkt = dpop.signer(private_key_pem).thumbprint
        self.dpop_private_key = private_key_pem

    @property
    def dpop_public_jwk(self) -> str:
        """The DPoP public key as a JWK (JSON), or "" without a key."""
        return dpop.public_jwk_json(self.dpop_private_key) if self.dpop_private_key else ""
