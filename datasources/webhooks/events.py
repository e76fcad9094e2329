"""Which webhook events are sent, with what payload: the receivers of the app's signals.

Rows are written in the transaction that caused the event (a transactional outbox: the token
writes in :mod:`datasources.tokens` send their signals inside their transaction) and handed to
Celery when it commits: a rolled-back change sends nothing, and a row whose task was never
enqueued (a crash right after the commit, the broker down) is sent by the sweep. A payload
names the datasource and its token's state and carries an error *code* from a fixed
vocabulary, never an error message (providers' descriptions are free text), a token or a secret.
"""

from __future__ import annotations

import logging
import re
import uuid
from datetime import UTC, datetime
from typing import Any

from django.db import DatabaseError, transaction
from django.db.models import Q
from django.dispatch import receiver
from django.utils import timezone

from ..models import (
    Datasource,
    DeliveryStatus,
    Token,
    TokenStatus,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookEvent,
)
from ..signals import (
    datasource_authorized,
    identity_mismatch,
    reauthorization_required,
    token_refresh_failed,
    token_refreshed,
)
from ..tokens.failures import CONFIGURATION_ERRORS, PERMANENT_ERRORS

logger = logging.getLogger(__name__)

#: Error codes a payload may carry as they are; anything else is reported by its kind only.
KNOWN_ERROR_CODES = frozenset(
    {
        *PERMANENT_ERRORS,
        *CONFIGURATION_ERRORS,
        "temporarily_unavailable",
        "server_error",
        "access_denied",
        "no_refresh_token",
        "reauthorization_required",
        "identity_mismatch",
    }
)
CONFIGURATION_PREFIX = "Configuration error: "
_CODE = re.compile(r"([a-z_]{1,64})(?::|$)")


def error_code(message: str, *, transient: bool) -> str:
    """The OAuth error code at the start of a recorded failure message when it is a known one;
    otherwise ``unavailable`` (transient) or ``error``: an unknown code could be anything a
    provider chose to put there."""
    head = _CODE.match(message.removeprefix(CONFIGURATION_PREFIX))
    if head and head.group(1) in KNOWN_ERROR_CODES:
        return head.group(1)
    return "unavailable" if transient else "error"


def failure_kind(message: str, *, transient: bool) -> str:
    if not transient:
        return "permanent"
    return "configuration" if message.startswith(CONFIGURATION_PREFIX) else "transient"


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def datasource_data(datasource: Datasource | None) -> dict[str, Any] | None:
    if datasource is None:
        return None
    return {"id": datasource.pk, "slug": datasource.slug, "name": datasource.name}


def token_data(
    token: Token | None, *, status: str | None = None, failures: int | None = None
) -> dict[str, Any] | None:
    """The token's state, never its values; ``end_user`` (the id the application chose) only
    for an end user's token. ``status``/``failures``: the state the event left it in, when the
    object passed with the signal predates the event's update."""
    if token is None:
        return None
    data = {
        "user_id": token.user_id,
        "status": status or token.status,
        "expires_at": _iso(token.expires_at),
        "consecutive_failures": token.failure_count if failures is None else failures,
    }
    if token.end_user:
        data["end_user"] = token.end_user
    return data


def new_event_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


def endpoints_for(event_type: str, datasource: Datasource | None) -> list[WebhookEndpoint]:
    scope = Q(datasource__isnull=True)
    if datasource is not None:
        scope |= Q(datasource=datasource)
    # Filtered in Python: JSON "contains" lookups are not portable (SQLite), and endpoints are few.
    return [
        endpoint
        for endpoint in WebhookEndpoint.objects.filter(scope, active=True)
        if event_type in (endpoint.event_types or [])
    ]


def emit(
    event_type: str,
    datasource: Datasource | None,
    data: dict[str, Any],
    *,
    endpoints: list[WebhookEndpoint] | None = None,
) -> list[WebhookDelivery]:
    """Queue one event for every endpoint that wants it (or for ``endpoints``). Never raises
    a database error into the caller: an event lost to a failing write is logged, the token
    bookkeeping that sent the signal goes on."""
    if endpoints is None:
        endpoints = endpoints_for(event_type, datasource)
    if not endpoints:
        return []
    now = timezone.now()
    event_id = new_event_id()
    payload = {"id": event_id, "type": event_type, "timestamp": _iso(now), "data": data}
    rows = [
        WebhookDelivery(
            endpoint=endpoint,
            datasource=datasource,
            event_id=event_id,
            event_type=event_type,
            payload=payload,
            status=DeliveryStatus.PENDING,
            next_attempt_at=now,
            created_at=now,
        )
        for endpoint in endpoints
    ]
    try:
        with transaction.atomic():  # a savepoint inside the caller's transaction, if any
            WebhookDelivery.objects.bulk_create(rows)
            _check_references_now()
    except DatabaseError:
        logger.exception("could not queue webhook event %s", event_type)
        return []
    ids = [row.pk for row in rows]
    transaction.on_commit(lambda: enqueue(ids))
    return rows


