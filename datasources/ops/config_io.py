"""Config as code: validate-then-write import and secret-free export of datasources.

An import file is untrusted input: it is read up to IMPORT_MAX_BYTES, must be UTF-8 JSON no more
than a few levels deep, with the JSON type each field needs (a number is not silently turned
into a name), no duplicate keys, NaN or NUL characters; ``{"env": NAME}`` reads only variables
named with IMPORT_ENV_PREFIX. Any problem is reported, one line each, and nothing is written.

Private keys (``private_key``, a PEM; ``service_account_key``, a provider's JSON key file) are
import-only like the client secret: a string, ``{"env": NAME}``, or ``{"file": PATH}``. A file
is read only from the import file's own directory tree (a relative path is relative to it; a
path resolving elsewhere, through ``..`` or a symlink, is refused), must be a regular file of
at most MAX_KEY_FILE_BYTES, and is never accepted from standard input, whose directory means
nothing.
"""

from __future__ import annotations

import codecs
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from django.core.exceptions import ValidationError
from django.db import transaction
from fernet_fields import EncryptedField

from .. import tokens
from ..conf import app_settings
from ..models import CONFIG_FIELDS, MTLS_METHODS, ClientAuthentication, Datasource, GrantType
from ..models.groups import json_types
from ..security import dpop, jose

#: Fields import accepts and export writes (secrets are import-only), in the admin's order: both
#: derive from the settings' groups (datasources.models.groups).
EXPORTED_FIELDS = CONFIG_FIELDS
#: Write-only secrets: a string or {"env": NAME} (keys also {"file": PATH}); never exported. The
#: model's encrypted columns, and a provider's key file, which fills the private key.
SECRET_FIELDS = frozenset(
    {
        *(f.name for f in Datasource._meta.concrete_fields if isinstance(f, EncryptedField)),
        "service_account_key",
    }
)
IMPORTED_FIELDS = frozenset(EXPORTED_FIELDS) | SECRET_FIELDS
_CREDENTIAL_FIELDS = (
    "client_id",
    "client_secret",
    "access_token_url",
    "scopes",
    "client_authentication",
    "grant_type",
    "private_key",
    "private_key_id",
    "signing_algorithm",
    "signing_certificate",
    "assertion_audience",
    "assertion_subject",
)
MAX_KEY_FILE_BYTES = 64 * 1024
#: A list of objects whose deepest values are the body conditions (a list of objects holding a
#: list of values): 5 levels, and no more.
MAX_DEPTH = 5
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: Never readable through {"env": ...}, whatever the prefix: the project's own settings.
PROTECTED_ENV = frozenset(
    {
        "SECRET_KEY",
        "FERNET_KEYS",
        "DATABASE_URL",
        "REDIS_URL",
        "CELERY_BROKER_URL",
        "EMAIL_URL",
        "DATASOURCES_METRICS_TOKEN",
    }
)


class ImportFailed(Exception):
    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("\n".join(errors))


@dataclass
class ImportResult:
    created: list[str]
    updated: list[str]


def read_file(handle: IO[bytes], name: str) -> Any:
    """The parsed JSON of an import file, or ImportFailed with one line saying what is wrong."""
    limit = app_settings.IMPORT_MAX_BYTES
    data = handle.read(limit + 1)
    if len(data) > limit:
        raise ImportFailed([f"{name} is larger than {limit} bytes (IMPORT_MAX_BYTES)."])
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) or (
        len(data) >= 2 and (data[0] == 0 or data[1] == 0)
    ):
        raise ImportFailed([f"{name} is not UTF-8 (it looks like UTF-16); save it as UTF-8."])
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ImportFailed(
            [f"{name} is not UTF-8 (invalid byte at position {err.start}); save it as UTF-8."]
        ) from None
    depth = _nesting_depth(text)
    if depth > MAX_DEPTH:
        raise ImportFailed([f"{name} is nested deeper than {MAX_DEPTH} levels."])
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant)
    except json.JSONDecodeError as err:
        raise ImportFailed([f"{name} is not valid JSON: {err.msg} (line {err.lineno})."]) from None
    except ValueError as err:  # duplicate keys, NaN, absurdly long numbers
        raise ImportFailed([f"{name} is not acceptable JSON: {err}."]) from None


