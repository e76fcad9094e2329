"""Getting a valid access token: single-flight refresh, failure classification, storage.

The one service behind the proxy, the Celery tasks, the admin and app code.

Single flight: a refresh first takes a lease on the token row with one conditional UPDATE
(``lease_expires_at`` empty or lapsed), which works the same on SQLite and PostgreSQL and across
threads, processes and machines. After winning, the row is read again: another holder may have
refreshed it in the meantime. Callers that lose the race poll the row until the winner is done
and use its result. A crashed holder's lease lapses after ``LEASE_SECONDS``.
"""

from __future__ import annotations

import hmac
import logging
import random
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import transaction
from django.db.models import F
from django.utils import timezone
from django.views.decorators.debug import sensitive_variables

from . import oauth
from .conf import app_settings
from .exceptions import (
    DatasourceError,
    NotAuthorized,
    OAuthError,
    ReauthorizationRequired,
    TransientUpstreamError,
)
from .models import Datasource, GrantType, Token, TokenEvent, TokenStatus
from .signals import (
    datasource_authorized,
    reauthorization_required,
    token_refresh_failed,
    token_refreshed,
)

logger = logging.getLogger(__name__)

_POLL_INTERVAL = 0.05
#: Field values that clear a lease, and the bookkeeping of past failures.
_NO_LEASE = {"lease_id": "", "lease_expires_at": None}
_NO_FAILURE = {"last_error": "", "failure_count": 0, "next_attempt_at": None}


@dataclass(frozen=True)
class RefreshResult:
    """What one refresh attempt did: ``refreshed``, ``fresh`` (nothing to do), ``transient``,
    ``reauthorization`` or ``skipped`` (someone else holds the lease, or not authorized)."""

    outcome: str
    token: Token | None = None
    error: str = ""


def get_access_token(datasource: Datasource, *, leeway: float | None = None, user=None) -> str:
    """A valid access token, refreshed first when it expires within ``leeway`` seconds.

    ``user`` (a user or user id) selects whose token when the datasource has per-user tokens.
    """
    token = get_valid_token(datasource, leeway=leeway, user=user)
    assert token.access_token
    return token.access_token


def get_valid_token(
    datasource: Datasource,
    *,
    leeway: float | None = None,
    token: Token | None = None,
    user=None,
) -> Token:
    """The token row with a usable access token, refreshing (single-flight) if needed.

    ``token`` may be passed when the caller just read it (the proxy does, with its datasource).
    Raises NotAuthorized, ReauthorizationRequired or TransientUpstreamError.
    """
    margin = app_settings.REQUEST_LEEWAY if leeway is None else leeway
    token = token or load_token(datasource, token_owner(datasource, user))
    if token.is_fresh(margin):
        return token
    return _refresh_single_flight(
        datasource, margin=margin, stale_access_token=None, wait=True, token=token
    )


def refresh_after_rejection(
    datasource: Datasource, rejected_access_token: str, *, user=None
) -> Token:
    """The upstream API answered 401 to ``rejected_access_token``: refresh unless someone else
    already replaced it, and return the token to retry with."""
    return _refresh_single_flight(
        datasource,
        margin=0,
        stale_access_token=rejected_access_token,
        wait=True,
        token=load_token(datasource, token_owner(datasource, user)),
    )


def token_owner(datasource: Datasource, user) -> int | None:
    """Whose token serves a call: nobody's (shared) or the given user's (per-user tokens)."""
    if not datasource.per_user:
        return None
    user_id = getattr(user, "pk", user)
    if user_id is None:
        raise NotAuthorized(
            f"Datasource {datasource.slug!r} has per-user tokens and no user was given."
        )
    return user_id


def refresh_token(
    token_or_datasource: Token | Datasource, *, margin: float | None = None, force: bool = False
) -> RefreshResult:
    """One background refresh attempt; never raises for upstream failures, never waits long.

    Used by ``manage.py refresh_tokens`` and the admin's "refresh now".
    """
    datasource = (
        token_or_datasource.datasource
        if isinstance(token_or_datasource, Token)
        else token_or_datasource
    )
    margin = app_settings.REFRESH_MARGIN if margin is None else margin
    # A Token passed in is only a starting point: it is re-read after the lease is won.
    token = (
        token_or_datasource
        if isinstance(token_or_datasource, Token)
        else load_token(datasource, None)
    )
    return _attempt(datasource, token, margin=margin, force=force, lease_id=None)


