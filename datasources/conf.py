"""App settings: one object, read lazily from ``settings.DATASOURCES``, reset on ``setting_changed``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.dispatch import receiver

DEFAULTS: dict[str, Any] = {
    # Origin used to build the callback URL shown in the admin and sent as redirect_uri
    # (e.g. "https://datasources.example.com"). Empty: the request's own origin.
    "PUBLIC_BASE_URL": "",
    # Seconds before expiry at which the background sweep refreshes a token.
    "REFRESH_MARGIN": 300,
    # Seconds before expiry at which the request path (proxy, client API) refreshes first.
    "REQUEST_LEEWAY": 30,
    # The margin and the leeway are capped at this fraction of a token's lifetime, so a token
    # is refreshed about once per lifetime however short it lives.
    "LIFETIME_FRACTION": 0.5,
    # While a token is expired and refreshing fails, the request path tries again (one caller,
    # single-flight) at most this often, never before the server's Retry-After.
    "PROBE_INTERVAL": 5.0,
    # An upstream "expired" answer (401) triggers a refresh unless a refresh that a rejection
    # caused happened for the token within this many seconds, so an API that always answers
    # 401 causes at most one refresh per cooldown.
    "REJECTION_COOLDOWN": 30.0,
    # Refresh at least this often even when tokens live longer (idle refresh tokens get revoked).
    "MAX_TOKEN_AGE": 86400,
    # Lifetime assumed when the token endpoint sends no expires_in and the datasource sets none.
    "DEFAULT_TOKEN_LIFETIME": 3600,
    # Deadline (seconds, for the whole call: connecting, sending, every byte of the answer) of
    # discovery and revocation calls to an authorization server.
    "HTTP_TIMEOUT": 10.0,
    # Deadline (seconds, whole call) of token requests (refresh, code exchange, client
    # credentials): longer, because giving up on a refresh the server may still complete can
    # cost a rotated token.
    "REFRESH_TIMEOUT": 20.0,
    # Largest answer read from an authorization server (token, revocation, discovery); a larger
    # one is abandoned unread, as a transient failure.
    "HTTP_MAX_RESPONSE_BYTES": 1024 * 1024,
    "USER_AGENT": "django-oauth2-datasources/0.2",
    # http:// is refused except for loopback hosts (127.0.0.0/8, ::1, localhost) when this is on.
    "ALLOW_LOOPBACK_HTTP": True,
    # Authorization requests (state + PKCE verifier) expire after this many seconds.
    "STATE_LIFETIME": 600,
    # A connect link (POST /api/v1/connect/sessions) works for this many seconds, once.
    "CONNECT_SESSION_LIFETIME": 1800,
    # At most this many pending authorization requests per browser session.
    "MAX_PENDING_AUTHORIZATIONS": 10,
    # Refresh lease: its holder extends it every LEASE_SECONDS / 3 while its request runs, so a
    # crashed holder's lease lapses (and a waiting caller takes over) within this many seconds.
    "LEASE_SECONDS": 5,
    # How long a caller with an expired token waits for another holder's refresh (callers whose
    # token is still valid never wait).
    "LEASE_WAIT": 15.0,
    # Transient-failure backoff: base * 2**(failures-1), capped, with +/-20% jitter.
    "BACKOFF_BASE": 30,
    "BACKOFF_MAX": 3600,
    # Background sweep: beat interval and how many tokens one sweep enqueues at most.
    "SWEEP_INTERVAL": 60,
    "SWEEP_BATCH_SIZE": 1000,
    # A sweep keeps enqueuing batches while tokens are due, as long as fewer than this many
    # refresh tasks wait in the broker (so a backlog drains without flooding the broker).
    "SWEEP_MAX_QUEUED": 10000,
    # An enqueued token is not picked again for this long (its task writes the real due time;
    # a lost task's claim lapses).
    "SWEEP_CLAIM_SECONDS": 300,
    # Token events older than this many days are pruned by the sweep.
    "EVENT_RETENTION_DAYS": 30,
    # Proxy: (connect, read) timeouts to the upstream API, and the largest request body kept in
    # memory so that it can be replayed after a refresh-on-401.
    "PROXY_CONNECT_TIMEOUT": 5.0,
    "PROXY_READ_TIMEOUT": 60.0,
    "PROXY_REPLAY_MAX_BYTES": 1024 * 1024,
    "PROXY_CHUNK_SIZE": 64 * 1024,
    # A datasource's expired-token body conditions are looked for only in JSON answers of at
    # most this many bytes (as sent, and once decompressed); larger answers stream untouched.
    "EXPIRY_BODY_MAX_BYTES": 64 * 1024,
    # Opt-in retries (per datasource): the first wait and the longest one (seconds), doubled
    # each retry with jitter; a server's Retry-After replaces them.
    "RETRY_BACKOFF_BASE": 0.5,
    "RETRY_BACKOFF_MAX": 8.0,
    # Shared upstream health (rate-limit memory, circuit breaker): "auto" (Redis when REDIS_URL
    # is set, else the database), "redis" or "database"; a process re-reads a datasource's
    # record at most this often (seconds; 0: on every call).
    "UPSTREAM_HEALTH": True,  # False: no rate-limit memory and no circuit breaker at all
    "HEALTH_STORE": "auto",
    "HEALTH_CACHE_SECONDS": 1.0,
    # An upstream's rate limit (Retry-After, RateLimit-Reset) is remembered at most this long.
    "RATE_LIMIT_MAX_SECONDS": 3600,
    # Circuit breaker: this many consecutive upstream failures (5xx, connection errors,
    # timeouts; 0: no breaker) within BREAKER_WINDOW seconds open the circuit for
    # BREAKER_COOLDOWN seconds; then one call probes.
    "BREAKER_THRESHOLD": 5,
    "BREAKER_WINDOW": 60.0,
    "BREAKER_COOLDOWN": 30.0,
    # Largest number of pooled keep-alive connections per upstream host, per process.
    "PROXY_POOL_SIZE": 32,
    # Threads per process that run the proxy's calls under the ASGI fast path (config.asgi).
    "PROXY_ASGI_THREADS": 16,
    # Under ASGI (config.asgi), the proxy's hot path is served on the event loop
    # (datasources/proxy/lane.py); False: every call takes the thread-pool path.
    "PROXY_FAST_LANE": True,
    # How long (seconds) a process reuses a datasource's configuration, its current token and a
    # verified API key without reading the database. Edits, revocations and re-authorizations
    # made in other processes take effect within this time. 0 disables the cache.
    "PROXY_CACHE_SECONDS": 5.0,
    # While the database is unavailable (a restart, a failover), a call whose API key and token
    # this process has cached is still served from those entries for up to this many seconds
    # past their PROXY_CACHE_SECONDS (never with a token past its expiry); any other call gets
    # 503 database_unavailable. 0: no stale serving.
    "PROXY_STALE_IF_ERROR": 60.0,
    # Bearer token Prometheus sends to /metrics. Empty: only users who may view datasources.
    "METRICS_TOKEN": "",
    # Email the datasource's owner when it needs re-authorization.
    "EMAIL_OWNER_ON_REAUTHORIZATION": True,
    # Proxy call counters are written to the database at most this often (seconds) per process.
    "USAGE_FLUSH_INTERVAL": 1.0,
    # Call log: one row per proxied call (no query strings, headers or bodies), written in
    # batches at most every CALL_LOG_FLUSH_INTERVAL seconds (or CALL_LOG_MAX_BUFFER rows) per
    # process, kept CALL_LOG_RETENTION_DAYS days (pruned every CALL_LOG_PRUNE_INTERVAL s by beat).
    "CALL_LOG": True,
    "CALL_LOG_FLUSH_INTERVAL": 1.0,
    "CALL_LOG_MAX_BUFFER": 5000,
    "CALL_LOG_RETENTION_DAYS": 7,
    "CALL_LOG_PRUNE_INTERVAL": 3600,
    # Beat snapshots the proxy counters this often (seconds) for the admin's 24-hour charts.
    "USAGE_SAMPLE_INTERVAL": 300,
    # Timeout (seconds, or a (connect, read) pair) of the Python client (datasource.session())
    # unless one is given per session or per call.
    "CLIENT_TIMEOUT": 30.0,
    # Webhooks (docs/webhooks.md): the deadline of one attempt (seconds, whole call), the most
    # of a receiver's answer read, and how many attempts a delivery gets, BACKOFF_BASE *
    # 2**(attempt-1) seconds apart (capped at BACKOFF_MAX, +/-20% jitter).
    "WEBHOOK_TIMEOUT": 10.0,
    "WEBHOOK_MAX_RESPONSE_BYTES": 64 * 1024,
    "WEBHOOK_MAX_ATTEMPTS": 12,
    "WEBHOOK_BACKOFF_BASE": 15.0,
    "WEBHOOK_BACKOFF_MAX": 3600.0,
    # A worker holds a delivery this long per attempt (must exceed WEBHOOK_TIMEOUT): after a
    # killed worker or a lost task, the sweep sends it again once this has passed.
    "WEBHOOK_CLAIM_SECONDS": 60,
    # Beat sends deliveries whose task was lost every this many seconds (at most this many per
    # run) and deletes finished deliveries older than WEBHOOK_RETENTION_DAYS.
    "WEBHOOK_SWEEP_INTERVAL": 60,
    "WEBHOOK_SWEEP_BATCH_SIZE": 1000,
    "WEBHOOK_RETENTION_DAYS": 30,
    # After "Rotate secret", the previous secret keeps signing (a second signature) this long.
    "WEBHOOK_SECRET_ROTATION_GRACE": 86400,
    # import_datasources: {"env": NAME} may only name environment variables starting with this
    # prefix, so an import file cannot read the project's own secrets (SECRET_KEY, FERNET_KEYS,
    # DATABASE_URL ...) and send them to a token URL it names.
    "IMPORT_ENV_PREFIX": "DATASOURCE_SECRET_",
    # import_datasources: the largest file read (bytes).
    "IMPORT_MAX_BYTES": 1024 * 1024,
    # OpenTelemetry spans (docs/tracing.md): off unless on; traceparent sent upstream only with
    # TRACING_PROPAGATE; a caller's traceparent continued only with TRACING_TRUST_INCOMING.
    "TRACING": False,
    "TRACING_PROPAGATE": False,
    "TRACING_TRUST_INCOMING": False,
}


#: The environment variable of a setting is its name behind this prefix: DATASOURCES_LEASE_WAIT.
ENV_PREFIX = "DATASOURCES_"
_TRUE = frozenset({"1", "true", "yes", "on", "y", "ok"})
_FALSE = frozenset({"0", "false", "no", "off", "n", ""})
#: Settings with a whole-number default that count things (the others are seconds and may be
#: fractional).
_COUNTS = ("_SIZE", "_ATTEMPTS", "_BYTES", "_QUEUED", "_BUFFER", "_DAYS", "_THRESHOLD", "_THREADS")


def settings_from_environ(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The ``DATASOURCES`` settings that the environment sets: every setting ``NAME`` may be set
    by ``DATASOURCES_NAME``, parsed as its default's type (a flag, a whole number, a number of
    seconds or text). For a project's settings module::

        DATASOURCES = settings_from_environ()

    Why one generic reader instead of a line per setting: an operator can then change any of
    them (a lease, a timeout, the cooldown) without a code change, and the table in
    docs/operations.md cannot miss one. A value that does not parse is refused at start with the
    variable's name, never its value (some are secrets, e.g. METRICS_TOKEN)."""
    environ = os.environ if environ is None else environ
    found: dict[str, Any] = {}
    for name, default in DEFAULTS.items():
        raw = environ.get(ENV_PREFIX + name)
        if raw is not None:
            found[name] = _parse(ENV_PREFIX + name, raw.strip(), default)
    return found


