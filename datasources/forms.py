"""Admin form: the documented fields, a write-only client secret, readable errors."""

from __future__ import annotations

import re

from django import forms
from django.db import models
from django.utils.translation import gettext_lazy as _

from . import oauth, secretkeep
from .exceptions import DatasourceError
from .explain import JSON_HINT
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


#: ``{tenant}``-style placeholders left from a provider preset.
PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.-]*)\}")

#: Help in plain words; the standards are named only in a "learn more" tail.
HELP_TEXTS = {
    "name": _("A name you will recognise, e.g. “CRM (production)”."),
    "slug": _(
        "A short unique name used in the proxy URL: /api/v1/datasources/SLUG/proxy/… "
        "Letters, digits, - and _ only."
    ),
    "base_url": _(
        "Where the API lives, e.g. https://api.example.com/v1/. Calls through the proxy can "
        "only reach URLs below it."
    ),
    "grant_type": _(
        "Authorization code: a person signs in at the provider once and grants access (most "
        "SaaS APIs). Client credentials: server to server with the client ID and secret "
        "alone, nobody signs in."
    ),
    "token_sharing": _(
        "Shared: you authorize once and every app and user calls the API with that access. "
        "Per user: each user connects their own account and calls the API as themselves."
    ),
    "authorization_url": _(
        "The provider's sign-in and consent page, from its OAuth documentation (it often ends "
        "in /authorize)."
    ),
    "access_token_url": _(
        "The provider's token endpoint, from its OAuth documentation (it often ends in "
        "/token). Access tokens are fetched and renewed here."
    ),
    "issuer": _(
        "Optional: the provider's issuer URL, e.g. https://accounts.google.com. Tick the box "
        "below to fill the endpoints from it. When set, sign-in answers from another issuer "
        "are refused. Learn more: OpenID Connect discovery, RFC 8414, RFC 9207."
    ),
    "client_id": _("From the app (client) you registered at the provider."),
    "client_authentication": _(
        "How the client ID and secret are sent when fetching tokens. Most providers accept "
        "the Basic header; choose the body if the provider's documentation says "
        "client_id and client_secret go in the request body."
    ),
    "scopes": _(
        "The permissions to ask for, named as the provider documents them, separated by "
        "commas or spaces (e.g. read, write). Empty if the provider has none."
    ),
    "scope_separator": _(
        "How the scopes are joined when sent: spaces is the standard; Slack and Zoho want commas."
    ),
    "custom_auth_params": _(
        "Extra settings for the provider's consent page, as JSON. Many providers send a "
        "refresh token (which keeps the connection alive without you) only when asked, e.g. "
        'Google and Zoho: {"access_type": "offline", "prompt": "consent"}.'
    ),
    "use_pkce": _(
        "Extra protection for the sign-in step. Leave it on unless the provider rejects it. "
        "Learn more: PKCE, RFC 7636."
    ),
    "token_placement": _(
        "Where the access token goes in each API call: the Authorization header (almost "
        "always), or a query parameter when the API's documentation requires it (URLs end up "
        "in logs). Learn more: RFC 9700 §4.3.2."
    ),
    "header_prefix": _(
        "The word before the token in the Authorization header; empty means Bearer."
    ),
    "query_param_name": _("The query parameter that carries the token, e.g. access_token."),
    "revocation_url": _(
        "Optional: the provider's revoke endpoint. Tokens are revoked there when you "
        "disconnect or delete this datasource. Learn more: RFC 7009."
    ),
    "audience": _("Optional: the API the token is for, when the provider asks (Auth0, Okta)."),
    "resource": _(
        "Optional: the API the token is for, as a URL, when the provider asks. Learn more: "
        "RFC 8707."
    ),
    "issuer_returns_iss": _(
        "The provider names itself (iss) when sending the person back. When on and an issuer "
        "is set, an answer without it is refused; when off, only a wrong one is. Learn more: "
        "RFC 9207."
    ),
}


KEPT_HELP = _(
    "The secret you typed is kept for this form (it is not shown). Leave the box blank to use "
    "it, or type another."
)


