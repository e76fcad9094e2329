"""System checks: configuration problems surface here, not as import-time crashes."""

from __future__ import annotations

from django.conf import settings
from django.core.checks import Error, Warning, register

from .conf import app_settings


@register()
def check_encryption_keys(app_configs=None, **kwargs):
    keys = getattr(settings, "FERNET_KEYS", None)
    if not keys:
        return [
            Error(
                "FERNET_KEYS is empty: secrets would be encrypted with a key derived from SECRET_KEY.",
                hint="Set FERNET_KEYS to one or more comma-separated keys; the first encrypts.",
                id="datasources.E001",
            )
        ]
    if any(not isinstance(k, str | bytes) or not k for k in keys):
        return [Error("FERNET_KEYS contains an empty or non-string key.", id="datasources.E002")]
    return []


@register()
def check_refresh_timing(app_configs=None, **kwargs):
    problems = []
    longest_call = max(app_settings.HTTP_TIMEOUT, app_settings.REFRESH_TIMEOUT)
    if longest_call >= app_settings.LEASE_SECONDS:
        problems.append(
            Error(
                "DATASOURCES['LEASE_SECONDS'] must exceed DATASOURCES['REFRESH_TIMEOUT'] and "
                "DATASOURCES['HTTP_TIMEOUT'], or a slow refresh could lose its lease to a second "
                "refresh of the same token.",
                id="datasources.E003",
            )
        )
    if not 0 < app_settings.LIFETIME_FRACTION < 1:
        problems.append(
            Error(
                "DATASOURCES['LIFETIME_FRACTION'] must be between 0 and 1 (exclusive).",
                id="datasources.E004",
            )
        )
    if app_settings.REFRESH_MARGIN <= app_settings.SWEEP_INTERVAL:
        problems.append(
            Warning(
                "DATASOURCES['REFRESH_MARGIN'] is not larger than the sweep interval: tokens may "
                "expire between two sweeps.",
                hint="Make REFRESH_MARGIN at least twice SWEEP_INTERVAL.",
                id="datasources.W001",
            )
        )
    return problems


@register()
def check_import_env_prefix(app_configs=None, **kwargs):
    prefix = app_settings.IMPORT_ENV_PREFIX
    if not isinstance(prefix, str) or len(prefix) < 4:
        return [
            Error(
                "DATASOURCES['IMPORT_ENV_PREFIX'] must be a prefix of at least 4 characters: "
                'import files may read {"env": NAME} only for variables named with it, so that '
                "they cannot read the project's own secrets.",
                hint='The default is "DATASOURCE_SECRET_".',
                id="datasources.E005",
            )
        ]
    return []
