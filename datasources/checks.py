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


#: The shortest refresh lease: three beats of the lease keeper must fit, with room for a slow
#: database round trip in each.
MIN_LEASE_SECONDS = 2


@register()
def check_refresh_timing(app_configs=None, **kwargs):
    problems = []
    if app_settings.LEASE_SECONDS < MIN_LEASE_SECONDS:
        problems.append(
            Error(
                f"DATASOURCES['LEASE_SECONDS'] must be at least {MIN_LEASE_SECONDS:g}: the holder "
                "extends its lease every LEASE_SECONDS / 3, and a shorter lease could lapse under "
                "a live holder (a slow database, a paused process), letting a second refresh of "
                "the same token start.",
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


@register()
def check_secure_cookies(app_configs=None, **kwargs):
    """With DEBUG off, Secure-only cookies make signing in over plain http fail with "CSRF
    cookie not set"; say so before an operator meets it in the browser."""
    secure_cookies = getattr(settings, "SESSION_COOKIE_SECURE", False) or getattr(
        settings, "CSRF_COOKIE_SECURE", False
    )
    if settings.DEBUG or not secure_cookies or getattr(settings, "SECURE_PROXY_SSL_HEADER", None):
        return []
    return [
        Warning(
            "The session and CSRF cookies are sent over HTTPS only (DEBUG is off), and no "
            "TLS-terminating proxy is configured: signing in to the admin over plain http "
            'fails with "CSRF verification failed. CSRF cookie not set."',
            hint="Serve the admin over HTTPS (behind a TLS proxy set "
            "SECURE_PROXY_SSL_HEADER_ENABLED=1). Only on a trusted network, set "
            "SESSION_COOKIE_SECURE=0 and CSRF_COOKIE_SECURE=0. If the web server (uvicorn "
            "or gunicorn) terminates TLS itself, silence this with SILENCED_SYSTEM_CHECKS.",
            id="datasources.W010",
        )
    ]


@register()
def check_tracing(app_configs=None, **kwargs):
    if not app_settings.TRACING:
        return []
    try:
        import opentelemetry.trace  # noqa: F401
    except ImportError:
        return [
            Error(
                "DATASOURCES['TRACING'] is on but opentelemetry-api is not installed: no spans "
                "would be recorded.",
                hint="pip install 'django-oauth2-datasources[otel]', or turn TRACING off.",
                id="datasources.E006",
            )
        ]
    return []


@register()
def check_webhook_timing(app_configs=None, **kwargs):
    if app_settings.WEBHOOK_CLAIM_SECONDS <= app_settings.WEBHOOK_TIMEOUT:
        return [
            Warning(
                "DATASOURCES['WEBHOOK_CLAIM_SECONDS'] should exceed DATASOURCES['WEBHOOK_TIMEOUT']: "
                "a slow attempt could be sent a second time by the sweep while it still runs.",
                id="datasources.W020",
            )
        ]
    return []
