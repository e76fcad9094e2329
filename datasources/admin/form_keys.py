"""The datasource form's keys and certificates: the signing key (pasted, uploaded, from a
provider's key file, generated, kept or cleared) and the mutual-TLS pair, checked before the
model sees them. Only what the builder gave is checked; nothing is ever shown back."""

from __future__ import annotations

from typing import Any

from django import forms
from django.utils.translation import gettext_lazy as _

from ..models import ClientAuthentication, GrantType
from ..security import jose, tls

#: The largest key or key file accepted (a 4096-bit RSA PEM is about 3.3 kB).
MAX_KEY_BYTES = 16 * 1024


def pem_text(value: str | None) -> str:
    """Browsers send textareas with CRLF line ends; PEM is stored with LF."""
    return (value or "").replace("\r\n", "\n").replace("\r", "\n").strip()


def read_upload(form: forms.Form, name: str, upload) -> str:
    if upload.size > MAX_KEY_BYTES:
        form.add_error(name, _("The file is larger than a key file can be."))
        return ""
    try:
        return upload.read().decode("utf-8")
    except UnicodeDecodeError:
        form.add_error(name, _("The file is not text (PEM or JSON): a DER or PKCS#12 file?"))
        return ""


class KeysAndCertificates:
    """Mixin of DatasourceForm (see the module docstring)."""

    held_key: str | None

    def _describe_stored_certificate(self) -> None:
        """The stored client certificate as subject, issuer, expiry and thumbprint (never the
        PEM); the box that removes it only when there is one."""
        if self.instance.pk and self.instance.tls_client_certificate:
            try:
                info = tls.certificate_info(self.instance.tls_client_certificate)
            except tls.TLSConfigError as err:
                described = str(err)
            else:
                described = _(
                    "Stored (encrypted): %(subject)s, issued by %(issuer)s, valid until "
                    "%(until)s, x5t#S256 %(thumbprint)s. Leave blank to keep it."
                ) % {
                    "subject": info.subject,
                    "issuer": "itself" if info.self_signed else info.issuer,
                    "until": f"{info.not_after:%Y-%m-%d}",
                    "thumbprint": info.thumbprint,
                }
            self.fields["tls_client_certificate"].help_text = described
        elif "clear_tls_client_certificate" in self.fields:
            self.fields["clear_tls_client_certificate"].disabled = True

    def _apply_tls_pair(self, cleaned: dict) -> None:
        """The write-only certificate and key go to the instance (checked by its clean()):
        typed values replace the stored pair, blanks keep it, the box removes it."""
        certificate = pem_text(cleaned.pop("tls_client_certificate", ""))
        key = pem_text(cleaned.pop("tls_client_key", ""))
        self.tls_pair_changed = False
        if cleaned.pop("clear_tls_client_certificate", False):
            self.instance.tls_client_certificate = None
            self.instance.tls_client_key = None
            self.tls_pair_changed = True
        elif certificate or key:
            self.instance.tls_client_certificate = certificate or None
            self.instance.tls_client_key = key or None
            self.tls_pair_changed = True

    def _given_key(self, cleaned: dict) -> tuple[str, str] | None:
        """(the key given, the key file's text) from the boxes and uploads; a key file also
        fills the client ID, key ID and token URL it names. None: the key file is unusable."""
        key_text = cleaned.get("private_key") or ""
        upload = cleaned.get("private_key_file")
        if upload and not key_text:
            key_text = read_upload(self, "private_key_file", upload)
        account_text = cleaned.get("service_account_key") or ""
        account_upload = cleaned.get("service_account_key_file")
        if account_upload and not account_text:
            account_text = read_upload(self, "service_account_key_file", account_upload)
        if account_text:
            try:
                account = jose.read_service_account_key(account_text)
            except jose.KeyProblem as err:
                self.add_error("service_account_key", str(err))
                return None
            key_text = account.private_key
            cleaned["client_id"] = account.client_email
            self._errors.pop("client_id", None)
            if account.private_key_id:
                cleaned["private_key_id"] = account.private_key_id
            if account.token_uri:
                cleaned["access_token_url"] = account.token_uri
                self._errors.pop("access_token_url", None)
            self.imported_key_file = True
        return key_text, account_text

    def _clean_key(self, cleaned: dict) -> None:
        """The private key: pasted, uploaded, from a key file, generated, kept, or cleared;
        checked against the algorithm and certificate. Fills the fields a key file names."""
        given = self._given_key(cleaned)
        if given is None:
            return
        key_text, account_text = given
        key_text = key_text or self.held_key or ""
        self._key_text = key_text
        for name in ("private_key_file", "service_account_key", "service_account_key_file"):
            cleaned.pop(name, None)
        generate = cleaned.get("generate_private_key")
        if cleaned.get("clear_private_key") and not key_text and not generate:
            cleaned["private_key"] = None
            stored = ""
        elif key_text:
            cleaned["private_key"] = key_text.strip() + "\n"
            stored = key_text
        else:
            cleaned.pop("private_key", None)  # blank keeps the stored key
            stored = self.instance.private_key if self.instance.pk else ""
        if generate:
            return  # made on save (admin), for the chosen algorithm
        jwt_bearer = cleaned.get("grant_type") == GrantType.JWT_BEARER
        needs_key = (
            jwt_bearer
            or cleaned.get("client_authentication") == ClientAuthentication.PRIVATE_KEY_JWT
        )
        if needs_key and not stored:
            self.add_error(
                "private_key",
                _(
                    "%(what)s needs a private key: paste or upload one, import a key file, or "
                    "tick “Generate a new key pair when saving”."
                )
                % {"what": _("The JWT bearer grant") if jwt_bearer else "private_key_jwt"},
            )
            return
        if stored:
            self._check_key(
                cleaned, stored, "service_account_key" if account_text else "private_key"
            )

    def _check_key(self, cleaned: dict[str, Any], stored: str, field: str) -> None:
        """The key loads, suits the chosen algorithm and matches the certificate, if any."""
        try:
            key = jose.load_private_key(stored)
        except jose.KeyProblem as err:
            self.add_error(field, str(err))
            return
        try:
            jose.algorithm_for(key, cleaned.get("signing_algorithm") or "")
        except jose.KeyProblem as err:
            self.add_error("signing_algorithm", str(err))
        certificate = cleaned.get("signing_certificate") or ""
        if certificate:
            try:
                jose.certificate_headers(certificate, key)
            except jose.KeyProblem as err:
                self.add_error("signing_certificate", str(err))
