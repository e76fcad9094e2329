"""Refresh failures: what an error means for the token, how long to back off, and the record.

``classify`` is the one place that says whether a token-endpoint answer kills the grant, points
at a configuration mistake, or is worth retrying. Real providers make this hard: errors come
with HTTP 200 (Slack, GitHub, Zoho), 400 carries ``temporarily_unavailable``, and some
providers use their own names for a dead refresh token.
"""

from __future__ import annotations

import enum
import logging
import random
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

from django.db import transaction
from django.dispatch import Signal
from django.utils import timezone

from ..conf import app_settings
from ..exceptions import DatasourceError, OAuthError, TransientUpstreamError
from ..models import Datasource, Token, TokenEvent, TokenStatus
from ..signals import reauthorization_required, token_refresh_failed
from .decide import due_for

logger = logging.getLogger(__name__)


class FailureKind(enum.StrEnum):
    PERMANENT = "permanent"  # the grant is dead: a person must re-authorize
    CONFIGURATION = "configuration"  # the datasource's settings are wrong: keep the token
    TRANSIENT = "transient"  # retry later: keep everything


#: RFC 6749 §5.2 codes after which only a person can help, and providers' own names for a
#: dead or unknown refresh token or code (GitHub, Slack, Zoho).
PERMANENT_ERRORS = frozenset(
    {
        "invalid_grant",
        "invalid_client",
        "unauthorized_client",
        "bad_refresh_token",  # GitHub Apps, HTTP 200
        "bad_verification_code",  # GitHub, HTTP 200
        "invalid_refresh_token",  # Slack, HTTP 200
        "token_revoked",  # Slack
        "invalid_code",  # Zoho (refresh and code), Slack (code), HTTP 200
        # OpenID Connect Core §3.1.2.6: the provider needs the person (sign-in, MFA, consent,
        # which account): Microsoft Entra answers a refresh with these when MFA or consent is
        # required again. Retrying cannot help; asking for re-authorization can.
        "interaction_required",
        "login_required",
        "consent_required",
        "account_selection_required",
    }
)
#: Codes that say the request as configured is wrong; retrying the same will fail the same way
#: until someone edits the datasource, but the grant itself may be fine.
CONFIGURATION_ERRORS = frozenset(
    {"invalid_scope", "invalid_request", "unsupported_grant_type", "invalid_target"}
)


def classify(error: DatasourceError) -> FailureKind:
    """What a failed token request means. Unknown codes are transient: guessing "dead" would
    email the owner and stop the datasource over a provider's new spelling of "try again"."""
    if not isinstance(error, OAuthError):
        return FailureKind.TRANSIENT
    return classify_answer(error.error, error.status)


def classify_answer(code: str | None, status: int | None) -> FailureKind:
    """The table behind :func:`classify`: an error ``code`` (or None) and the HTTP ``status``."""
    if status is not None and (status == 429 or status >= 500):
        return FailureKind.TRANSIENT
    if code in PERMANENT_ERRORS:
        return FailureKind.PERMANENT
    if code in CONFIGURATION_ERRORS:
        return FailureKind.CONFIGURATION
    if status == 401 and code not in ("temporarily_unavailable", "server_error"):
        # A 401 with no recognisable error: the client credentials were rejected.
        return FailureKind.PERMANENT
    return FailureKind.TRANSIENT


def backoff_seconds(failure_count: int, retry_after: float | None = None) -> float:
    """Exponential backoff with +/-20% jitter; never sooner than the server's Retry-After."""
    base = min(app_settings.BACKOFF_MAX, app_settings.BACKOFF_BASE * 2 ** max(0, failure_count - 1))
    delay = base * random.uniform(0.8, 1.2)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay


