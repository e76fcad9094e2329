"""Carrying out decisions: get a usable token, refresh single-flight, record what happened.

Every caller asks :func:`~datasources.tokens.decide.decide` what to do and this module does it:
take the lease, re-read the row and ask again (another holder may have just finished), call the
token endpoint, store the result or record the failure, wait for another holder, or raise the
error the caller maps to a response (409 needs a person, 503 try later).
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from django.core.signals import setting_changed
from django.db import DatabaseError, connections, router
from django.dispatch import receiver
from django.utils import timezone
from django.views.decorators.debug import sensitive_variables

from ..authserver import oauth
from ..conf import app_settings
from ..exceptions import (
    DatasourceError,
    NotAuthorized,
    OAuthError,
    ReauthorizationRequired,
    TransientUpstreamError,
    is_database_outage,
)
from ..models import Datasource, GrantType, Token, TokenEvent
from ..ops import tracing
from . import lease
from .decide import (
    Action,
    Decision,
    Policy,
    Situation,
    TokenState,
    decide,
    usable_until_expiry,
    use_until,
)
from .failures import FailureKind, classify, record_event, record_permanent, record_retryable
from .lifecycle import (
    end_user_token,
    load_token,
    reload,
    store_due,
    store_refresh,
    token_owner,
)

logger = logging.getLogger(__name__)

_POLL_INTERVAL = 0.05
#: How long a refreshed token's answer is kept while the database is away before giving up on
#: storing it (below the refresh task's 60 s soft time limit; a failover takes up to ~30 s).
STORE_RETRY_SECONDS = 45.0
#: Rounds of "decide, act" without waiting before giving up (a guard, never reached in practice).
_MAX_ROUNDS = 20


@dataclass(frozen=True)
class RefreshResult:
    """What one background or forced attempt did: ``refreshed``, ``fresh`` (nothing to do),
    ``transient`` or ``configuration`` (failed, will retry), ``reauthorization`` or ``skipped``
    (someone else holds the lease, backoff, not authorized, nothing to renew with)."""

    outcome: str
    token: Token | None = None
    error: str = ""


class _RetryableFailure(Exception):
    """A refresh failed in a way that keeps the token; already recorded."""

    def __init__(self, error: DatasourceError, kind: FailureKind) -> None:
        self.error = error
        self.kind = kind
        super().__init__(str(error))


# --- the request path -----------------------------------------------------------------------


def get_access_token(datasource: Datasource, *, user=None, end_user: str = "") -> str:
    """A usable access token, refreshed first when the rules say so.

    ``user`` (a user or user id) selects whose token when the datasource has per-user tokens;
    ``end_user`` an end user's (who connected through a connect link; NotConnected if none).
    """
    token = get_valid_token(datasource, user=user, end_user=end_user)
    assert token.access_token
    return token.access_token


def get_valid_token(
    datasource: Datasource, *, token: Token | None = None, user=None, end_user: str = ""
) -> Token:
    """The token row to call the API with, refreshing (single-flight) if needed.

    ``token`` may be passed when the caller just read it (the proxy does, with its datasource).
    Raises NotAuthorized (NotConnected for an end user without a connection),
    ReauthorizationRequired or TransientUpstreamError.
    """
    token = token or _owned(datasource, user, end_user)
    result = _obtain(datasource, token, Situation.REQUEST)
    assert result is not None
    return result


def usable_as_is(datasource: Datasource, token: Token) -> bool:
    """Whether :func:`get_valid_token` would return ``token`` as it is, without any I/O (the
    request path's decision is USE). The fast lane asks this on its event loop, for every call;
    any other decision is :func:`get_valid_token`'s to carry out. :func:`use_until` is asked
    once per token row and settings (remembered on the row, with that moment as a Unix time
    less a millisecond, so the per-call comparison is with ``time.time()`` and errs towards
    asking), :func:`decide` past that moment."""
    facts = (
        _settings_generation,
        datasource.machine_grant,
        token.status,
        bool(token.access_token),
        bool(token.refresh_token),
        token.expires_at,
        token.expiry_known,
        token.last_refreshed_at,
    )
    remembered = token.__dict__.get("_use_until")
    if remembered is None or remembered[0] != facts:
        until = use_until(TokenState.of(token, timezone.now()), Policy.of(datasource))
        before = None if until is None else until.timestamp() - 0.001
        token.__dict__["_use_until"] = remembered = (facts, before)
    if remembered[1] is not None and time.time() < remembered[1]:
        return True
    now = timezone.now()
    decision = decide(TokenState.of(token, now), Policy.of(datasource), Situation.REQUEST, now)
    return decision.action is Action.USE


#: Bumped when settings change (the policy is read from them).
_settings_generation = 0


@receiver(setting_changed)
def _settings_changed(**kwargs) -> None:
    global _settings_generation
    _settings_generation += 1


def _owned(datasource: Datasource, user, end_user: str) -> Token:
    if end_user:
        return end_user_token(datasource, end_user)
    return load_token(datasource, token_owner(datasource, user))


def refresh_after_rejection(
    datasource: Datasource, rejected_access_token: str, *, user=None, end_user: str = ""
) -> Token | None:
    """The upstream API answered an "expired" status to ``rejected_access_token``.

    Returns the token to retry with (refreshed now, or replaced by someone else meanwhile), or
    None when the answer should be passed on: a rejection already caused a refresh of this token
    within REJECTION_COOLDOWN (an upstream that always answers 401 must not cause a refresh per
    call). Raises TransientUpstreamError (with ``retry_after``) when refreshing fails now or
    failed moments ago: during a token-endpoint outage the caller is told to come back (503
    token_unavailable), not handed a 401 that reads as "re-authorize"; ReauthorizationRequired
    when the grant is dead.
    """
    token = _owned(datasource, user, end_user)
    return _obtain(datasource, token, Situation.REJECTED, rejected=rejected_access_token)


def _obtain(
    datasource: Datasource, token: Token, situation: Situation, *, rejected: str | None = None
) -> Token | None:
    policy = Policy.of(datasource)
    seen_refreshes = token.refresh_count
    waited = False
    deadline: float | None = None
    rounds = 0
    waiting, wait_started = None, 0.0  # tracing: the lease-wait span, while waiting
    while True:
        now = timezone.now()
        decision = decide(
            TokenState.of(token, now),
            policy,
            situation,
            now,
            rejected_is_current=rejected is None or _same_secret(token.access_token, rejected),
            refreshed_meanwhile=waited and token.refresh_count != seen_refreshes,
        )
        if waiting is not None and decision.action is not Action.WAIT:
            _end_wait(waiting, decision.action.value, wait_started)
            waiting = None
        if decision.action is Action.USE:
            return token
        if decision.action is Action.PASS:
            return None
        if decision.action is Action.WAIT:
            if waiting is None:
                waiting, wait_started = tracing.start(tracing.LEASE_WAIT), time.monotonic()
            deadline = deadline or time.monotonic() + app_settings.LEASE_WAIT
            if time.monotonic() >= deadline:
                _end_wait(waiting, "timeout", wait_started)
                raise TransientUpstreamError(
                    f"Timed out waiting for another refresh of datasource {datasource.slug!r}.",
                    retry_after=policy.probe_interval,
                )
            time.sleep(_POLL_INTERVAL)
            token, waited = reload(token, datasource), True
            continue
        if decision.action is not Action.REFRESH:
            _raise_for(datasource, token, decision)
        rounds += 1
        if rounds > _MAX_ROUNDS:
            raise TransientUpstreamError(f"Could not settle the token of {datasource.slug!r}.")
        try:
            lease_id = lease.acquire(token.pk)
        except DatabaseError as err:
            if situation is Situation.REQUEST and _serve_while_away(datasource, token, err):
                return token
            raise
        if lease_id is None:  # someone else is refreshing: use or wait, as the rules say
            token = reload(token, datasource)
            continue
        try:
            token, refreshed = _refresh_leased(
                datasource, token, lease_id, situation, policy, rejected
            )
        except _RetryableFailure:
            token = reload(token, datasource)  # decide again: use the old token, or 503
            continue
        if refreshed:
            return token


def _serve_while_away(datasource: Datasource, token: Token, err: DatabaseError) -> bool:
    """The database is away (a restart, a failover) when a call's token is due for renewal:
    no refresh could be stored, but a token not yet expired still serves the call
    (stale-if-error). An expired one does not: the caller gets 503 database_unavailable."""
    if not is_database_outage(err) or not usable_until_expiry(
        TokenState.of(token, timezone.now()), timezone.now()
    ):
        return False
    now = time.monotonic()
    if now - _put_off_said.get(datasource.slug, -60.0) >= 10:  # not a line per call
        _put_off_said[datasource.slug] = now
        logger.warning(
            "refresh of datasource %s put off: the database is unavailable (%s); the current "
            "token serves until it expires",
            datasource.slug,
            type(err).__name__,
        )
    return True


#: When each datasource's put-off refresh was last logged (monotonic seconds).
_put_off_said: dict[str, float] = {}


def _end_wait(span: tracing.Span | tracing.NoopSpan, outcome: str, started: float) -> None:
    """``outcome``: what the rules said once the wait was over (``use``: the holder's token;
    ``refresh``: it failed, refresh ourselves; ``unavailable`` …) or ``timeout``."""
    span.set("datasources.outcome", outcome)
    span.set("datasources.waited_ms", round((time.monotonic() - started) * 1000, 1))
    if outcome == "timeout":
        span.fail("timeout")
    span.end()


def _raise_for(datasource: Datasource, token: Token, decision: Decision) -> None:
    slug = datasource.slug
    if decision.action is Action.NOT_AUTHORIZED:
        raise NotAuthorized(f"Datasource {slug!r} has not been authorized yet.")
    if decision.action is Action.REAUTHORIZE:
        if decision.reason == "needs_reauthorization":
            raise ReauthorizationRequired(
                "reauthorization_required",
                f"Datasource {slug!r} needs to be re-authorized in the admin.",
            )
        err = ReauthorizationRequired("no_refresh_token", _no_refresh_token_message(slug, decision))
        record_permanent(datasource, token, str(err))
        raise err
    if decision.action is Action.UNAVAILABLE:
        raise TransientUpstreamError(
            f"Refreshing datasource {slug!r} failed recently ({token.last_error}); "
            f"trying again in {max(1, round(decision.retry_after or 0))}s.",
            retry_after=decision.retry_after,
        )
    raise TransientUpstreamError(f"No usable token for datasource {slug!r} ({decision.reason}).")


def _no_refresh_token_message(slug: str, decision: Decision) -> str:
    what = (
        "The API rejected the token"
        if decision.reason == "rejected_without_refresh_token"
        else "The token expired"
    )
    return (
        f"{what} of datasource {slug!r} and the server gave no refresh token to renew it; "
        "re-authorize in the admin."
    )


# --- background, cron and admin ---------------------------------------------------------------


def refresh_token(token_or_datasource: Token | Datasource, *, force: bool = False) -> RefreshResult:
    """One background (or, with ``force``, a person's) refresh attempt; never raises for
    upstream failures, never waits. Used by ``manage.py refresh_tokens`` and the admin."""
    if isinstance(token_or_datasource, Token):
        token, datasource = token_or_datasource, token_or_datasource.datasource
    else:
        datasource = token_or_datasource
        token = load_token(datasource, None)
    situation = Situation.FORCED if force else Situation.BACKGROUND
    return _attempt(datasource, token, situation, lease_id=None)


def refresh_token_by_id(token_id: int) -> RefreshResult:
    """The background task's refresh: lease the row first, then read it once.

    The sweep already chose the token, so taking the lease before reading saves a read (4
    statements per refresh). A token leased elsewhere, or deleted since the sweep, is skipped.
    """
    lease_id = lease.acquire(token_id)
    if lease_id is None:
        return RefreshResult("skipped")
    try:
        token = Token.objects.select_related("datasource").get(pk=token_id)
    except Token.DoesNotExist:
        return RefreshResult("skipped")
    return _attempt(token.datasource, token, Situation.BACKGROUND, lease_id=lease_id)


def _attempt(
    datasource: Datasource, token: Token, situation: Situation, *, lease_id: str | None
) -> RefreshResult:
    """``lease_id``: a lease already held on ``token`` (which was read after winning it)."""
    policy = Policy.of(datasource)
    now = timezone.now()
    decision = decide(TokenState.of(token, now, own_lease=lease_id), policy, situation, now)
    if decision.action is not Action.REFRESH:
        # The token was picked by a due time that was stale (or a sweep's claim): store the
        # real one, releasing the lease in the same UPDATE.
        if lease_id:
            store_due(datasource, token, lease_id=lease_id)
        elif decision.reason != "leased":
            store_due(datasource, token)
        return _settled(datasource, token, decision)
    if lease_id is None:
        lease_id = lease.acquire(token.pk)
        if lease_id is None:
            return RefreshResult("skipped", token, "Another refresh of this token is running.")
        # Read again under the lease: the previous holder may have just finished.
        return _attempt(datasource, reload(token, datasource), situation, lease_id=lease_id)
    try:
        token, refreshed = _refresh_leased(
            datasource, token, lease_id, situation, policy, None, reread=False
        )
    except _RetryableFailure as failure:
        return RefreshResult(
            failure.kind.value,
            load_token(datasource, token.user_id, token.end_user),
            str(failure.error),
        )
    except ReauthorizationRequired as err:
        return RefreshResult(
            "reauthorization", load_token(datasource, token.user_id, token.end_user), str(err)
        )
    if refreshed:
        return RefreshResult("refreshed", token)
    return RefreshResult("fresh", token)


def _settled(datasource: Datasource, token: Token, decision: Decision) -> RefreshResult:
    """The result for an attempt that decided not to refresh."""
    if decision.action is Action.REAUTHORIZE:
        try:
            _raise_for(datasource, token, decision)
        except ReauthorizationRequired as err:
            return RefreshResult("reauthorization", token, str(err))
    if decision.reason == "fresh":
        return RefreshResult("fresh", token)
    reasons = {
        "leased": "Another refresh of this token is running.",
        "backoff": "Waiting for the next attempt after a failure.",
        "not_authorized": "Not authorized yet.",
        "no_refresh_token": "The server gave no refresh token; re-authorize to renew the token.",
    }
    return RefreshResult("skipped", token, reasons.get(decision.reason, decision.reason))


# --- one refresh under the lease -----------------------------------------------------------------


def _refresh_leased(
    datasource: Datasource,
    token: Token,
    lease_id: str,
    situation: Situation,
    policy: Policy,
    rejected: str | None,
    *,
    reread: bool = True,
) -> tuple[Token, bool]:
    """Refresh while holding ``lease_id``: (token, True) when refreshed; (current token, False)
    when, read again under the lease, there turned out to be nothing to do. Retryable failures
    raise _RetryableFailure and dead grants ReauthorizationRequired, both already recorded."""
    stored = False
    try:
        if reread:
            token = reload(token, datasource)
            now = timezone.now()
            decision = decide(
                TokenState.of(token, now, own_lease=lease_id),
                policy,
                situation,
                now,
                rejected_is_current=rejected is None or _same_secret(token.access_token, rejected),
            )
            if decision.action is not Action.REFRESH:
                return token, False
        with (
            tracing.refresh(
                datasource.grant_type, datasource.access_token_url, situation.value
            ) as span,
            lease.kept(token.pk, lease_id),  # a dead holder's lease lapses in LEASE_SECONDS
        ):
            try:
                response = _call_retrying_a_lost_answer(datasource, token)
            except DatasourceError as err:
                kind = classify(err)
                # tracing: the OAuth error code only (a description can echo what was sent)
                span.fail(
                    tracing.error_code(err.error)
                    if isinstance(err, OAuthError)
                    else type(err).__name__
                )
                span.set("datasources.outcome", kind.value)
                if kind is not FailureKind.PERMANENT:
                    record_retryable(datasource, token, err, kind)
                    raise _RetryableFailure(err, kind) from None
                current = reload(token, datasource)
                if _rotated_elsewhere(token, current):
                    current.lease_id, current.lease_expires_at = "", None  # released below
                    span.set("datasources.outcome", "rotated_elsewhere")
                    return current, False
                raise _dead_grant(datasource, token, err) from None
            span.set("datasources.outcome", "refreshed")
            stored = True  # the UPDATE that stores the token releases the lease
            rejection = situation is Situation.REJECTED
            return _store_when_the_database_answers(
                datasource,
                lambda: store_refresh(
                    datasource, token, response, lease_id, after_rejection=rejection
                ),
            ), True
    finally:
        if not stored:
            lease.release(token.pk, lease_id)
            token.lease_id, token.lease_expires_at = "", None


@sensitive_variables()
def _call_retrying_a_lost_answer(datasource: Datasource, token: Token) -> oauth.TokenResponse:
    """The token endpoint's answer; a request whose answer was lost (sent, then a read timeout
    or a dropped connection: the server may have rotated the refresh token in it) is sent once
    more at once, with the same refresh token, still under the lease.

    Why at once: providers with a reuse grace period (Okta: 0 to 60 s, 30 s by default; Auth0's
    rotation overlap) answer the same refresh token again only within that window; later, their
    reuse detection revokes the whole grant. A provider with strict reuse detection refuses it
    either way (``invalid_grant``), and ``token.outcome_unknown_at`` (when the lost request was
    sent) lets the dead grant's event say why and when.
    """
    try:
        return _call_token_endpoint(datasource, token)
    except TransientUpstreamError as err:
        if not err.outcome_unknown:
            raise
    sent_at = token.refresh_started_at or timezone.now()
    token.outcome_unknown_at = token.outcome_unknown_at or sent_at
    logger.warning(
        "refresh answer for datasource %s was lost; sending it again at once with the same "
        "refresh token",
        datasource.slug,
    )
    try:
        return _call_token_endpoint(datasource, token)
    except TransientUpstreamError as err:
        err.outcome_unknown = True  # the first answer was lost, whatever became of this one
        raise


def _store_when_the_database_answers(datasource: Datasource, store: Callable[[], Token]) -> Token:
    """``store()``, tried again while the database is away (a restart, a failover) for up to
    STORE_RETRY_SECONDS, under the lease (which nobody can take over meanwhile: taking it needs
    the database too). The answer in hand may carry the only valid refresh token (rotation), so
    it is kept until it can be written rather than lost and the refresh repeated. Inside a
    caller's transaction a broken connection cannot be replaced: the error is raised."""
    deadline = time.monotonic() + STORE_RETRY_SECONDS
    delay = 0.05
    while True:
        try:
            return store()
        except DatabaseError as err:
            connection = connections[router.db_for_write(Token)]
            if (
                not is_database_outage(err)
                or connection.in_atomic_block
                or time.monotonic() >= deadline
            ):
                if is_database_outage(err):
                    logger.error(
                        "refresh of datasource %s succeeded but could not be stored: the "
                        "database stayed unavailable (%s)",
                        datasource.slug,
                        type(err).__name__,
                    )
                raise
            logger.warning(
                "refresh of datasource %s: the database is unavailable (%s); keeping the answer "
                "and storing it again in %.2fs",
                datasource.slug,
                type(err).__name__,
                delay,
            )
            connection.close()  # the next attempt connects afresh
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


@sensitive_variables()
def _call_token_endpoint(datasource: Datasource, token: Token) -> oauth.TokenResponse:
    if datasource.grant_type == GrantType.CLIENT_CREDENTIALS:
        return oauth.client_credentials(datasource)
    if datasource.grant_type == GrantType.JWT_BEARER:
        return oauth.jwt_bearer(datasource)  # a new assertion each time: no refresh token
    if not token.refresh_token:  # decide() never asks for this; a guard, not a path
        raise NotAuthorized(f"Datasource {datasource.slug!r} has no refresh token.")
    return oauth.refresh(datasource, token.refresh_token)


@sensitive_variables()
def _rotated_elsewhere(sent: Token, current: Token) -> bool:
    """Another holder stored a new token while ours was being rejected (a lapsed lease, or a
    re-authorization): its result stands, the grant is not dead."""
    if current.refresh_token and not _same_secret(current.refresh_token, sent.refresh_token):
        return True
    return bool(
        current.last_refreshed_at
        and sent.last_refreshed_at
        and current.last_refreshed_at > sent.last_refreshed_at
        and current.access_token
    )


def _dead_grant(
    datasource: Datasource, token: Token, err: DatasourceError
) -> ReauthorizationRequired:
    code = err.error if isinstance(err, OAuthError) else "invalid_grant"
    description = err.description if isinstance(err, OAuthError) else str(err)
    dead = ReauthorizationRequired(code, description)
    message = str(dead)
    if token.outcome_unknown_at and code == "invalid_grant":
        when = timezone.localtime(token.outcome_unknown_at)
        note = (
            f"A refresh sent at {when:%Y-%m-%d %H:%M:%S %Z} got no answer (a timeout, a dropped "
            "connection or a stopped worker). It was sent again with the same refresh token and "
            "refused: the provider rotated the refresh token in that lost answer and does not "
            "accept the old one again (no reuse grace period), so the grant is gone; "
            "re-authorize to continue."
        )
        record_event(datasource, TokenEvent.Kind.LOST_RESPONSE, note)
        message = f"{message} — {note}"
    record_permanent(datasource, token, message)
    return dead


def _same_secret(a: str | None, b: str | None) -> bool:
    return bool(a) and bool(b) and hmac.compare_digest(a.encode(), b.encode())
