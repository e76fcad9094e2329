"""One exception hierarchy. Messages never contain secrets or token-endpoint bodies."""

from __future__ import annotations

from django.core.exceptions import ImproperlyConfigured, SuspiciousOperation


class DatasourceError(Exception):
    """Base class for every runtime error this app raises."""


class NotAuthorized(DatasourceError):
    """The datasource has never been authorized (or was disconnected)."""


class OAuthError(DatasourceError):
    """The authorization server answered with an RFC 6749 error.

    Carries the error code and a short description, never the response body verbatim.
    """

    def __init__(self, error: str, description: str = "") -> None:
        self.error = error
        self.description = description
        super().__init__(f"{error}: {description}" if description else error)


class ReauthorizationRequired(OAuthError):
    """invalid_grant, invalid_client, unauthorized_client, or a revoked refresh token."""


class TransientUpstreamError(DatasourceError):
    """Network error, timeout, 5xx, 429 or an unparseable body: retry later, keep the token."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class InvalidState(DatasourceError, SuspiciousOperation):
    """A callback whose state is missing, unknown, expired, reused or from another session."""


class InsecureTransport(DatasourceError):
    """An http:// URL that is not a loopback address."""


class DatasourcesConfigurationError(ImproperlyConfigured):
    """The app is misconfigured (settings, keys)."""