def _nesting_depth(text: str) -> int:
    """How deeply ``[``/``{`` nest outside strings (checked before parsing, which recurses)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_DEPTH:
                return deepest
        elif char in "]}":
            depth -= 1
    return deepest


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"the key {key[:50]!r} appears twice in one object")
        result[key] = value
    return result


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def export_datasources() -> list[dict[str, Any]]:
    return [
        {name: getattr(ds, name) for name in EXPORTED_FIELDS}
        for ds in Datasource.objects.order_by("slug")
    ]


def import_datasources(
    entries: Any, environ: dict[str, str] | None = None, base_dir: Path | None = None
) -> ImportResult:
    """Upsert by slug. Everything is validated first; nothing is written if anything is wrong.
    ``base_dir``: the import file's directory, the only tree ``{"file": ...}`` may read from."""
    environ = os.environ if environ is None else environ
    if not isinstance(entries, list):
        raise ImportFailed(["The file must contain a JSON list of datasource objects."])
    errors: list[str] = []
    planned: list[tuple[Datasource, bool, bool, bool]] = []
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
            errors.append(f"{label}: unknown field(s): {', '.join(unknown)[:500]}.")
            continue
        problems = list(_type_problems(entry))
        if problems:
            errors.extend(f"{label}: {field}: {problem}" for field, problem in problems)
            continue
        try:
            planned.append(_plan(entry, environ, base_dir))
        except ValidationError as err:
            for field, messages in _error_items(err):
                errors.extend(f"{label}: {field}: {message}" for message in messages)
    if errors:
        raise ImportFailed(errors)
    result = ImportResult(created=[], updated=[])
    with transaction.atomic():
        for datasource, created, credentials_changed, key_changed in planned:
            datasource.save()
            (result.created if created else result.updated).append(datasource.slug)
            if credentials_changed:
                tokens.reset_after_reconfiguration(datasource)
            if key_changed:
                tokens.replace_now(datasource)
    return result


def _assign(
    datasource: Datasource,
    entry: dict[str, Any],
    environ,
    base_dir: Path | None,
    field_errors: dict[str, list[str]],
) -> str | None:
    """Set an entry's values on the datasource, resolving secrets (``{"env"}``, ``{"file"}``);
    problems go to ``field_errors``. Returns the provider key file's text, applied after."""
    account_key = None
    for name, value in entry.items():
        if name in SECRET_FIELDS:
            try:
                value = _resolve_secret(
                    value, environ, base_dir, allow_file=name != "client_secret"
                )
            except ValueError as err:
                field_errors.setdefault(name, []).append(str(err))
                continue
            if name == "service_account_key":
                account_key = value
                continue
            if name == "dpop_private_key":
                if value:
                    try:
                        datasource.set_dpop_key(value)
                    except dpop.DPoPKeyError as err:
                        field_errors.setdefault(name, []).append(str(err))
                continue
        elif name == "scopes" and isinstance(value, list):
            value = " ".join(str(v) for v in value)
        setattr(datasource, name, value)
    return account_key


def _plan(
    entry: dict[str, Any], environ, base_dir: Path | None
) -> tuple[Datasource, bool, bool, bool]:
    """(datasource to save, new?, credentials changed?, a key tokens are bound to changed?)"""
    existing = (
        Datasource.objects.filter(slug=entry.get("slug")).first() if entry.get("slug") else None
    )
    datasource = existing or Datasource()
    before = {name: getattr(datasource, name) for name in _CREDENTIAL_FIELDS}
    before_dpop = (datasource.use_dpop, datasource.dpop_jkt, datasource.tls_client_certificate)
    field_errors: dict[str, list[str]] = {}
    account_key = _assign(datasource, entry, environ, base_dir, field_errors)
    if account_key:
        try:
            account = jose.read_service_account_key(account_key)
        except jose.KeyProblem as err:
            field_errors.setdefault("service_account_key", []).append(str(err))
        else:
            # The key file is authoritative for what it names.
            datasource.client_id = account.client_email
            datasource.private_key = account.private_key
            datasource.private_key_id = account.private_key_id or datasource.private_key_id
            datasource.access_token_url = account.token_uri or datasource.access_token_url
    for field, problem in _key_problems(datasource):
        if field not in field_errors:
            field_errors.setdefault(field, []).append(problem)
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
    key_changed = existing is not None and before_dpop != (
        datasource.use_dpop,
        datasource.dpop_jkt,
        datasource.tls_client_certificate,
    )
    return datasource, existing is None, changed, key_changed


_JSON_TYPE_NAMES = {
    str: "a string",
    bool: "true or false",
    int: "a whole number",
    dict: "an object",
    list: "a list",
    type(None): "null",
    float: "a number",
}


def _key_problems(datasource: Datasource):
    """(field, problem) for the credentials a grant and client authentication need."""
    method = datasource.client_authentication
    if (
        datasource.grant_type == GrantType.CLIENT_CREDENTIALS
        and not datasource.client_secret
        and method != ClientAuthentication.PRIVATE_KEY_JWT
        and method not in MTLS_METHODS
    ):
        yield "client_secret", "the client credentials grant needs a client secret"
    if method == ClientAuthentication.CLIENT_SECRET_JWT and not datasource.client_secret:
        yield "client_secret", "client_secret_jwt needs a client secret"
    needs_key = (
        datasource.grant_type == GrantType.JWT_BEARER
        or method == ClientAuthentication.PRIVATE_KEY_JWT
    )
    if needs_key and not datasource.private_key:
        yield (
            "private_key",
            f"{datasource.grant_type if datasource.grant_type == GrantType.JWT_BEARER else method} needs a private key",
        )
        return
    if not datasource.private_key:
        return
    try:
        key = jose.load_private_key(datasource.private_key)
    except jose.KeyProblem as err:
        yield "private_key", str(err)
        return
    try:
        jose.algorithm_for(key, datasource.signing_algorithm)
    except jose.KeyProblem as err:
        yield "signing_algorithm", str(err)
    if datasource.signing_certificate:
        try:
            jose.certificate_headers(datasource.signing_certificate, key)
        except jose.KeyProblem as err:
            yield "signing_certificate", str(err)