def refresh_token_by_id(token_id: int, *, margin: float | None = None) -> RefreshResult:
    """The background task's refresh: lease the row first, then read it once.

    The sweep already chose the token, so taking the lease before reading saves the read that
    :func:`refresh_token` does before leasing (one query fewer per token, and the one with the
    most columns). A token leased elsewhere, or deleted since the sweep, is ``skipped``.
    """
    margin = app_settings.REFRESH_MARGIN if margin is None else margin
    lease_id = _acquire_lease(token_id)
    if lease_id is None:
        return RefreshResult("skipped")
    try:
        token = Token.objects.select_related("datasource").get(pk=token_id)
    except Token.DoesNotExist:
        return RefreshResult("skipped")
    return _attempt(token.datasource, token, margin=margin, force=False, lease_id=lease_id)


def _attempt(
    datasource: Datasource, token: Token, *, margin: float, force: bool, lease_id: str | None
) -> RefreshResult:
    """Refresh unless there is nothing to do; upstream failures become outcomes, not raises.

    ``lease_id`` is a lease already held on ``token`` (read after the lease was won).
    """
    too_old = _too_old(token)
    early = _nothing_to_do(datasource, token, margin=margin, force=force, too_old=too_old)
    if early is not None:
        if lease_id:
            _release_lease(token, lease_id)
        return early
    try:
        token = _refresh_single_flight(
            datasource,
            margin=margin,
            stale_access_token=token.access_token if force or too_old else None,
            wait=False,
            token=token,
            lease_id=lease_id,
        )
    except _LeaseBusy:
        return RefreshResult("skipped", token)
    except NotAuthorized as err:
        return RefreshResult("skipped", token, str(err))
    except ReauthorizationRequired as err:
        return RefreshResult("reauthorization", load_token(datasource, token.user_id), str(err))
    except TransientUpstreamError as err:
        return RefreshResult("transient", load_token(datasource, token.user_id), str(err))
    return RefreshResult("refreshed", token)


def _nothing_to_do(
    datasource: Datasource, token: Token, *, margin: float, force: bool, too_old: bool
) -> RefreshResult | None:
    if token.status == TokenStatus.NEEDS_REAUTHORIZATION:
        return RefreshResult("reauthorization", token, token.last_error)
    if force:
        return None
    if token.is_fresh(margin) and not too_old:
        return RefreshResult("fresh", token)
    if _unrenewable_but_valid(datasource, token, None):
        return RefreshResult("fresh", token)
    return None


@sensitive_variables()
def store_authorization(
    datasource: Datasource, response: oauth.TokenResponse, *, user=None
) -> Token:
    """Store the token from a completed authorization-code flow (replaces any previous one).

    With per-user tokens it becomes ``user``'s token; otherwise the shared one.
    """
    now = timezone.now()
    owner = token_owner(datasource, user)
    load_token(datasource, owner)
    with transaction.atomic():
        Token.objects.filter(datasource=datasource, user_id=owner).update(
            **_token_fields(datasource, response, now, keep_refresh_token=False),
            obtained_at=now,
            status=TokenStatus.ACTIVE,
            **_NO_FAILURE,
            **_NO_LEASE,
        )
        record_event(datasource, TokenEvent.Kind.AUTHORIZED, _granted(response))
    token = load_token(datasource, owner)
    datasource_authorized.send(sender=Datasource, datasource=datasource, user=user)
    return token


def disconnect(datasource: Datasource) -> list[str]:
    """Revoke at ``revocation_url`` (refresh token first, RFC 7009 §2) when set, then forget the
    stored tokens (every user's, with per-user tokens). Returns the problems met while revoking
    (secret-free)."""
    problems: list[str] = []
    for token in Token.objects.filter(datasource=datasource):
        problems += _disconnect_one(datasource, token)
    record_event(
        datasource,
        TokenEvent.Kind.REVOKED,
        "Disconnected" + (" (revocation failed)" if problems else ""),
    )
    return problems


