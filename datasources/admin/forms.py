"""Admin form: the documented fields, a write-only client secret, readable errors."""

from __future__ import annotations

import re

from django import forms
from django.db import models
from django.utils.translation import gettext_lazy as _

from ..models import (
    CONFIG_FIELDS,
    MTLS_METHODS,
    PERMISSIONS,
    ApiKey,
    AssertionAudience,
    ClientAuthentication,
    Datasource,
    GrantType,
    WebhookEndpoint,
    WebhookEvent,
    normalize_scopes,
)
from .explain import BODY_RULES_HINT, JSON_HINT
from .form_discovery import Discovery
from .form_keys import MAX_KEY_BYTES, KeysAndCertificates
from .form_secrets import (
    SECRET_FORM_FIELDS,
    HeldSecrets,
    WriteOnlySecretInput,
    WriteOnlyTextarea,
)


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
        "alone, nobody signs in. JWT bearer: server to server with a service account's "
        "private key (Google service accounts, Salesforce server-to-server); nobody signs in. "
        "Learn more: RFC 7523."
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
        "How the app proves who it is when fetching tokens. Most providers accept the Basic "
        "header; choose the body if the provider's documentation says client_id and "
        "client_secret go in the request body. Enterprise providers (Microsoft Entra ID with "
        "a certificate, Okta service apps) ask for a JWT signed with a private key "
        "(private_key_jwt): paste the key below or generate a key pair. Some ask for mutual "
        "TLS: a client certificate (CA-issued or self-signed) under “Mutual TLS”. Learn more: "
        "RFC 7523, RFC 8705."
    ),
    "private_key_id": _(
        "The key ID (kid) the provider shows for the registered public key; Google calls it "
        "private_key_id. Filled when a key pair is generated or a key file imported."
    ),
    "signing_algorithm": _("Leave on “from the key” unless the provider asks for PS256."),
    "signing_certificate": _(
        "Optional: the key's certificate (PEM, public), when the provider identifies the "
        "credential by its certificate (Microsoft Entra ID). Filled when a key pair is "
        "generated."
    ),
    "assertion_audience": _(
        "Where the signed JWT is addressed (its aud). The access token URL works with most "
        "providers; Okta wants the URL of each endpoint; some servers ask for the issuer."
    ),
    "assertion_subject": _(
        "JWT bearer only: the email of the user the service account acts for (Google "
        "domain-wide delegation). Empty: the service account acts as itself."
    ),
    "pushed_authorization_request_url": _(
        "Optional: the provider's PAR endpoint. When set, the sign-in request is sent there "
        "first, and the browser only carries a reference to it. Learn more: RFC 9126."
    ),
    "require_pushed_authorization_requests": _(
        "The provider refuses sign-in requests that were not pushed first (discovery fills this)."
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


class DatasourceForm(HeldSecrets, KeysAndCertificates, Discovery, forms.ModelForm):
    """The settings of one datasource, in plain words. The secrets (:mod:`.form_secrets`), keys
    and certificates (:mod:`.form_keys`) and discovery (:mod:`.form_discovery`) each have a
    module; the settings' rules are the model's (``Datasource.clean``)."""

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
    tls_client_certificate = forms.CharField(
        label=_("TLS client certificate"),
        required=False,
        strip=True,
        widget=WriteOnlyTextarea,
        help_text=_(
            "For mutual TLS (RFC 8705): paste the PEM certificate (-----BEGIN CERTIFICATE-----, "
            "chain after it). Encrypted at rest; shown again only as subject, expiry and "
            "thumbprint."
        ),
    )
    tls_client_key = forms.CharField(
        label=_("TLS client private key"),
        required=False,
        strip=True,
        widget=WriteOnlyTextarea,
        help_text=_(
            "The certificate's private key, unencrypted PEM. Encrypted at rest, never shown "
            "again. Leave both blank to keep the stored pair."
        ),
    )
    clear_tls_client_certificate = forms.BooleanField(
        label=_("Remove the stored client certificate and key"),
        required=False,
    )
    private_key = forms.CharField(
        label=_("Private key"),
        required=False,
        strip=True,
        widget=WriteOnlyTextarea,
        max_length=MAX_KEY_BYTES,
    )
    private_key_file = forms.FileField(
        label=_("…or upload the private key"),
        required=False,
        help_text=_("A PEM file (.pem, .key)."),
    )
    service_account_key = forms.CharField(
        label=_("Service account key file"),
        required=False,
        strip=True,
        widget=WriteOnlyTextarea,
        max_length=MAX_KEY_BYTES,
        help_text=_(
            "Paste the JSON key file the provider gave you (Google: IAM → Service accounts → "
            "Keys). Its client_email becomes the client ID, its private_key and "
            "private_key_id the key below, its token_uri the access token URL. The file is "
            "not kept and never shown again."
        ),
    )
    service_account_key_file = forms.FileField(
        label=_("…or upload the key file"), required=False, help_text=_("A .json key file.")
    )
    generate_private_key = forms.BooleanField(
        label=_("Generate a new key pair when saving"),
        required=False,
        help_text=_(
            "Creates a private key (kept encrypted here) and shows its public key and "
            "certificate on this page, to register at the provider."
        ),
    )
    clear_private_key = forms.BooleanField(label=_("Clear the stored private key"), required=False)
    #: Refers to a typed private key kept server-side after a validation error.
    key_hold = forms.CharField(required=False, widget=forms.HiddenInput)
    #: The request, set by the admin (the session holds a typed secret across errors).
    request = None

    class Meta:
        model = Datasource
        formfield_callback = _formfield
        # The settings and the write-only secrets the form turns into model fields itself (the
        # TLS pair is declared above: it goes to the instance through _apply_tls_pair).
        fields = (*CONFIG_FIELDS, "client_secret", "private_key")
        help_texts = HELP_TEXTS
        widgets = {
            "custom_auth_params": forms.Textarea(attrs={"rows": 3, "cols": 60}),
            "default_headers": forms.Textarea(attrs={"rows": 3, "cols": 60}),
            "default_query_params": forms.Textarea(attrs={"rows": 3, "cols": 60}),
            "expiry_body_rules": forms.Textarea(attrs={"rows": 3, "cols": 60}),
            "scopes": forms.TextInput(attrs={"size": 60}),
            "signing_certificate": forms.Textarea(attrs={"rows": 3, "cols": 60}),
        }

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if "assertion_audience" in self.fields:
            self.fields["assertion_audience"].required = False  # older forms and scripts omit it
        if self.data.get("discover") and "access_token_url" in self.fields:
            self.fields["access_token_url"].required = False  # discovery fills it
        for name in ("custom_auth_params", "default_headers", "default_query_params"):
            if name in self.fields:
                self.fields[name].error_messages["invalid"] = JSON_HINT
        if "expiry_body_rules" in self.fields:
            self.fields["expiry_body_rules"].error_messages["invalid"] = BODY_RULES_HINT
        for name in ("retry_count", "retry_budget"):
            if name in self.fields:  # left empty (or not sent by an older form): the default
                self.fields[name].required = False
        self._take_held_secret()
        self._describe_stored_certificate()
        self._take_held_key()

    def _clean_fields(self) -> None:
        super()._clean_fields()
        self._placeholders: dict[str, str] = {}
        for name, field in self.fields.items():
            if name in SECRET_FORM_FIELDS or field.disabled:
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
        self._hold_typed_secrets()

    def clean_assertion_audience(self) -> str:
        return self.cleaned_data.get("assertion_audience") or AssertionAudience.TOKEN_ENDPOINT

    def clean_scopes(self) -> str:
        return normalize_scopes(self.cleaned_data.get("scopes", ""))

    def clean_custom_auth_params(self):
        value = self.cleaned_data.get("custom_auth_params")
        if value in (None, ""):
            return {}
        if not isinstance(value, dict):
            raise forms.ValidationError(JSON_HINT)
        return value  # its keys and values are checked by Datasource.clean()

    def clean_expiry_body_rules(self):
        value = self.cleaned_data.get("expiry_body_rules")
        return [] if value in (None, "") else value  # checked by Datasource.clean()

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
        cleaned.pop("key_hold", None)
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
        self._apply_tls_pair(cleaned)
        secret_known = bool(
            secret or (self.instance.pk and self.instance.client_secret)
        ) and not cleaned.get("clear_client_secret")
        method = cleaned.get("client_authentication")
        if (
            cleaned.get("grant_type") == GrantType.CLIENT_CREDENTIALS
            and not secret_known
            and method != ClientAuthentication.PRIVATE_KEY_JWT
            and method not in MTLS_METHODS
        ):
            self.add_error(
                "client_secret",
                _(
                    "The client credentials grant needs a client secret, or a private key "
                    "with “Sign a JWT with a private key”."
                ),
            )
        if method == ClientAuthentication.CLIENT_SECRET_JWT and not secret_known:
            self.add_error(
                "client_secret", _("client_secret_jwt signs with the client secret: enter it.")
            )
        self._clean_key(cleaned)
        return cleaned

    @property
    def credentials_changed(self) -> bool:
        if getattr(self, "tls_pair_changed", False):
            return True
        return bool(
            {
                "client_id",
                "client_secret",
                "access_token_url",
                "scopes",
                "client_authentication",
                "audience",
                "resource",
                "grant_type",
                "private_key",
                "private_key_id",
                "signing_algorithm",
                "signing_certificate",
                "assertion_audience",
                "assertion_subject",
            }
            & set(self.changed_data)
        ) or bool(
            self.cleaned_data.get("clear_client_secret")
            or self.held_secret
            or self.cleaned_data.get("clear_private_key")
            or self.cleaned_data.get("generate_private_key")
            or getattr(self, "_key_text", None)
        )


class ApiKeyForm(forms.ModelForm):
    """Least privilege by default: a key gets the datasources chosen, or all of them only when
    that is ticked; choosing neither (or both) is an error, not a silent "all"."""

    class Meta:
        model = ApiKey
        fields = (
            "name",
            "all_datasources",
            "datasources",
            "user",
            "may_proxy",
            "may_connect",
            "may_manage",
            "may_read_token",
        )

    def clean(self):
        cleaned = super().clean()
        if not any(cleaned.get(field) for field in PERMISSIONS.values()):
            self.add_error(None, _("Give the key at least one permission."))
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


class WebhookEndpointForm(forms.ModelForm):
    """The event types as checkboxes (all ticked for a new endpoint)."""

    url = forms.URLField(
        label=_("URL"),
        max_length=2000,
        assume_scheme="https",
        widget=forms.URLInput(attrs={"class": "vURLField"}),
        help_text=WebhookEndpoint._meta.get_field("url").help_text,
    )

    event_types = forms.MultipleChoiceField(
        label=_("Events"),
        choices=WebhookEvent.choices,
        widget=forms.CheckboxSelectMultiple,
        initial=list(WebhookEvent.values),
        help_text=_("The event types sent to this URL."),
    )

    class Meta:
        model = WebhookEndpoint
        fields = ("name", "url", "datasource", "event_types", "active")
