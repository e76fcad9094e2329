"""The datasource page's fieldsets and show/hide rules, derived from the settings' groups
(:mod:`datasources.models.groups`).

What the admin adds is only its own rows: form fields and read-only displays that are not
settings (the discovery box, the key file upload, the public key, …), each placed beside the
setting it serves and, unless said otherwise, shown when that setting is.
"""

from __future__ import annotations

from typing import Any

from django.utils.translation import gettext_lazy as _

from ..models.groups import DATASOURCE_GROUPS, JWT_BEARER, SIGNING_KEY, Condition, conditions

#: Read-only status shown on the change page (after the first save).
STATUS_FIELDS = (
    "status",
    "expires",
    "last_refreshed",
    "granted_scope",
    "last_error",
    "recent_events",
    "proxy_usage",
    "user_tokens",
    "end_user_connections",
)

#: The admin's own rows around a setting: (rows before it, rows after it).
EXTRA_ROWS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "issuer": ((), ("discover",)),
    "client_secret": ((), ("secret_hold", "clear_client_secret")),
    "private_key": (
        ("service_account_key", "service_account_key_file"),
        ("private_key_file", "key_hold", "generate_private_key", "clear_private_key"),
    ),
    "assertion_subject": ((), ("public_key", "key_pair")),
    "tls_client_key": ((), ("clear_tls_client_certificate",)),
    "use_dpop": ((), ("dpop_key",)),
}
#: Extra rows that do not follow their setting's rule: their own, or () for "always shown".
EXTRA_WHEN: dict[str, Condition] = {
    "service_account_key": JWT_BEARER,
    "service_account_key_file": JWT_BEARER,
    "public_key": SIGNING_KEY,
    "key_pair": SIGNING_KEY,
    "secret_hold": (),
    "key_hold": (),
}
#: Read-only displays among the extra rows (methods of the ModelAdmin).
EXTRA_READONLY = ("public_key", "key_pair", "dpop_key")
#: CSS classes the page's stylesheet and tests use, by group.
GROUP_CLASSES = {"signing_key": ("datasource-keys",)}


def _rows(fields: tuple[str, ...]) -> tuple[str, ...]:
    rows: list[str] = []
    for name in fields:
        before, after = EXTRA_ROWS.get(name, ((), ()))
        rows.extend((*before, name, *after))
    return tuple(rows)


def datasource_fieldsets() -> tuple[tuple[Any, dict[str, Any]], ...]:
    """The admin's fieldsets: one per group, with the admin's rows, then the token status."""
    fieldsets = []
    for group in DATASOURCE_GROUPS:
        classes = (*GROUP_CLASSES.get(group.key, ()), *(("collapse",) if group.folded else ()))
        options: dict[str, Any] = {"fields": _rows(group.fields)}
        if classes:
            options = {"classes": classes, **options}
        fieldsets.append((group.title, options))
    fieldsets.append((_("Token status"), {"fields": STATUS_FIELDS}))
    return tuple(fieldsets)


def readonly_fields() -> tuple[str, ...]:
    discovered = tuple(name for group in DATASOURCE_GROUPS for name in group.discovered)
    return (*STATUS_FIELDS, *EXTRA_READONLY, *discovered)


def field_rules() -> dict[str, Any]:
    """For the page's script (``datasource_form.js``): when each row is shown, and when a folded
    group opens by itself; as JSON-ready lists."""
    shown = dict(conditions())
    for name, (before, after) in EXTRA_ROWS.items():
        for extra in (*before, *after):
            rule = EXTRA_WHEN.get(extra, shown.get(name, ()))
            if rule:
                shown[extra] = rule
    opened = {
        group.fields[0]: group.opened_when for group in DATASOURCE_GROUPS if group.opened_when
    }

    def plain(rule: Condition) -> list[dict[str, list[str]]]:
        return [{control: [str(v) for v in values] for control, values in c.items()} for c in rule]

    return {
        "shown": {name: plain(rule) for name, rule in shown.items()},
        "opened": {name: plain(rule) for name, rule in opened.items()},
    }
