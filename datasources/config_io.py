"""Config as code: validate-then-write import and secret-free export of datasources."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from django.core.exceptions import ValidationError
from django.db import transaction

from . import tokens
from .models import CONFIG_FIELDS, Datasource, GrantType

#: Fields import accepts and export writes (the client secret is import-only).
EXPORTED_FIELDS = CONFIG_FIELDS
IMPORTED_FIELDS = frozenset(EXPORTED_FIELDS) | {"client_secret"}
_CREDENTIAL_FIELDS = ("client_id", "client_secret", "access_token_url", "scopes")


class ImportFailed(Exception):
    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("\n".join(errors))


@dataclass
class ImportResult:
    created: list[str]
    updated: list[str]


def export_datasources() -> list[dict[str, Any]]:
    return [
        {name: getattr(ds, name) for name in EXPORTED_FIELDS}
        for ds in Datasource.objects.order_by("slug")
    ]


def import_datasources(entries: Any, environ: dict[str, str] | None = None) -> ImportResult:
    """Upsert by slug. Everything is validated first; nothing is written if anything is wrong."""
    environ = os.environ if environ is None else environ
    if not isinstance(entries, list):
        raise ImportFailed(["The file must contain a JSON list of datasource objects."])
    errors: list[str] = []
    planned: list[tuple[Datasource, bool, bool]] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries, start=1):
        label = f"entry {index}"
        if not isinstance(entry, dict):
            errors.append(f"{label}: must be a JSON object.")
            continue
        slug = entry.get("slug")
        if isinstance(slug, str) and slug:
            label += f" (slug {slug!r})"
            if slug in seen:
                errors.append(f"{label}: slug: appears more than once in the file.")
                continue
            seen.add(slug)
        unknown = sorted(set(entry) - IMPORTED_FIELDS)
        if unknown:
            errors.append(f"{label}: unknown field(s): {', '.join(unknown)}.")
            continue
        try:
            planned.append(_plan(entry, environ))
        except ValidationError as err:
            for field, messages in _error_items(err):
                errors.extend(f"{label}: {field}: {message}" for message in messages)
    if errors:
        raise ImportFailed(errors)
    result = ImportResult(created=[], updated=[])
    with transaction.atomic():
        for datasource, created, credentials_changed in planned:
            datasource.save()
            (result.created if created else result.updated).append(datasource.slug)
            if credentials_changed:
                tokens.reset_after_reconfiguration(datasource)
    return result


def _plan(entry: dict[str, Any], environ) -> tuple[Datasource, bool, bool]:
    existing = (
        Datasource.objects.filter(slug=entry.get("slug")).first() if entry.get("slug") else None
    )
    datasource = existing or Datasource()
    before = {name: getattr(datasource, name) for name in _CREDENTIAL_FIELDS}
    field_errors: dict[str, list[str]] = {}
    for name, value in entry.items():
        if name == "client_secret":
            try:
                value = _resolve_secret(value, environ)
            except ValueError as err:
                field_errors.setdefault(name, []).append(str(err))
                continue
        elif name == "scopes" and isinstance(value, list):
            value = " ".join(str(v) for v in value)
        setattr(datasource, name, value)
    if (
        datasource.grant_type == GrantType.CLIENT_CREDENTIALS
        and not datasource.client_secret
        and "client_secret" not in field_errors
    ):
        field_errors.setdefault("client_secret", []).append(
            "the client credentials grant needs a client secret"
        )
    try:
        datasource.full_clean(validate_unique=True)
    except ValidationError as err:
        for field, messages in _error_items(err):
            field_errors.setdefault(field, []).extend(messages)
    if field_errors:
        raise ValidationError(field_errors)
    changed = existing is not None and any(
        getattr(datasource, name) != value for name, value in before.items()
    )
    return datasource, existing is None, changed


def _resolve_secret(value: Any, environ) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and set(value) == {"env"} and isinstance(value["env"], str):
        name = value["env"]
        if name not in environ or not environ[name]:
            raise ValueError(f"environment variable {name} is not set")
        return environ[name]
    raise ValueError('must be a string or {"env": "VARIABLE_NAME"}')


def _error_items(err: ValidationError):
    if hasattr(err, "error_dict"):
        for field, errors in err.error_dict.items():
            yield field, [message for e in errors for message in e.messages]
    else:
        yield "__all__", err.messages
