"""What to do with a token now: one pure function every caller asks.

The proxy, the Python client, the background task, the cron command and the admin all ask
:func:`decide` with a snapshot of the token (:class:`TokenState`), the datasource's policy
(:class:`Policy`), their situation and the time. It answers with an :class:`Action`; the callers
only carry it out (take the lease, call the token endpoint, wait, raise). Keeping every rule in
one place is what keeps them consistent: the same token must not look "fresh" to the proxy and
"due" to the worker in ways that make them fight, and each rule has one row in the table test.

Rules (DESIGN.md, "Token lifecycle rules"):

* Freshness is relative to the token's lifetime: the request leeway and the background margin
  are capped at ``lifetime_fraction`` of the lifetime, so a token is refreshed about once per
  lifetime whatever its length and the number of callers.
* A caller whose token is still valid never waits for another holder of the lease.
* An expiry that was only assumed (no ``expires_in``, no JWT ``exp``) schedules refreshes but
  never makes a token unusable; without a refresh token such a token lives until the upstream
  rejects it.
* After a failed refresh the request path makes at most one probe per ``probe_interval`` (never
  before the server's Retry-After) while the token is expired, and otherwise uses the token it
  has; the background follows the backoff.
* An upstream rejection refreshes only the current token, and not when a refresh that a rejection
  caused happened within the rejection cooldown (a refresh for expiry, by the sweep or a person
  does not count): a provider that revokes a fresh token gets one refresh and one retry, an API
  that always answers 401 at most one refresh per cooldown.
* A rejected token whose refresh failed (transiently, or for the configuration) moments ago is
  UNAVAILABLE, like an expired one: the caller gets "try again in N s" (503 with Retry-After),
  never the upstream's 401, which would read as "re-authorize" during a token-endpoint outage.
"""

from __future__ import annotations

import copy
import enum
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..models import Datasource, Token

#: :func:`use_until` for a token that never needs renewing.
FOREVER = datetime.max.replace(tzinfo=UTC)
#: How far (as a fraction of the window) background refreshes are spread, per token.
MARGIN_JITTER = 0.2
#: How far idle-token refreshes (MAX_TOKEN_AGE) are spread, per token.
AGE_JITTER = 0.1


class Situation(enum.StrEnum):
    REQUEST = "request"  # an API call needs a usable token now (proxy, Python client)
    BACKGROUND = "background"  # sweep or cron: refresh ahead of time, never wait
    FORCED = "forced"  # a person asked for a refresh (admin "Refresh now")
    REJECTED = "rejected"  # the upstream answered an "expired" status to a token


class Action(enum.StrEnum):
    USE = "use"  # the current token serves the call
    REFRESH = "refresh"  # take the lease and refresh
    WAIT = "wait"  # another holder is refreshing an unusable token: wait for its result
    SKIP = "skip"  # background or forced: nothing to do now
    PASS = "pass"  # rejected: hand the upstream's answer back, do not refresh
    NOT_AUTHORIZED = "not_authorized"  # never authorized (or disconnected)
    REAUTHORIZE = "reauthorize"  # only a person can fix it
    UNAVAILABLE = "unavailable"  # no usable token right now; try again after retry_after


@dataclass(frozen=True)
class Decision:
    action: Action
    #: Why, as a short code (``fresh``, ``expiring``, ``backoff``, ``probe`` …); shown in
    #: results and tested by the table.
    reason: str
    #: Seconds until asking again makes sense (UNAVAILABLE only).
    retry_after: float | None = None


@dataclass(frozen=True)
class Policy:
    """The knobs that apply to one datasource (settings plus its grant type)."""

    #: A grant with no person in the loop (client credentials, JWT bearer): a new token can
    #: always be fetched, so a missing one is fetched rather than waiting for a person.
    client_credentials: bool = False
    request_leeway: float = 30
    refresh_margin: float = 300
    lifetime_fraction: float = 0.5
    max_token_age: float = 86400
    probe_interval: float = 5
    rejection_cooldown: float = 30

    @classmethod
    def of(cls, datasource: Datasource) -> Policy:
        from ..conf import app_settings as s

        return cls(
            client_credentials=datasource.machine_grant,
            request_leeway=s.REQUEST_LEEWAY,
            refresh_margin=s.REFRESH_MARGIN,
            lifetime_fraction=s.LIFETIME_FRACTION,
            max_token_age=s.MAX_TOKEN_AGE,
            probe_interval=s.PROBE_INTERVAL,
            rejection_cooldown=s.REJECTION_COOLDOWN,
        )