@sensitive_variables()
def _disconnect_one(datasource: Datasource, token: Token) -> list[str]:
    problems: list[str] = []
    if datasource.revocation_url:
        for value, hint in (
            (token.refresh_token, "refresh_token"),
            (token.access_token, "access_token"),
        ):
            if not value:
                continue
            try:
                oauth.revoke(datasource, value, hint)
            except DatasourceError as err:
                problems.append(f"Revoking the {hint.replace('_', ' ')} failed: {err}")
    with transaction.atomic():
        Token.objects.filter(pk=token.pk).update(
            access_token=None,
            refresh_token=None,
            token_type="",
            scope="",
            expires_at=None,
            obtained_at=None,
            status=TokenStatus.NOT_AUTHORIZED,
            **_NO_FAILURE,
            **_NO_LEASE,
        )
    return problems


def reset_after_reconfiguration(datasource: Datasource) -> None:
    """Credentials were edited: a client-credentials datasource may try again at once."""
    if datasource.grant_type == GrantType.CLIENT_CREDENTIALS:
        Token.objects.filter(datasource=datasource).exclude(status=TokenStatus.ACTIVE).update(
            status=TokenStatus.NOT_AUTHORIZED, **_NO_FAILURE
        )


def record_event(datasource: Datasource, kind: str, detail: str = "") -> TokenEvent:
    return TokenEvent.objects.create(datasource=datasource, kind=kind, detail=detail[:500])


# --- internals -------------------------------------------------------------------------------


class _LeaseBusy(Exception):
    pass


def load_token(datasource: Datasource, user_id: int | None) -> Token:
    """The token row for (datasource, user), created empty if the user has none yet."""
    token, _ = Token.objects.select_related("datasource").get_or_create(
        datasource=datasource, user_id=user_id
    )
    return token


def _reload(token: Token, datasource: Datasource) -> Token:
    fresh = Token.objects.get(pk=token.pk)
    fresh.datasource = datasource
    return fresh


def _too_old(token: Token) -> bool:
    if token.status != TokenStatus.ACTIVE or token.last_refreshed_at is None:
        return False
    age = (timezone.now() - token.last_refreshed_at).total_seconds()
    return age >= app_settings.MAX_TOKEN_AGE


def _acquire_lease(token_id: int) -> str | None:
    lease_id = uuid.uuid4().hex
    now = timezone.now()
    won = (
        Token.objects.filter(pk=token_id)
        .unleased(now)
        .update(
            lease_id=lease_id, lease_expires_at=now + timedelta(seconds=app_settings.LEASE_SECONDS)
        )
    )
    return lease_id if won else None


def _release_lease(token: Token, lease_id: str) -> None:
    Token.objects.filter(pk=token.pk, lease_id=lease_id).update(**_NO_LEASE)


def _same_secret(a: str | None, b: str | None) -> bool:
    return bool(a) and bool(b) and hmac.compare_digest(a.encode(), b.encode())


def _needs_refresh(token: Token, margin: float, stale_access_token: str | None) -> bool:
    if stale_access_token is not None:
        # Forced: only if nobody replaced the token we were told is bad.
        return _same_secret(token.access_token, stale_access_token) or not token.access_token
    return not token.is_fresh(margin)


def _refresh_single_flight(
    datasource: Datasource,
    *,
    margin: float,
    stale_access_token: str | None,
    wait: bool,
    token: Token,
    lease_id: str | None = None,
) -> Token:
    """``lease_id``: the caller already holds the lease and read ``token`` after winning it."""
    deadline = time.monotonic() + app_settings.LEASE_WAIT
    user_id = token.user_id
    held = lease_id is not None
    while True:
        if not held:
            token = token or load_token(datasource, user_id)
            if not _needs_refresh(token, margin, stale_access_token):
                return token
            if _unrenewable_but_valid(datasource, token, stale_access_token):
                return token
            _raise_if_unusable(datasource, token)
            if wait and _in_backoff(token):
                return _backoff_answer(datasource, token, stale_access_token)
            lease_id = _acquire_lease(token.pk)
        if lease_id:
            try:
                if not held:  # the previous holder may have just finished
                    token = _reload(token, datasource)
                if not _needs_refresh(token, margin, stale_access_token):
                    return token
                _raise_if_unusable(datasource, token)
                if wait and _in_backoff(token):
                    return _backoff_answer(datasource, token, stale_access_token)
                refreshed = _perform_refresh(datasource, token, lease_id)
                lease_id = None  # released by the same UPDATE that stored the token
                return refreshed
            finally:
                if lease_id:
                    _release_lease(token, lease_id)
        token = None  # read it again next round
        if not wait:
            raise _LeaseBusy
        if time.monotonic() >= deadline:
            token = load_token(datasource, user_id)
            if _usable_as_is(token, stale_access_token):
                return token
            raise TransientUpstreamError("Timed out waiting for another refresh of this token.")
        time.sleep(_POLL_INTERVAL)


