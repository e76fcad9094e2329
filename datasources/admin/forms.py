"""Admin form: the documented fields, a write-only client secret, readable errors."""

from __future__ import annotations

import re

from django import forms
from django.db import models
from django.utils.translation import gettext_lazy as _

from ..authserver import oauth
from ..exceptions import DatasourceError
from ..models import (
    CONFIG_FIELDS,
    MTLS_METHODS,
    ApiKey,
    AssertionAudience,
    ClientAuthentication,
    Datasource,
    GrantType,
    WebhookEndpoint,
    WebhookEvent,
    normalize_scopes,
)
from ..security import dpop, jose, tls
from . import secretkeep
from .explain import JSON_HINT


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


#: The largest key or key file accepted (a 4096-bit RSA PEM is about 3.3 kB).
MAX_KEY_BYTES = 16 * 1024

#: Our client authentication choices as the server's metadata names them.
METADATA_AUTH_METHODS = {
    "basic": "client_secret_basic",
    "body": "client_secret_post",
    "private_key_jwt": "private_key_jwt",
    "client_secret_jwt": "client_secret_jwt",
    "tls_client_auth": "tls_client_auth",
    "self_signed_tls_client_auth": "self_signed_tls_client_auth",
}


def _pem_text(value: str | None) -> str:
    return (value or "").replace("\r\n", "\n").replace("\r", "\n").strip()


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


def _read_upload(form: forms.Form, name: str, upload) -> str:
    if upload.size > MAX_KEY_BYTES:
        form.add_error(name, _("The file is larger than a key file can be."))
        return ""
    try:
        return upload.read().decode("utf-8")
    except UnicodeDecodeError:
        form.add_error(name, _("The file is not text (PEM or JSON): a DER or PKCS#12 file?"))
        return ""


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

    @property
    def _session(self):
        return getattr(self.request, "session", None)

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

    def _apply_tls_pair(self, cleaned: dict) -> None:
        """The write-only certificate and key go to the instance (checked by its clean()):
        typed values replace the stored pair, blanks keep it, the box removes it."""
        # Browsers send textareas with CRLF line ends; PEM is stored with LF.
        certificate = _pem_text(cleaned.pop("tls_client_certificate", ""))
        key = _pem_text(cleaned.pop("tls_client_key", ""))
        self.tls_pair_changed = False
        if cleaned.pop("clear_tls_client_certificate", False):
            self.instance.tls_client_certificate = None
            self.instance.tls_client_key = None
            self.tls_pair_changed = True
        elif certificate or key:
            self.instance.tls_client_certificate = certificate or None
            self.instance.tls_client_key = key or None
            self.tls_pair_changed = True

    def _clean_key(self, cleaned: dict) -> None:
        """The private key: pasted, uploaded, from a key file, generated, kept, or cleared;
        checked against the algorithm and certificate. Fills the fields a key file names."""
        key_text = cleaned.get("private_key") or ""
        upload = cleaned.get("private_key_file")
        if upload and not key_text:
            key_text = _read_upload(self, "private_key_file", upload)
        account_text = cleaned.get("service_account_key") or ""
        account_upload = cleaned.get("service_account_key_file")
        if account_upload and not account_text:
            account_text = _read_upload(self, "service_account_key_file", account_upload)
        if account_text:
            try:
                account = jose.read_service_account_key(account_text)
            except jose.KeyProblem as err:
                self.add_error("service_account_key", str(err))
                return
            key_text = account.private_key
            cleaned["client_id"] = account.client_email
            self._errors.pop("client_id", None)
            if account.private_key_id:
                cleaned["private_key_id"] = account.private_key_id
            if account.token_uri:
                cleaned["access_token_url"] = account.token_uri
                self._errors.pop("access_token_url", None)
            self.imported_key_file = True
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
        needs_key = (
            cleaned.get("grant_type") == GrantType.JWT_BEARER
            or cleaned.get("client_authentication") == ClientAuthentication.PRIVATE_KEY_JWT
        )
        if generate:
            return  # made on save (admin), for the chosen algorithm
        if needs_key and not stored:
            self.add_error(
                "private_key",
                _(
                    "%(what)s needs a private key: paste or upload one, import a key file, or "
                    "tick “Generate a new key pair when saving”."
                )
                % {
                    "what": _("The JWT bearer grant")
                    if cleaned.get("grant_type") == GrantType.JWT_BEARER
                    else "private_key_jwt"
                },
            )
            return
        if not stored:
            return
        try:
            key = jose.load_private_key(stored)
        except jose.KeyProblem as err:
            self.add_error("service_account_key" if account_text else "private_key", str(err))
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

    def _discover(self, cleaned: dict) -> None:
        issuer = cleaned.get("issuer")
        if not issuer:
            self.add_error("issuer", _("Enter the issuer URL to discover its endpoints."))
            return
        try:
            metadata = oauth.discover(issuer, ca_bundle=cleaned.get("tls_ca_bundle") or "")
        except (DatasourceError, tls.TLSConfigError) as err:
            self.add_error("issuer", str(err))
            return
        cleaned["access_token_url"] = metadata.token_endpoint
        if metadata.authorization_endpoint:
            cleaned["authorization_url"] = metadata.authorization_endpoint
        if metadata.revocation_endpoint:
            cleaned["revocation_url"] = metadata.revocation_endpoint
        cleaned["use_pkce"] = metadata.pkce_s256
        cleaned["issuer_returns_iss"] = metadata.returns_iss
        cleaned["pushed_authorization_request_url"] = metadata.pushed_authorization_request_endpoint
        self._use_mtls_aliases(cleaned, metadata)
        algs = metadata.dpop_signing_alg_values_supported
        if cleaned.get("use_dpop") and algs and dpop.DEFAULT_ALG not in algs:
            self.add_error(
                "use_dpop",
                _(
                    "The server's DPoP algorithms (%(algs)s) do not include %(ours)s, which "
                    "the generated DPoP key uses."
                )
                % {"algs": ", ".join(algs), "ours": dpop.DEFAULT_ALG},
            )
        cleaned["require_pushed_authorization_requests"] = (
            metadata.require_pushed_authorization_requests
        )
        self.instance.token_endpoint_auth_methods_supported = " ".join(
            metadata.token_endpoint_auth_methods_supported
        )[:500]
        supported = metadata.token_endpoint_auth_methods_supported
        chosen = METADATA_AUTH_METHODS.get(cleaned.get("client_authentication") or "")
        if supported and chosen and chosen not in supported:
            self.add_error(
                "client_authentication",
                _(
                    "The server's metadata does not list %(chosen)s among its client "
                    "authentication methods (%(supported)s): choose one of those."
                )
                % {"chosen": chosen, "supported": ", ".join(supported)},
            )
        self.discovered = metadata

    def _use_mtls_aliases(self, cleaned: dict, metadata: oauth.ServerMetadata) -> None:
        """Calls made with the TLS client certificate go to the server's mTLS aliases of its
        endpoints, when it publishes them (RFC 8705 §5)."""
        mtls = cleaned.get("client_authentication") in MTLS_METHODS or cleaned.get(
            "certificate_bound_tokens"
        )
        aliases = metadata.mtls_endpoint_aliases
        if not mtls or not aliases:
            return
        for key, field in (
            ("token_endpoint", "access_token_url"),
            ("revocation_endpoint", "revocation_url"),
            ("pushed_authorization_request_endpoint", "pushed_authorization_request_url"),
        ):
            if aliases.get(key):
                cleaned[field] = aliases[key]

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