class DatasourceForm(forms.ModelForm):
    client_secret = forms.CharField(
        label=_("Client secret"),
        required=False,
        strip=True,
        widget=WriteOnlySecretInput,
    )
    #: Refers to a typed secret kept server-side after a validation error (see secretkeep).
    secret_hold = forms.CharField(required=False, widget=forms.HiddenInput)
    discover = forms.BooleanField(
        label=_("Fill the endpoints from the issuer's metadata"),
        required=False,
        help_text=_(
            "Reads the provider's published configuration and fills the authorization, token "
            "and revocation URLs, PKCE and iss support. Learn more: OpenID Connect discovery, "
            "RFC 8414."
        ),
    )
    clear_client_secret = forms.BooleanField(
        label=_("Clear the stored client secret"),
        required=False,
        help_text=_("Tick to remove the stored secret (for public clients)."),
    )
    #: The request, set by the admin (the session holds a typed secret across errors).
    request = None

    class Meta:
        model = Datasource
        formfield_callback = _formfield
        fields = (*CONFIG_FIELDS, "client_secret")
        help_texts = HELP_TEXTS
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
        for name in ("custom_auth_params", "default_headers", "default_query_params"):
            if name in self.fields:
                self.fields[name].error_messages["invalid"] = JSON_HINT
        for name in ("retry_count", "retry_budget"):
            if name in self.fields:  # left empty (or not sent by an older form): the default
                self.fields[name].required = False
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

    @property
    def _session(self):
        return getattr(self.request, "session", None)

    def _clean_fields(self) -> None:
        super()._clean_fields()
        self._placeholders: dict[str, str] = {}
        for name, field in self.fields.items():
            if name in ("client_secret", "secret_hold") or field.disabled:
                continue
            raw = self.data.get(self.add_prefix(name))
            found = PLACEHOLDER.search(raw) if isinstance(raw, str) else None
            if found:
                # Replaces "Enter a valid URL." and the like: this is what is wrong.
                self._errors.pop(name, None)
                self.cleaned_data.pop(name, None)
                self._placeholders[name] = _(
                    "Replace the placeholder %(placeholder)s with your own value (the preset's "
                    "notes above say what goes there)."
                ) % {"placeholder": found.group(0)}
                self.add_error(name, self._placeholders[name])

    def full_clean(self) -> None:
        super().full_clean()
        for name, problem in getattr(self, "_placeholders", {}).items():
            # The only thing to say about such a field (not also "needs an authorization URL").
            self._errors[name] = self.error_class([problem])
        typed = self.data.get("client_secret", "").strip() if self.is_bound else ""
        secret = typed or self.held_secret
        if self._errors and secret and self._session is not None:
            # Keep what was typed for this form, server-side; the page shows only a reference.
            reference = secretkeep.keep(self._session, secret, self.data.get("secret_hold", ""))
            self.data = self.data.copy()
            self.data["secret_hold"] = reference
            self.data["client_secret"] = ""
            self.held_secret = secret
            # The bound field copied the help text when validation created it.
            self.fields["client_secret"].help_text = self["client_secret"].help_text = KEPT_HELP

    def forget_held_secret(self) -> None:
        """After a successful save: the held secret, if any, is no longer needed."""
        if self._session is not None and self.data.get("secret_hold"):
            secretkeep.drop(self._session, self.data["secret_hold"])

    def clean_scopes(self) -> str:
        return normalize_scopes(self.cleaned_data.get("scopes", ""))

    def clean_custom_auth_params(self):
        value = self.cleaned_data.get("custom_auth_params")
        if value in (None, ""):
            return {}
        if not isinstance(value, dict):
            raise forms.ValidationError(JSON_HINT)
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

    def clean_retry_count(self):
        value = self.cleaned_data.get("retry_count")
        return Datasource._meta.get_field("retry_count").default if value is None else value

    def clean_retry_budget(self):
        value = self.cleaned_data.get("retry_budget")
        return Datasource._meta.get_field("retry_budget").default if value is None else value

    def clean(self):
        cleaned = super().clean()
        cleaned.pop("secret_hold", None)
        if cleaned.get("discover"):
            self._discover(cleaned)
        secret = cleaned.get("client_secret") or self.held_secret
        if cleaned.get("clear_client_secret"):
            cleaned["client_secret"] = None
        elif secret:
            cleaned["client_secret"] = secret
        else:
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
        ) or bool(self.cleaned_data.get("clear_client_secret") or self.held_secret)


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
