"""Admin form: the documented fields, a write-only client secret, readable errors."""

from __future__ import annotations

from django import forms
from django.db import models
from django.utils.translation import gettext_lazy as _

from . import oauth
from .exceptions import DatasourceError
from .models import CONFIG_FIELDS, ApiKey, Datasource, GrantType, normalize_scopes


class WriteOnlySecretInput(forms.PasswordInput):
    """Never renders a value, not even a masked one."""

    def __init__(self, attrs=None) -> None:
        super().__init__(
            attrs={"autocomplete": "new-password", **(attrs or {})}, render_value=False
        )

    def get_context(self, name, value, attrs):
        return super().get_context(name, None, attrs)


def _formfield(db_field, **kwargs):
    if isinstance(db_field, models.URLField):
        kwargs.setdefault("assume_scheme", "https")
    return db_field.formfield(**kwargs)


class DatasourceForm(forms.ModelForm):
    client_secret = forms.CharField(
        label=_("Client secret"),
        required=False,
        strip=True,
        widget=WriteOnlySecretInput,
    )
    discover = forms.BooleanField(
        label=_("Fill the endpoints from the issuer's metadata"),
        required=False,
        help_text=_(
            "Fetches /.well-known/openid-configuration (or RFC 8414 oauth-authorization-server) "
            "from the issuer and fills the authorization, token and revocation URLs, PKCE and iss "
            "support."
        ),
    )
    clear_client_secret = forms.BooleanField(
        label=_("Clear the stored client secret"),
        required=False,
        help_text=_("Tick to remove the stored secret (for public clients)."),
    )

    class Meta:
        model = Datasource
        formfield_callback = _formfield
        fields = (*CONFIG_FIELDS, "client_secret")
        widgets = {
            "custom_auth_params": forms.Textarea(attrs={"rows": 3, "cols": 60}),
            "default_headers": forms.Textarea(attrs={"rows": 3, "cols": 60}),
            "default_query_params": forms.Textarea(attrs={"rows": 3, "cols": 60}),
            "scopes": forms.TextInput(attrs={"size": 60}),
        }

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.data.get("discover") and "access_token_url" in self.fields:
            self.fields["access_token_url"].required = False  # discovery fills it
        stored = bool(self.instance.pk and self.instance.client_secret)
        field = self.fields["client_secret"]
        field.help_text = (
            _("A secret is stored (encrypted). Leave blank to keep it, or type a new one.")
            if stored
            else _("No secret is stored. It is encrypted at rest and never shown again.")
        )
        if "clear_client_secret" in self.fields and not stored:
            self.fields["clear_client_secret"].disabled = True

    def clean_scopes(self) -> str:
        return normalize_scopes(self.cleaned_data.get("scopes", ""))

    def clean_custom_auth_params(self):
        value = self.cleaned_data.get("custom_auth_params")
        if value in (None, ""):
            return {}
        if not isinstance(value, dict):
            raise forms.ValidationError(_('Enter a JSON object, e.g. {"prompt": "consent"}.'))
        return value  # its keys and values are checked by Datasource.clean()

    def clean_default_headers(self):
        return self._json_object("default_headers")

    def clean_default_query_params(self):
        return self._json_object("default_query_params")

    def _json_object(self, name: str):
        value = self.cleaned_data.get(name)
        if value in (None, ""):
            return {}
        if not isinstance(value, dict):
            raise forms.ValidationError(
                _('Enter a JSON object, e.g. {"Accept": "application/json"}.')
            )
        return value  # names and values are checked by Datasource.clean()

    def clean(self):
        cleaned = super().clean()
        if cleaned.get("discover"):
            self._discover(cleaned)
        secret = cleaned.get("client_secret")
        if cleaned.get("clear_client_secret"):
            cleaned["client_secret"] = None
        elif not secret:
            # Blank keeps the stored value: construct_instance skips fields not in cleaned_data.
            cleaned.pop("client_secret", None)
        if (
            cleaned.get("grant_type") == GrantType.CLIENT_CREDENTIALS
            and not secret
            and not (self.instance.pk and self.instance.client_secret)
            and not cleaned.get("clear_client_secret")
        ):
            self.add_error(
                "client_secret", _("The client credentials grant needs a client secret.")
            )
        return cleaned

    def _discover(self, cleaned: dict) -> None:
        issuer = cleaned.get("issuer")
        if not issuer:
            self.add_error("issuer", _("Enter the issuer URL to discover its endpoints."))
            return
        try:
            metadata = oauth.discover(issuer)
        except DatasourceError as err:
            self.add_error("issuer", str(err))
            return
        cleaned["access_token_url"] = metadata.token_endpoint
        if metadata.authorization_endpoint:
            cleaned["authorization_url"] = metadata.authorization_endpoint
        if metadata.revocation_endpoint:
            cleaned["revocation_url"] = metadata.revocation_endpoint
        cleaned["use_pkce"] = metadata.pkce_s256
        cleaned["issuer_returns_iss"] = metadata.returns_iss
        self.discovered = metadata

    @property
    def credentials_changed(self) -> bool:
        return bool(
            {
                "client_id",
                "client_secret",
                "access_token_url",
                "scopes",
                "client_authentication",
                "audience",
                "resource",
            }
            & set(self.changed_data)
        ) or bool(self.cleaned_data.get("clear_client_secret"))


class ApiKeyForm(forms.ModelForm):
    """Least privilege by default: a key gets the datasources chosen, or all of them only when
    that is ticked; choosing neither (or both) is an error, not a silent "all"."""

    class Meta:
        model = ApiKey
        fields = ("name", "all_datasources", "datasources", "user")

    def clean(self):
        cleaned = super().clean()
        chosen = cleaned.get("datasources")
        if cleaned.get("all_datasources") and chosen:
            raise forms.ValidationError(
                _("Either tick “all datasources” or choose datasources, not both.")
            )
        if not cleaned.get("all_datasources") and not chosen and "datasources" not in self.errors:
            raise forms.ValidationError(
                _("Choose the datasources this key may call, or tick “all datasources”.")
            )
        return cleaned