def _raise_if_unusable(datasource: Datasource, token: Token) -> None:
    if token.status == TokenStatus.NEEDS_REAUTHORIZATION:
        raise ReauthorizationRequired(
            "reauthorization_required",
            f"Datasource {datasource.slug!r} needs to be re-authorized in the admin.",
        )
    if datasource.grant_type == GrantType.AUTHORIZATION_CODE and not token.refresh_token:
        if not token.access_token:
            raise NotAuthorized(f"Datasource {datasource.slug!r} has not been authorized yet.")
        err = ReauthorizationRequired(
            "no_refresh_token",
            f"The token of datasource {datasource.slug!r} needs renewing and the server gave "
            "no refresh token; re-authorize in the admin.",
        )
        _record_permanent(datasource, token, err)
        raise err


def _unrenewable_but_valid(
    datasource: Datasource, token: Token, stale_access_token: str | None
) -> bool:
    """Without a refresh token there is nothing better than the current token until it expires."""
    return (
        datasource.grant_type == GrantType.AUTHORIZATION_CODE
        and not token.refresh_token
        and stale_access_token is None
        and bool(token.access_token)
        and not token.is_expired()
        and token.status == TokenStatus.ACTIVE
    )


def _usable_as_is(token: Token, stale_access_token: str | None) -> bool:
    """Not expired, and not the token the upstream API just rejected."""
    return stale_access_token is None and bool(token.access_token) and not token.is_expired()


def _in_backoff(token: Token) -> bool:
    return bool(token.next_attempt_at and token.next_attempt_at > timezone.now())


def _backoff_answer(datasource: Datasource, token: Token, stale_access_token: str | None) -> Token:
    """During a transient-failure backoff the request path does not hammer the server: it uses
    the current token while that is still valid, and otherwise reports the recorded failure."""
    if _usable_as_is(token, stale_access_token):
        return token
    assert token.next_attempt_at is not None
    raise TransientUpstreamError(
        f"Refreshing datasource {datasource.slug!r} failed recently ({token.last_error}); "
        f"next attempt at {token.next_attempt_at:%H:%M:%S} UTC.",
        retry_after=(token.next_attempt_at - timezone.now()).total_seconds(),
    )


@sensitive_variables()
def _perform_refresh(datasource: Datasource, token: Token, lease_id: str) -> Token:
    try:
        if datasource.grant_type == GrantType.CLIENT_CREDENTIALS:
            response = oauth.client_credentials(datasource)
        else:
            if not token.refresh_token:  # guarded by _raise_if_unusable
                raise NotAuthorized(f"Datasource {datasource.slug!r} has no refresh token.")
            response = oauth.refresh(datasource, token.refresh_token)
    except TransientUpstreamError as err:
        _record_transient(datasource, token, err)
        raise
    except OAuthError as err:
        _record_permanent(datasource, token, err)
        if isinstance(err, ReauthorizationRequired):
            raise
        raise ReauthorizationRequired(err.error, err.description) from None
    return _store_refresh(datasource, token, response, lease_id)


@sensitive_variables()
def _store_refresh(
    datasource: Datasource, token: Token, response: oauth.TokenResponse, lease_id: str
) -> Token:
    """Persist access and (rotated) refresh token in one UPDATE, before anyone can use either."""
    now = timezone.now()
    fields = _token_fields(datasource, response, now, keep_refresh_token=True)
    if token.status == TokenStatus.NOT_AUTHORIZED:
        fields["obtained_at"] = now
    fields.update(status=TokenStatus.ACTIVE, **_NO_FAILURE)
    # No transaction around the two writes: the UPDATE commits on its own, so a failure to
    # write the event row can never roll back the only valid (rotated) refresh token.
    rows = Token.objects.filter(pk=token.pk)
    bump = {"refresh_count": F("refresh_count") + 1}
    if not rows.filter(lease_id=lease_id).update(**fields, **bump, **_NO_LEASE):
        # Our lease lapsed mid-request. The response may carry the only valid (rotated)
        # refresh token, so it is stored all the same.
        logger.warning(
            "refresh lease of datasource %s lapsed before the refresh finished",
            datasource.slug,
        )
        rows.update(**fields, **bump)
    record_event(datasource, TokenEvent.Kind.REFRESHED, _granted(response))
    for name, value in {**fields, **_NO_LEASE}.items():
        setattr(token, name, value)
    token.refresh_count += 1
    token_refreshed.send(sender=Datasource, datasource=datasource, token=token)
    return token