@dataclass(frozen=True)
class TokenState:
    """The facts about one token row that decisions depend on (no secrets)."""

    status: str = "active"
    has_access_token: bool = True
    has_refresh_token: bool = True
    expires_at: datetime | None = None
    expiry_known: bool = True
    issued_at: datetime | None = None  # last_refreshed_at: when the current token was obtained
    failure_kind: str = ""  # "", "transient" or "configuration"
    next_attempt_at: datetime | None = None  # background backoff
    retry_not_before: datetime | None = None  # the server's Retry-After
    last_attempt_at: datetime | None = None
    #: When a refresh caused by an upstream rejection last happened (REJECTION_COOLDOWN).
    rejection_refreshed_at: datetime | None = None
    leased_elsewhere: bool = False  # another holder has a live lease
    spread: float = 0.0  # in [0, 1): this token's place in the jitter spread

    @classmethod
    def of(cls, token: Token, now: datetime, own_lease: str | None = None) -> TokenState:
        leased = bool(
            token.lease_expires_at
            and token.lease_expires_at > now
            and (own_lease is None or token.lease_id != own_lease)
        )
        return cls(
            status=token.status,
            has_access_token=bool(token.access_token),
            has_refresh_token=bool(token.refresh_token),
            expires_at=token.expires_at,
            expiry_known=token.expiry_known,
            issued_at=token.last_refreshed_at,
            failure_kind=token.failure_kind,
            next_attempt_at=token.next_attempt_at,
            retry_not_before=token.retry_not_before,
            last_attempt_at=token.last_attempt_at,
            rejection_refreshed_at=token.rejection_refreshed_at,
            leased_elsewhere=leased,
            spread=spread_of(token.pk),
        )


def spread_of(token_id: int | None) -> float:
    """A stable pseudo-random place in [0, 1) per token (Fibonacci hashing of the id), so that
    tokens issued in the same second are refreshed at different times, and the same token is
    judged the same way by every process."""
    if not token_id:
        return 0.0
    return ((token_id * 2654435761) % 4294967296) / 4294967296


def window(configured: float, state: TokenState, fraction: float) -> float:
    """The configured leeway or margin, capped at ``fraction`` of the token's lifetime."""
    if state.expires_at is None or state.issued_at is None:
        return configured
    lifetime = (state.expires_at - state.issued_at).total_seconds()
    if lifetime <= 0:
        return configured
    return min(configured, lifetime * fraction)


def _request(
    state: TokenState, policy: Policy, now: datetime, usable: bool, refreshed_meanwhile: bool
) -> Decision:
    """The request path (REQUEST), for a renewable token: use it while fresh, never wait for a
    lease while it is usable, back off after failures, probe an expired one sparingly."""
    if refreshed_meanwhile and usable:
        return Decision(Action.USE, "refreshed_by_other")
    due = _expires_within(
        state, window(policy.request_leeway, state, policy.lifetime_fraction), now
    )
    if usable and not due:
        return Decision(Action.USE, "fresh")
    if state.leased_elsewhere:
        return (
            Decision(Action.USE, "refresh_in_progress") if usable else Decision(Action.WAIT, "wait")
        )
    if state.failure_kind:
        if usable:
            if _in_backoff(state, now):
                return Decision(Action.USE, "backoff")
            return Decision(Action.REFRESH, "retry")
        wait = _probe_wait(state, policy, now)
        if wait > 0:
            return Decision(Action.UNAVAILABLE, "probe_later", retry_after=wait)
        return Decision(Action.REFRESH, "probe")
    return Decision(Action.REFRESH, "expiring" if usable else "expired")


def usable_until_expiry(state: TokenState, now: datetime) -> bool:
    """Whether the token may still be sent at all: an access token not known to have expired
    (fresh or due for renewal alike). What :func:`decide` calls ``usable``; also what a call
    is served with while the database is away and no refresh can be stored (stale-if-error:
    never past the token's own expiry)."""
    known_expired = bool(
        state.expiry_known and state.expires_at is not None and state.expires_at <= now
    )
    return state.has_access_token and not known_expired