def _check_references_now() -> None:
    """PostgreSQL checks foreign keys at COMMIT (Django makes them deferrable): an endpoint
    deleted meanwhile would then fail the whole transaction, the token change that caused the
    event with it. Checked here, inside the savepoint, such a failure costs only the event."""
    connection = transaction.get_connection()
    if connection.vendor == "postgresql" and connection.in_atomic_block:
        connection.check_constraints()


def enqueue(ids: list[int]) -> None:
    """Hand deliveries to Celery; with the broker down they wait for the sweep."""
    from ..tasks import deliver_webhook

    for pk in ids:
        try:
            deliver_webhook.apply_async((pk,))
        except Exception:  # the broker: the row stays due and the sweep sends it
            logger.warning("could not enqueue webhook delivery %s; the sweep will", pk)
            return


# --- signal receivers ------------------------------------------------------------------------


@receiver(datasource_authorized, dispatch_uid="datasources-webhooks-authorized")
def on_authorized(*, datasource, token=None, recovered: bool = False, **kwargs: Any) -> None:
    data = {"datasource": datasource_data(datasource), "token": token_data(token)}
    emit(WebhookEvent.DATASOURCE_AUTHORIZED, datasource, data)
    if recovered:
        emit(WebhookEvent.DATASOURCE_RECOVERED, datasource, data)


@receiver(token_refreshed, dispatch_uid="datasources-webhooks-refreshed")
def on_refreshed(*, datasource, token, recovered: bool = False, **kwargs: Any) -> None:
    if recovered:
        data = {"datasource": datasource_data(datasource), "token": token_data(token)}
        emit(WebhookEvent.DATASOURCE_RECOVERED, datasource, data)


@receiver(token_refresh_failed, dispatch_uid="datasources-webhooks-refresh-failed")
def on_refresh_failed(*, datasource, token, error: str, transient: bool, **kwargs: Any) -> None:
    """Sent for a failure that starts a run and whenever the error changes (as the audit trail
    records them), not for every retry or request-path probe of an outage. ``token`` is the
    object as it was before this failure was recorded."""
    if transient and token.failure_count and error == token.last_error:
        return
    status = token.status if transient else TokenStatus.NEEDS_REAUTHORIZATION
    data = {
        "datasource": datasource_data(datasource),
        "token": token_data(token, status=status, failures=token.failure_count + 1),
        "error": {
            "code": error_code(error, transient=transient),
            "kind": failure_kind(error, transient=transient),
        },
        "will_retry": transient,
    }
    emit(WebhookEvent.TOKEN_REFRESH_FAILED, datasource, data)


@receiver(identity_mismatch, dispatch_uid="datasources-webhooks-identity-mismatch")
def on_identity_mismatch(*, datasource, token, identity: str = "", **kwargs: Any) -> None:
    """A reconnect signed in another account; the stored token was kept. The payload names the
    owner (end user or user id), not the accounts' ids."""
    data = {
        "datasource": datasource_data(datasource),
        "token": token_data(token),
        "error": {"code": "identity_mismatch", "kind": "permanent"},
    }
    if token.end_user:
        data["end_user"] = token.end_user
    emit(WebhookEvent.IDENTITY_MISMATCH, datasource, data)


@receiver(reauthorization_required, dispatch_uid="datasources-webhooks-reauthorization")
def on_reauthorization_required(*, datasource, token=None, error: str = "", **kwargs: Any) -> None:
    failures = token.failure_count + 1 if token is not None else None
    data = {
        "datasource": datasource_data(datasource),
        "token": token_data(token, status=TokenStatus.NEEDS_REAUTHORIZATION, failures=failures),
        "error": {"code": error_code(error, transient=False), "kind": "permanent"},
    }
    emit(WebhookEvent.REAUTHORIZATION_REQUIRED, datasource, data)