def _parse(variable: str, raw: str, default: Any) -> Any:
    """``raw`` as the type of ``default``; ImproperlyConfigured naming ``variable`` otherwise."""
    if isinstance(default, bool):
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise ImproperlyConfigured(
            f"{variable} must be a flag: 1 or 0 (true/false, yes/no, on/off)."
        )
    if isinstance(default, int | float):
        try:
            number = float(raw)
        except ValueError:
            number = float("nan")
        if number != number or number in (float("inf"), float("-inf")):
            raise ImproperlyConfigured(f"{variable} must be a number.")
        if isinstance(default, int) and number.is_integer():
            return int(number)
        if isinstance(default, int) and variable.endswith(_COUNTS):
            raise ImproperlyConfigured(f"{variable} must be a whole number.")
        return number
    return raw


class AppSettings:
    """Attribute access to DATASOURCES settings with defaults; values are cached until reset."""

    def __init__(self, defaults: dict[str, Any]) -> None:
        self._defaults = defaults

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name not in self._defaults:
            raise AttributeError(f"Invalid datasources setting: {name!r}")
        user = getattr(settings, "DATASOURCES", {}) or {}
        value = user.get(name, self._defaults[name])
        self.__dict__[name] = value  # later reads are plain attribute reads (the proxy's hot path)
        return value

    def reload(self) -> None:
        for name in self._defaults:
            self.__dict__.pop(name, None)


app_settings = AppSettings(DEFAULTS)


@receiver(setting_changed)
def _reload_settings(*, setting: str, **kwargs: Any) -> None:
    if setting == "DATASOURCES":
        app_settings.reload()