def decide(
    state: TokenState,
    policy: Policy,
    situation: Situation,
    now: datetime,
    *,
    rejected_is_current: bool = True,
    refreshed_meanwhile: bool = False,
) -> Decision:
    """The action for ``situation``.

    ``rejected_is_current`` (REJECTED): the token the upstream rejected is still the stored one.
    ``refreshed_meanwhile`` (REQUEST): this caller waited while another holder refreshed.
    """
    if state.status == "needs_reauthorization":
        return Decision(Action.REAUTHORIZE, "needs_reauthorization")
    renewable = policy.client_credentials or state.has_refresh_token
    if not state.has_access_token and not policy.client_credentials:
        if situation in (Situation.BACKGROUND, Situation.FORCED):
            return Decision(Action.SKIP, "not_authorized")
        return Decision(Action.NOT_AUTHORIZED, "not_authorized")

    usable = usable_until_expiry(state, now)
    known_expired = state.has_access_token and not usable

    if not renewable:
        return _unrenewable(state, policy, situation, now, known_expired, rejected_is_current)
    if situation is Situation.REJECTED:
        return _rejected(state, policy, now, rejected_is_current)
    if situation is Situation.FORCED:
        if state.leased_elsewhere:
            return Decision(Action.SKIP, "leased")
        return Decision(Action.REFRESH, "forced")
    if situation is Situation.BACKGROUND:
        return _background(state, policy, now)

    return _request(state, policy, now, usable, refreshed_meanwhile)


def use_until(state: TokenState, policy: Policy) -> datetime | None:
    """A moment before which :func:`decide` answers USE in the REQUEST situation at any time
    (``datetime.max``: whenever), or None when no such moment follows from the token alone (a
    failing, expired or unauthorized token: ask :func:`decide`). Lets a hot path ask
    :func:`decide` once per token rather than once per call; the table test checks it against
    :func:`decide`."""
    if state.status == "needs_reauthorization" or not state.has_access_token:
        return None
    if not (policy.client_credentials or state.has_refresh_token):
        # _unrenewable: used until a known expiry passes.
        if state.expiry_known and state.expires_at is not None:
            return state.expires_at
        return FOREVER
    # "fresh": usable (not known expired) and not within the request leeway of its expiry.
    if state.expires_at is None:
        return FOREVER
    leeway = window(policy.request_leeway, state, policy.lifetime_fraction)
    return min(state.expires_at, state.expires_at - timedelta(seconds=leeway))


def _unrenewable(
    state: TokenState,
    policy: Policy,
    situation: Situation,
    now: datetime,
    known_expired: bool,
    rejected_is_current: bool,
) -> Decision:
    """An authorization-code token without a refresh token: use it while it lasts."""
    if situation is Situation.REJECTED:
        if not rejected_is_current:
            return Decision(Action.USE, "replaced")
        if _younger_than(state, policy.rejection_cooldown, now):
            return Decision(Action.PASS, "cooldown")
        return Decision(Action.REAUTHORIZE, "rejected_without_refresh_token")
    if known_expired:
        return Decision(Action.REAUTHORIZE, "expired_without_refresh_token")
    if situation in (Situation.BACKGROUND, Situation.FORCED):
        return Decision(Action.SKIP, "no_refresh_token")
    return Decision(Action.USE, "no_refresh_token")


def _rejected(state: TokenState, policy: Policy, now: datetime, is_current: bool) -> Decision:
    if not is_current:
        return Decision(Action.USE, "replaced")
    if state.leased_elsewhere:
        # A refresh in flight explains the rejection (many providers revoke the old access
        # token the moment they issue the new one): wait for it and retry with its result.
        return Decision(Action.WAIT, "wait")
    if _within(state.rejection_refreshed_at, policy.rejection_cooldown, now):
        # Only a refresh that a rejection caused counts: a token refreshed for expiry (or by
        # the sweep, or a person) and rejected at once is refreshed again (the provider
        # revoked it: Salesforce's session policy, a password change).
        return Decision(Action.PASS, "cooldown")
    if state.failure_kind:
        wait = _probe_wait(state, policy, now)
        if wait > 0:
            # The API refused the token and renewing it failed moments ago (the token endpoint
            # is down): the caller is told to come back, as for an expired token, rather than
            # handed a 401 that reads "your credentials are wrong".
            return Decision(Action.UNAVAILABLE, "probe_later", retry_after=wait)
    return Decision(Action.REFRESH, "rejected")