def _expected_types(name: str) -> tuple[type, ...]:
    if name in SECRET_FIELDS:
        return (str, dict, type(None))
    if name == "scopes":
        return (str, list)
    return json_types(name)


def _type_problems(entry: dict[str, Any]):
    """(field, problem) for values of the wrong JSON type or with characters no database
    stores (NUL, lone surrogates); ``"name": 5`` is an error, not the name "5"."""
    for name, value in entry.items():
        expected = _expected_types(name)
        actual = type(value)
        if not isinstance(value, expected) or (actual is bool and bool not in expected):
            wanted = " or ".join(_JSON_TYPE_NAMES[t] for t in expected)
            yield name, f"must be {wanted}, not {_JSON_TYPE_NAMES.get(actual, actual.__name__)}."
            continue
        if (
            name == "scopes"
            and isinstance(value, list)
            and not all(isinstance(v, str) for v in value)
        ):
            yield name, "must be a string or a list of strings."
            continue
        problem = _text_problem(value)
        if problem:
            yield name, problem


def _text_problem(value: Any) -> str | None:
    if isinstance(value, dict):
        for key, item in value.items():
            problem = _text_problem(key) or _text_problem(item)
            if problem:
                return problem
    elif isinstance(value, list):
        for item in value:
            problem = _text_problem(item)
            if problem:
                return problem
    elif isinstance(value, str):
        if "\x00" in value:
            return "contains a NUL character."
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "contains an invalid Unicode character (a lone surrogate)."
    elif isinstance(value, float) and not math.isfinite(value):
        return "is not a finite number."
    return None


def env_name_problem(name: str) -> str | None:
    """Why ``{"env": name}`` may not be read, or None."""
    prefix = app_settings.IMPORT_ENV_PREFIX
    if not _ENV_NAME.match(name):
        return f"{name[:100]!r} is not an environment variable name"
    if not prefix or not name.startswith(prefix) or name == prefix:
        return (
            f"environment variable {name} may not be read: only variables named "
            f"{prefix or '(prefix not set)'}… can hold imported secrets (IMPORT_ENV_PREFIX)"
        )
    if name in PROTECTED_ENV or name.startswith("DATASOURCES_"):
        return f"environment variable {name} is one of the project's own settings"
    return None


def _resolve_secret(
    value: Any, environ, base_dir: Path | None = None, *, allow_file: bool = False
) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    if allow_file and isinstance(value, dict) and set(value) == {"file"}:
        return _read_key_file(value["file"], base_dir)
    if isinstance(value, dict) and set(value) == {"env"} and isinstance(value["env"], str):
        name = value["env"]
        problem = env_name_problem(name)
        if problem:
            raise ValueError(problem)
        if name not in environ or not environ[name]:
            raise ValueError(f"environment variable {name} is not set")
        return environ[name]
    raise ValueError(
        'must be a string, {"env": "VARIABLE_NAME"}'
        + (' or {"file": "path"}' if allow_file else "")
    )


def _read_key_file(path: Any, base_dir: Path | None) -> str:
    """A key file from the import file's directory tree (see the module docstring)."""
    if not isinstance(path, str) or not path or "\x00" in path:
        raise ValueError('{"file": ...} must name a file')
    if base_dir is None:
        raise ValueError(
            '{"file": ...} cannot be used when the import file is read from standard input'
        )
    root = base_dir.resolve()
    target = (root / path).resolve()
    if not target.is_relative_to(root):
        raise ValueError(
            f"{path[:200]!r} is outside the import file's directory; key files must be in it "
            "or below it"
        )
    if not target.is_file():
        raise ValueError(f"{path[:200]!r} is not a file")
    if target.stat().st_size > MAX_KEY_FILE_BYTES:
        raise ValueError(f"{path[:200]!r} is larger than {MAX_KEY_FILE_BYTES} bytes")
    try:
        return target.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{path[:200]!r} cannot be read as UTF-8 text ({type(err).__name__})"
        ) from None


def _error_items(err: ValidationError):
    if hasattr(err, "error_dict"):
        for field, errors in err.error_dict.items():
            yield field, [message for e in errors for message in e.messages]
    else:
        yield "__all__", err.messages
