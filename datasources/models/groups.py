"""Where each datasource setting belongs: the one declaration of the settings' groups.

The model declares a setting's column (type, default, help); this module says which group it
is shown in and when it applies. Everything else derives from the two:

- the admin's fieldsets and the form's show/hide rules (``datasources.admin.fieldsets``);
- :data:`CONFIG_FIELDS`, what import accepts and export writes (``datasources.ops.config_io``),
  and :data:`WRITE_ONLY_FIELDS`, the secrets that are only ever written;
- what a provider preset may set, and the JSON type of each value (``datasources.admin.presets``).

So a new setting (a provider quirk) is a field on the model, its migration, its name in a group
below, the rule that uses it and its tests. ``tests/test_groups.py`` fails if a field is in no
group.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache

from django.db import models
from django.utils.functional import Promise
from django.utils.translation import gettext_lazy as _
from fernet_fields import EncryptedField

from . import bodyrules
from .choices import ASSERTION_AUTH_METHODS, MTLS_METHODS, ClientAuthentication, GrantType

#: When a setting applies: any one of these conditions, each a control (a select of the form)
#: and the values for which it holds. Outside them the form hides the setting and the server
#: ignores it.
Condition = tuple[Mapping[str, tuple[str, ...]], ...]

CODE_GRANT: Condition = ({"grant_type": (GrantType.AUTHORIZATION_CODE,)},)
JWT_BEARER: Condition = ({"grant_type": (GrantType.JWT_BEARER,)},)
#: The signing key: the JWT bearer grant and private_key_jwt client authentication.
SIGNING_KEY: Condition = (
    {"grant_type": (GrantType.JWT_BEARER,)},
    {"client_authentication": (ClientAuthentication.PRIVATE_KEY_JWT,)},
)
SIGNED_ASSERTION: Condition = (
    {
        "client_authentication": tuple(
            m for m in ClientAuthentication if m in ASSERTION_AUTH_METHODS
        )
    },
)
#: Every client authentication but mutual TLS (which authenticates with the certificate).
NOT_MUTUAL_TLS: Condition = (
    {"client_authentication": tuple(m for m in ClientAuthentication if m not in MTLS_METHODS)},
)
MUTUAL_TLS: Condition = (
    {"client_authentication": tuple(m for m in ClientAuthentication if m in MTLS_METHODS)},
)


@dataclass(frozen=True)
class Group:
    """A group of settings, in the order the admin shows them (and export writes them)."""

    key: str
    title: str | Promise
    fields: tuple[str, ...]
    #: Folded away in the admin until opened.
    folded: bool = False
    #: Settings that apply only under a condition (see :data:`Condition`).
    when: Mapping[str, Condition] = field(default_factory=dict)
    #: Filled from the server's metadata and shown read-only: never typed, imported or exported.
    discovered: tuple[str, ...] = ()
    #: The folded group opens by itself when this holds (it becomes what the form is about).
    opened_when: Condition = ()


#: The datasource's settings by group, in reference-docs order: connection, client, scopes,
#: placement; the rest folded away.
DATASOURCE_GROUPS: tuple[Group, ...] = (
    Group(
        "connection",
        _("Connection"),
        (
            "name",
            "slug",
            "base_url",
            "grant_type",
            "token_sharing",
            "authorization_url",
            "access_token_url",
            "issuer",
        ),
        when={"token_sharing": CODE_GRANT, "authorization_url": CODE_GRANT},
    ),
    Group(
        "client",
        _("Client"),
        ("client_id", "client_secret", "client_authentication", "assertion_audience"),
        when={"client_secret": NOT_MUTUAL_TLS, "assertion_audience": SIGNED_ASSERTION},
    ),
    Group(
        "signing_key",
        _("Signing key (private_key_jwt, JWT bearer)"),
        (
            "private_key",
            "private_key_id",
            "signing_algorithm",
            "signing_certificate",
            "assertion_subject",
        ),
        when={
            "private_key": SIGNING_KEY,
            "private_key_id": SIGNING_KEY,
            "signing_algorithm": SIGNING_KEY,
            "signing_certificate": SIGNING_KEY,
            "assertion_subject": JWT_BEARER,
        },
    ),
    Group(
        "mutual_tls",
        _("Mutual TLS"),
        ("tls_client_certificate", "tls_client_key", "certificate_bound_tokens", "tls_ca_bundle"),
        folded=True,
        opened_when=MUTUAL_TLS,
    ),
    Group(
        "scopes",
        _("Scopes and consent"),
        ("scopes", "scope_separator", "custom_auth_params"),
        when={"custom_auth_params": CODE_GRANT},
    ),
    Group(
        "placement",
        _("Token placement"),
        ("token_placement", "header_prefix", "query_param_name"),
        when={
            "header_prefix": ({"token_placement": ("header",)},),
            "query_param_name": ({"token_placement": ("query",)},),
        },
    ),
    Group("sender_constraints", _("Sender-constrained tokens"), ("use_dpop",), folded=True),
    Group(
        "calls",
        _("Calls to the API"),
        ("allowed_methods", "default_headers", "default_query_params"),
        folded=True,
    ),
    Group(
        "retries",
        _("Retries"),
        ("retry_count", "retry_statuses", "retry_on_connection_errors", "retry_budget"),
        folded=True,
    ),
    Group(
        "connect",
        _("End-user connections"),
        ("allowed_return_urls", "userinfo_url", "userinfo_identity_field"),
        folded=True,
        when={
            "allowed_return_urls": CODE_GRANT,
            "userinfo_url": CODE_GRANT,
            "userinfo_identity_field": CODE_GRANT,
        },
    ),
    Group(
        "advanced",
        _("Advanced"),
        (
            "use_pkce",
            "audience",
            "resource",
            "revocation_url",
            "pushed_authorization_request_url",
            "require_pushed_authorization_requests",
            "token_endpoint_auth_methods_supported",
            "issuer_returns_iss",
            "token_lifetime",
            "expiry_status_codes",
            "expiry_body_rules",
            "owner",
        ),
        folded=True,
        when={
            "use_pkce": CODE_GRANT,
            "pushed_authorization_request_url": CODE_GRANT,
            "require_pushed_authorization_requests": CODE_GRANT,
            "issuer_returns_iss": CODE_GRANT,
        },
        discovered=("token_endpoint_auth_methods_supported",),
    ),
)


def _model_field(name: str) -> models.Field:
    from .datasource import Datasource

    return Datasource._meta.get_field(name)


def grouped_fields() -> tuple[str, ...]:
    """Every grouped setting, in group order."""
    return tuple(name for group in DATASOURCE_GROUPS for name in group.fields)


def is_write_only(name: str) -> bool:
    """A secret: encrypted at rest, typed or imported, never shown or exported."""
    return isinstance(_model_field(name), EncryptedField)


def is_config(name: str) -> bool:
    """A setting a builder types and import/export carries: not a secret, not a discovered
    value, not a link to another row (the owner is a user of this installation)."""
    discovered = {n for group in DATASOURCE_GROUPS for n in group.discovered}
    model_field = _model_field(name)
    return not (is_write_only(name) or model_field.is_relation or name in discovered)


@cache
def config_fields() -> tuple[str, ...]:
    return tuple(name for name in grouped_fields() if is_config(name))


@cache
def write_only_fields() -> tuple[str, ...]:
    return tuple(name for name in grouped_fields() if is_write_only(name))


def json_types(name: str) -> tuple[type, ...]:
    """The JSON types a setting's value may have in an import file or a preset."""
    model_field = _model_field(name)
    nullable = (type(None),) if model_field.null else ()
    if isinstance(model_field, models.BooleanField):
        return (bool,)
    if isinstance(model_field, models.IntegerField):
        return (int, *nullable)
    if isinstance(model_field, models.JSONField):
        return (list if model_field.default is list else dict, *nullable)
    return (str, *nullable)


#: Settings whose JSON value has a shape beyond its type, with the pure check of that shape
#: (``clean()`` runs it too; a preset is checked with it before any form sees it).
SHAPE_CHECKS = {"expiry_body_rules": bodyrules.problem}


def shape_problem(name: str, value: object) -> str | None:
    """What is wrong with the shape of a setting's JSON value, or None."""
    check = SHAPE_CHECKS.get(name)
    return check(value) if check is not None else None


def conditions() -> dict[str, Condition]:
    """When each conditional setting applies (the form's show/hide rules)."""
    return {name: cond for group in DATASOURCE_GROUPS for name, cond in group.when.items()}