def _background(state: TokenState, policy: Policy, now: datetime) -> Decision:
    if state.leased_elsewhere:
        return Decision(Action.SKIP, "leased")
    if _in_backoff(state, now):
        return Decision(Action.SKIP, "backoff")
    if not state.has_access_token:  # client credentials never fetched, or disconnected
        return Decision(Action.REFRESH, "no_token")
    margin = window(policy.refresh_margin, state, policy.lifetime_fraction)
    margin *= 1 - MARGIN_JITTER * state.spread
    if _expires_within(state, margin, now):
        return Decision(Action.REFRESH, "expiring")
    max_age = policy.max_token_age * (1 - AGE_JITTER * state.spread)
    if state.issued_at is not None and (now - state.issued_at).total_seconds() >= max_age:
        return Decision(Action.REFRESH, "too_old")
    return Decision(Action.SKIP, "fresh")


def refresh_due_at(state: TokenState, policy: Policy, now: datetime) -> datetime | None:
    """When the background should next look at this token: the first moment :func:`decide`
    would answer REFRESH (or REAUTHORIZE, for an expiring token that cannot be renewed) in the
    BACKGROUND situation; None when only a person or a new authorization can change anything.

    Stored in ``Token.refresh_due_at`` by every write that changes the inputs, so the sweep is an
    index range scan over due tokens. ``decide`` still has the last word when the task runs.
    """
    if state.status == "needs_reauthorization":
        return None
    if not state.has_access_token:
        # Client credentials never fetched (or disconnected): fetch now, after any backoff.
        return _after_backoff(now, state) if policy.client_credentials else None
    if not (policy.client_credentials or state.has_refresh_token):
        # Nothing to renew with: look again when a known expiry passes (then a person is needed).
        return state.expires_at if state.expiry_known else None
    candidates = []
    if state.expires_at is not None:
        margin = window(policy.refresh_margin, state, policy.lifetime_fraction)
        margin *= 1 - MARGIN_JITTER * state.spread
        candidates.append(state.expires_at - timedelta(seconds=margin))
    if state.issued_at is not None:
        max_age = policy.max_token_age * (1 - AGE_JITTER * state.spread)
        candidates.append(state.issued_at + timedelta(seconds=max_age))
    if not candidates:
        return None
    return _after_backoff(min(candidates), state)


def due_for(
    datasource: Datasource, token: Token, now: datetime, changes: dict | None = None
) -> datetime | None:
    """:func:`refresh_due_at` for a token row, with ``changes`` (field values about to be stored
    in the same UPDATE) applied to a copy of it."""
    if changes:
        token = copy.copy(token)
        for name, value in changes.items():
            setattr(token, name, value)
    return refresh_due_at(TokenState.of(token, now), Policy.of(datasource), now)


def _after_backoff(when: datetime, state: TokenState) -> datetime:
    later = [t for t in (state.next_attempt_at, state.retry_not_before) if t is not None]
    return max([when, *later])


def _expires_within(state: TokenState, seconds: float, now: datetime) -> bool:
    if not state.has_access_token:
        return True
    return state.expires_at is not None and state.expires_at - timedelta(seconds=seconds) <= now


def _younger_than(state: TokenState, seconds: float, now: datetime) -> bool:
    return state.issued_at is not None and (now - state.issued_at).total_seconds() < seconds


def _within(moment: datetime | None, seconds: float, now: datetime) -> bool:
    return moment is not None and (now - moment).total_seconds() < seconds


def _in_backoff(state: TokenState, now: datetime) -> bool:
    return any(t is not None and t > now for t in (state.next_attempt_at, state.retry_not_before))


def _probe_wait(state: TokenState, policy: Policy, now: datetime) -> float:
    """Seconds before the request path may probe the token endpoint again (0: now)."""
    wait = 0.0
    if state.last_attempt_at is not None:
        since = (now - state.last_attempt_at).total_seconds()
        wait = max(wait, policy.probe_interval - since)
    if state.retry_not_before is not None:
        wait = max(wait, (state.retry_not_before - now).total_seconds())
    return wait
