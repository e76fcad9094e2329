"""One exception hierarchy. Messages never contain secrets or token-endpoint bodies."""

from __future__ import annotations

from django.core.exceptions import ImproperlyConfigured, SuspiciousOperation


class DatasourceError(Exception):
    """Base class for every runtime error this app raises."""


class NotAuthorized(DatasourceError):
    """The datasource has never been authorized (or was disconnected)."""


class NotConnected(NotAuthorized):
    """An end user of the application has no connection to the datasource (never connected, or
    disconnected): the proxy's ``409 not_connected``. The shared token is never a fallback."""

    def __init__(self, message: str, *, end_user: str) -> None:
        self.end_user = end_user
        super().__init__(message)


class IdentityMismatch(DatasourceError):
    """A reconnect signed in another upstream account than the one connected: nothing was
    replaced (connect links answer ``identity_mismatch``)."""


class OAuthError(DatasourceError):
    """The authorization server answered with an RFC 6749 error.

    Carries the error code and a short description, never the response body verbatim.
    """

    def __init__(self, error: str, description: str = "", *, status: int | None = None) -> None:
        self.error = error
        self.description = description
        self.status = status  # the HTTP status it came with (200 for errors in a 200 answer)
        super().__init__(f"{error}: {description}" if description else error)


class ReauthorizationRequired(OAuthError):
    """The grant is dead (invalid_grant, invalid_client, unauthorized_client, a bare 401, or a
    token that cannot be renewed): only a person can fix it. Raised by the token service after
    classifying what the server said (``datasources.tokens.failures.classify``)."""


class TransientUpstreamError(DatasourceError):
    """Network error, timeout, 5xx, 429 or an unparseable body: retry later, keep the token.

    ``outcome_unknown``: the request was sent and its answer lost (read timeout, connection
    dropped mid-answer), so the server may have acted on it, e.g. rotated a refresh token.
    """

    def __init__(
        self, message: str, *, retry_after: float | None = None, outcome_unknown: bool = False
    ) -> None:
        self.retry_after = retry_after
        self.outcome_unknown = outcome_unknown
        super().__init__(message)


class InvalidState(DatasourceError, SuspiciousOperation):
    """A callback whose state is missing, unknown, expired, reused or from another session."""


class InsecureTransport(DatasourceError):
    """An http:// URL that is not a loopback address."""


class DatasourcesConfigurationError(ImproperlyConfigured):
    """The app is misconfigured (settings, keys)."""


class UpstreamRefused(TransientUpstreamError):
    """The call was not sent: the upstream's rate limit has not lifted yet (``status`` 429) or
    its circuit breaker is open (503). ``retry_after`` says when to try again."""

    def __init__(self, message: str, *, status: int, retry_after: float) -> None:
        self.status = status
        super().__init__(message, retry_after=retry_after)


def is_database_outage(err: BaseException) -> bool:
    """Whether ``err`` says the database is away (a restart, a failover, cut connections), so
    that trying again shortly will work, rather than that a statement is wrong (a bug).

    One answer for every place that rides out an outage: the proxy's 503
    ``database_unavailable``, its stale-if-error serving from the process caches, and a refresh
    that keeps its token endpoint's answer until it can be stored.
    """
    from django.db import (
        DatabaseError,
        DataError,
        IntegrityError,
        InterfaceError,
        NotSupportedError,
        ProgrammingError,
    )

    statement_errors = (IntegrityError, ProgrammingError, DataError, NotSupportedError)
    return isinstance(err, DatabaseError | InterfaceError) and not isinstance(err, statement_errors)
