"""The datasource form's write-only secrets: widgets that never render a value, and the typed
client secret or private key kept server-side (:mod:`.secretkeep`) across a validation error, so
the builder does not type it again and the page never carries it."""

from __future__ import annotations

from typing import Any

from django import forms
from django.utils.translation import gettext_lazy as _

from . import secretkeep


class WriteOnlySecretInput(forms.PasswordInput):
    """Never renders a value, not even a masked one."""

    def __init__(self, attrs=None) -> None:
        super().__init__(
            attrs={"autocomplete": "new-password", **(attrs or {})}, render_value=False
        )

    def get_context(self, name, value, attrs):
        return super().get_context(name, None, attrs)


class WriteOnlyTextarea(forms.Textarea):
    """A textarea for a pasted private key or key file: never renders a value."""

    def __init__(self, attrs=None) -> None:
        super().__init__(
            attrs={
                "rows": 4,
                "cols": 60,
                "autocomplete": "off",
                "spellcheck": "false",
                **(attrs or {}),
            }
        )

    def get_context(self, name, value, attrs):
        return super().get_context(name, None, attrs)


KEPT_HELP = _(
    "The secret you typed is kept for this form (it is not shown). Leave the box blank to use "
    "it, or type another."
)
KEPT_KEY_HELP = _(
    "The private key you gave is kept for this form (it is not shown). Leave the box blank to "
    "use it, or paste another."
)
#: Form fields that carry secrets: never echoed, never searched for placeholders.
SECRET_FORM_FIELDS = frozenset(
    {"client_secret", "secret_hold", "private_key", "service_account_key", "key_hold"}
)


class HeldSecrets:
    """Mixin of DatasourceForm: takes a held secret and key back when the form is bound, and
    holds what was typed when validation fails."""

    request: Any
    held_secret: str | None
    held_key: str | None

    @property
    def _session(self):
        return getattr(self.request, "session", None)

    def _take_held_secret(self) -> None:
        """The client secret typed before a validation error, and its help text."""
        stored = bool(self.instance.pk and self.instance.client_secret)
        self.held_secret = None
        if self.is_bound and not self.data.get("client_secret") and self._session is not None:
            self.held_secret = secretkeep.take(self._session, self.data.get("secret_hold", ""))
        field = self.fields["client_secret"]
        if self.held_secret:
            field.help_text = KEPT_HELP
        elif stored:
            field.help_text = _(
                "A secret is stored (encrypted). Leave blank to keep it, or type a new one."
            )
        else:
            field.help_text = _(
                "From the app you registered at the provider. It is encrypted at rest and never "
                "shown again."
            )
        if "clear_client_secret" in self.fields and not stored:
            self.fields["clear_client_secret"].disabled = True

    def _take_held_key(self) -> None:
        """The private key given before a validation error, and its help text."""
        self.held_key = None
        if self.is_bound and self._session is not None and self.data.get("key_hold"):
            self.held_key = secretkeep.take(self._session, self.data.get("key_hold", ""))
        key_stored = bool(self.instance.pk and self.instance.private_key)
        if "private_key" in self.fields:
            self.fields["private_key"].help_text = (
                KEPT_KEY_HELP
                if self.held_key
                else _(
                    "A private key is stored (encrypted). Leave blank to keep it, or paste another."
                )
                if key_stored
                else _(
                    "PEM private key (RSA 2048+ or EC P-256) for private_key_jwt and the JWT "
                    "bearer grant. Encrypted at rest and never shown again; its public key is "
                    "shown on this page."
                )
            )
        if "clear_private_key" in self.fields and not key_stored:
            self.fields["clear_private_key"].disabled = True

    def _hold_typed_secrets(self) -> None:
        """After a failed validation: keep what was typed for this form, server-side; the page
        shows only a reference."""
        typed = self.data.get("client_secret", "").strip() if self.is_bound else ""
        secret = typed or self.held_secret
        if self._errors and secret and self._session is not None:
            reference = secretkeep.keep(self._session, secret, self.data.get("secret_hold", ""))
            self.data = self.data.copy()
            self.data["secret_hold"] = reference
            self.data["client_secret"] = ""
            self.held_secret = secret
            # The bound field copied the help text when validation created it.
            self.fields["client_secret"].help_text = self["client_secret"].help_text = KEPT_HELP
        key = getattr(self, "_key_text", None) or self.held_key
        if self._errors and key and self._session is not None and "private_key" in self.fields:
            reference = secretkeep.keep(self._session, key, self.data.get("key_hold", ""))
            self.data = self.data.copy()
            self.data["key_hold"] = reference
            self.data["private_key"] = ""
            self.data["service_account_key"] = ""
            self.held_key = key
            self.fields["private_key"].help_text = self["private_key"].help_text = KEPT_KEY_HELP

    def forget_held_secret(self) -> None:
        """After a successful save: the held secret, if any, is no longer needed."""
        if self._session is not None and self.data.get("secret_hold"):
            secretkeep.drop(self._session, self.data["secret_hold"])
        if self._session is not None and self.data.get("key_hold"):
            secretkeep.drop(self._session, self.data["key_hold"])