def record_retryable(
    datasource: Datasource,
    token: Token,
    err: DatasourceError,
    kind: FailureKind,
    *,
    now: datetime | None = None,
) -> None:
    """A transient or configuration failure: the token is kept, the error recorded, the
    background backs off. An event is written for the first failure of a run and whenever the
    error changes, not for every request-path probe during an outage."""
    now = now or timezone.now()
    failures = token.failure_count + 1
    retry_after = getattr(err, "retry_after", None)
    delay = backoff_seconds(failures, retry_after)
    prefix = "Configuration error: " if kind is FailureKind.CONFIGURATION else ""
    message = (prefix + str(err))[:1000]
    unknown = isinstance(err, TransientUpstreamError) and err.outcome_unknown
    fields = {
        "failure_count": failures,
        "failure_kind": kind.value,
        "last_error": message,
        "next_attempt_at": now + timedelta(seconds=delay),
        "retry_not_before": now + timedelta(seconds=retry_after) if retry_after else None,
        "last_attempt_at": now,
    }
    if unknown:
        # When the lost request was sent (its lease was taken moments before), not now.
        fields["outcome_unknown_at"] = token.outcome_unknown_at or token.refresh_started_at or now
    fields["refresh_due_at"] = due_for(datasource, token, now, fields)
    with transaction.atomic(savepoint=False):  # the token's record and its outbox
        Token.objects.filter(pk=token.pk).update(**fields)
        with outbox(datasource):
            if failures == 1 or message != token.last_error:
                detail = f"{message} Retrying in {delay:.0f}s."
                record_event(datasource, TokenEvent.Kind.REFRESH_FAILED, detail)
            announce(token_refresh_failed, datasource, token=token, error=message, transient=True)
    logger.warning(
        "refresh of datasource %s failed (%s, attempt %d): %s; background retry in %.0fs",
        datasource.slug,
        kind.value,
        failures,
        message,
        delay,
    )


def record_permanent(datasource: Datasource, token: Token, message: str) -> None:
    """The grant is dead: needs re-authorization, with an event, a log line and the signals
    (the owner's email hangs off ``reauthorization_required``)."""
    message = message[:1000]
    with transaction.atomic(savepoint=False):  # the token's record and its outbox
        Token.objects.filter(pk=token.pk).update(
            status=TokenStatus.NEEDS_REAUTHORIZATION,
            failure_count=token.failure_count + 1,
            failure_kind="",
            last_error=message,
            next_attempt_at=None,
            retry_not_before=None,
            last_attempt_at=timezone.now(),
            refresh_due_at=None,  # only a person can help now
            outcome_unknown_at=token.outcome_unknown_at,  # a lost answer explains it (if set)
        )
        with outbox(datasource):
            record_event(datasource, TokenEvent.Kind.REAUTHORIZATION_REQUIRED, message)
            announce(token_refresh_failed, datasource, token=token, error=message, transient=False)
            announce(reauthorization_required, datasource, token=token, error=message)
    logger.error("datasource %s needs re-authorization: %s", datasource.slug, message)


def record_event(datasource: Datasource, kind: str, detail: str = "") -> TokenEvent:
    return TokenEvent.objects.create(datasource=datasource, kind=kind, detail=detail[:500])


@contextmanager
def outbox(datasource: Datasource) -> Iterator[None]:
    """Write what a token change causes, its outbox, in one savepoint of the change's own
    transaction: the event row and, through the signal receivers, the webhook deliveries (the
    Celery task and the owner's email wait for the commit). A crash before the commit loses
    the change and its events together; a crash after it leaves delivery rows the webhook sweep
    sends.

    A failure in here rolls the outbox back (event row and deliveries: both or neither), is
    logged, and the token change still commits. That is the right trade-off: the change may
    hold the only valid (rotated) refresh token, which a lost event must never cost, and the
    outbox rows are plain inserts (no row another writer holds, no unique value that can clash;
    foreign keys checked inside, see ``webhooks.events``), so they fail only when the database
    does. Only the exception's type is logged: a message may carry anything."""
    try:
        with transaction.atomic():
            yield
    except Exception as err:
        logger.error(
            "datasource %s: the event and webhooks of a token change were not written (%s); "
            "the change is kept",
            datasource.slug,
            type(err).__name__,
        )


def announce(signal: Signal, datasource: Datasource, **named: Any) -> None:
    """Send one of the app's signals from inside the token change's transaction (in its
    :func:`outbox`), so what the receivers write commits with the change. Each receiver runs
    whatever another one raised (``send_robust``): a project's broken receiver must cost
    neither the webhooks nor the token change."""
    for receiver, result in signal.send_robust(sender=Datasource, datasource=datasource, **named):
        if isinstance(result, Exception):
            logger.error(
                "datasource %s: receiver %s of a token change failed (%s)",
                datasource.slug,
                getattr(receiver, "__qualname__", type(receiver).__name__),
                type(result).__name__,
            )