def _token_fields(
    datasource: Datasource,
    response: oauth.TokenResponse,
    now: datetime,
    *,
    keep_refresh_token: bool,
) -> dict:
    lifetime = (
        response.expires_in
        if response.expires_in is not None
        else datasource.effective_token_lifetime
    )
    fields = {
        "access_token": response.access_token,
        "token_type": response.token_type[:50],
        "scope": (response.scope or datasource.scopes)[:2000],
        "expires_at": now + timedelta(seconds=max(0, int(lifetime))),
        "last_refreshed_at": now,
    }
    if response.refresh_token or not keep_refresh_token:
        # Rotation: the new refresh token replaces the old one; none sent: keep the stored one.
        fields["refresh_token"] = response.refresh_token
    return fields


def _granted(response: oauth.TokenResponse) -> str:
    parts = [
        f"expires in {response.expires_in}s"
        if response.expires_in is not None
        else "no expiry given"
    ]
    if response.scope:
        parts.append(f"scope: {response.scope}")
    if response.refresh_token:
        parts.append("new refresh token")
    return "; ".join(parts)


def backoff_seconds(failure_count: int, retry_after: float | None = None) -> float:
    """Exponential backoff with +/-20% jitter; never sooner than the server's Retry-After."""
    base = min(app_settings.BACKOFF_MAX, app_settings.BACKOFF_BASE * 2 ** max(0, failure_count - 1))
    delay = base * random.uniform(0.8, 1.2)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay


def _record_transient(datasource: Datasource, token: Token, err: TransientUpstreamError) -> None:
    failures = token.failure_count + 1
    delay = backoff_seconds(failures, err.retry_after)
    message = str(err)[:1000]
    Token.objects.filter(pk=token.pk).update(
        failure_count=failures,
        last_error=message,
        next_attempt_at=timezone.now() + timedelta(seconds=delay),
    )
    record_event(datasource, TokenEvent.Kind.REFRESH_FAILED, f"{message} Retrying in {delay:.0f}s.")
    logger.warning(
        "refresh of datasource %s failed (transient, attempt %d): %s; retrying in %.0fs",
        datasource.slug,
        failures,
        message,
        delay,
    )
    token_refresh_failed.send(
        sender=Datasource, datasource=datasource, token=token, error=message, transient=True
    )


def _record_permanent(datasource: Datasource, token: Token, err: OAuthError) -> None:
    message = str(err)[:1000]
    Token.objects.filter(pk=token.pk).update(
        status=TokenStatus.NEEDS_REAUTHORIZATION,
        failure_count=token.failure_count + 1,
        last_error=message,
        next_attempt_at=None,
    )
    record_event(datasource, TokenEvent.Kind.REAUTHORIZATION_REQUIRED, message)
    logger.error("datasource %s needs re-authorization: %s", datasource.slug, message)
    token_refresh_failed.send(
        sender=Datasource, datasource=datasource, token=token, error=message, transient=False
    )
    reauthorization_required.send(
        sender=Datasource, datasource=datasource, token=token, error=message
    )


def due_token_ids(limit: int | None = None) -> list[int]:
    """Ids of the tokens the background sweep should refresh now, most urgent first."""
    limit = app_settings.SWEEP_BATCH_SIZE if limit is None else limit
    due = Token.objects.due(
        margin=app_settings.REFRESH_MARGIN, max_age=app_settings.MAX_TOKEN_AGE
    ).order_by(F("expires_at").asc(nulls_first=True))
    return list(due.values_list("pk", flat=True)[:limit])


def prune_history() -> int:
    """Drop token events past the retention period and stale authorization requests."""
    from .flow import purge_expired

    cutoff = timezone.now() - timedelta(days=app_settings.EVENT_RETENTION_DAYS)
    deleted, _ = TokenEvent.objects.filter(created_at__lt=cutoff).delete()
    return deleted + purge_expired()
