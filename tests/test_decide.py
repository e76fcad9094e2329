"""The token lifecycle rules as tables: one row per rule of DESIGN.md "Token lifecycle rules".

Pure functions, no database: ``decide`` (what to do with a token now), ``classify_answer``
(what a token-endpoint error means) and the expiry parsing.
"""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import jwt
import pytest

from datasources.tokens.decide import (
    FOREVER,
    Action,
    Policy,
    Situation,
    TokenState,
    decide,
    refresh_due_at,
    spread_of,
    use_until,
    window,
)
from datasources.tokens.expiry import MAX_LIFETIME, expiry_of, jwt_expires_in, parse_expires_in
from datasources.tokens.failures import FailureKind, classify_answer

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return NOW + timedelta(seconds=seconds)


POLICY = Policy(
    request_leeway=30,
    refresh_margin=300,
    lifetime_fraction=0.5,
    max_token_age=86400,
    probe_interval=5,
    rejection_cooldown=30,
)
CC = replace(POLICY, client_credentials=True)

#: An hour-long token issued 10 minutes ago.
HOURLY = TokenState(expires_at=at(3000), issued_at=at(-600))
#: A 20-second token (shorter than the request leeway).
SHORT = TokenState(expires_at=at(20), issued_at=at(0))
EXPIRED = replace(HOURLY, expires_at=at(-1), issued_at=at(-3601))
FAILED = {"failure_kind": "transient", "next_attempt_at": at(60), "last_attempt_at": at(-1)}

R, B, F, J = Situation.REQUEST, Situation.BACKGROUND, Situation.FORCED, Situation.REJECTED

# (id, state, policy, situation, keyword inputs, expected action, expected reason)
ROWS = [
    # -- freshness relative to the lifetime
    ("valid beyond the leeway: use", HOURLY, POLICY, R, {}, Action.USE, "fresh"),
    (
        "within the leeway: refresh",
        replace(HOURLY, expires_at=at(20)),
        POLICY,
        R,
        {},
        Action.REFRESH,
        "expiring",
    ),
    ("just-refreshed 20 s token is fresh", SHORT, POLICY, R, {}, Action.USE, "fresh"),
    (
        "20 s token past half its life: refresh",
        replace(SHORT, issued_at=at(-11), expires_at=at(9)),
        POLICY,
        R,
        {},
        Action.REFRESH,
        "expiring",
    ),
    (
        "5 s token just issued is fresh",
        replace(SHORT, expires_at=at(5)),
        POLICY,
        R,
        {},
        Action.USE,
        "fresh",
    ),
    ("expired: refresh", EXPIRED, POLICY, R, {}, Action.REFRESH, "expired"),
    # -- the lease
    (
        "leased elsewhere, still valid: use at once",
        replace(HOURLY, expires_at=at(10), leased_elsewhere=True),
        POLICY,
        R,
        {},
        Action.USE,
        "refresh_in_progress",
    ),
    (
        "leased elsewhere, expired: wait",
        replace(EXPIRED, leased_elsewhere=True),
        POLICY,
        R,
        {},
        Action.WAIT,
        "wait",
    ),
    (
        "waited and the holder refreshed: use its result",
        replace(SHORT, expires_at=at(2), issued_at=at(-1)),
        POLICY,
        R,
        {"refreshed_meanwhile": True},
        Action.USE,
        "refreshed_by_other",
    ),
    # -- expiry unknown or absent
    (
        "assumed expiry passed: refresh",
        replace(EXPIRED, expiry_known=False),
        POLICY,
        R,
        {},
        Action.REFRESH,
        "expiring",
    ),
    (
        "assumed expiry passed, refresh failed: keep using the token",
        replace(EXPIRED, expiry_known=False, **FAILED),
        POLICY,
        R,
        {},
        Action.USE,
        "backoff",
    ),
    (
        "no refresh token, no expiry: use",
        TokenState(has_refresh_token=False, expires_at=None, expiry_known=False),
        POLICY,
        R,
        {},
        Action.USE,
        "no_refresh_token",
    ),
    (
        "no refresh token, valid: use",
        replace(HOURLY, has_refresh_token=False),
        POLICY,
        R,
        {},
        Action.USE,
        "no_refresh_token",
    ),
    (
        "no refresh token, expired: needs a person",
        replace(EXPIRED, has_refresh_token=False),
        POLICY,
        R,
        {},
        Action.REAUTHORIZE,
        "expired_without_refresh_token",
    ),
    (
        "no refresh token, background: nothing to do",
        replace(HOURLY, has_refresh_token=False, expires_at=at(10)),
        POLICY,
        B,
        {},
        Action.SKIP,
        "no_refresh_token",
    ),
    (
        "no refresh token, forced: nothing to renew with",
        replace(HOURLY, has_refresh_token=False),
        POLICY,
        F,
        {},
        Action.SKIP,
        "no_refresh_token",
    ),
    # -- states that need a person or an authorization
    (
        "needs re-authorization",
        replace(HOURLY, status="needs_reauthorization"),
        POLICY,
        R,
        {},
        Action.REAUTHORIZE,
        "needs_reauthorization",
    ),
    (
        "never authorized",
        TokenState(status="not_authorized", has_access_token=False, has_refresh_token=False),
        POLICY,
        R,
        {},
        Action.NOT_AUTHORIZED,
        "not_authorized",
    ),
    (
        "never authorized, background",
        TokenState(status="not_authorized", has_access_token=False, has_refresh_token=False),
        POLICY,
        B,
        {},
        Action.SKIP,
        "not_authorized",
    ),
    (
        "client credentials never fetched: fetch",
        TokenState(status="not_authorized", has_access_token=False, has_refresh_token=False),
        CC,
        R,
        {},
        Action.REFRESH,
        "expired",
    ),
    (
        "client credentials never fetched, background: fetch",
        TokenState(status="not_authorized", has_access_token=False, has_refresh_token=False),
        CC,
        B,
        {},
        Action.REFRESH,
        "no_token",
    ),
    (
        "client credentials without refresh token: renewable",
        replace(EXPIRED, has_refresh_token=False),
        CC,
        R,
        {},
        Action.REFRESH,
        "expired",
    ),
    # -- after failures: request path
    (
        "valid token in backoff: use it",
        replace(HOURLY, expires_at=at(10), **FAILED),
        POLICY,
        R,
        {},
        Action.USE,
        "backoff",
    ),
    (
        "valid token, backoff over: retry",
        replace(HOURLY, expires_at=at(10), failure_kind="transient", next_attempt_at=at(-1)),
        POLICY,
        R,
        {},
        Action.REFRESH,
        "retry",
    ),
    (
        "expired, last probe 1 s ago: 503 for 4 s",
        replace(EXPIRED, **FAILED),
        POLICY,
        R,
        {},
        Action.UNAVAILABLE,
        "probe_later",
    ),
    (
        "expired, last probe 6 s ago: probe (even with a long backoff)",
        replace(EXPIRED, **{**FAILED, "last_attempt_at": at(-6), "next_attempt_at": at(3600)}),
        POLICY,
        R,
        {},
        Action.REFRESH,
        "probe",
    ),
    (
        "expired, Retry-After not over: 503",
        replace(EXPIRED, **{**FAILED, "last_attempt_at": at(-60), "retry_not_before": at(30)}),
        POLICY,
        R,
        {},
        Action.UNAVAILABLE,
        "probe_later",
    ),
    (
        "configuration error, expired: probes like a transient one",
        replace(
            EXPIRED,
            **{**FAILED, "failure_kind": "configuration", "last_attempt_at": at(-10)},
        ),
        POLICY,
        R,
        {},
        Action.REFRESH,
        "probe",
    ),
    # -- background
    ("background, hourly token not yet due", HOURLY, POLICY, B, {}, Action.SKIP, "fresh"),
    (
        "background, within the margin",
        replace(HOURLY, expires_at=at(200)),
        POLICY,
        B,
        {},
        Action.REFRESH,
        "expiring",
    ),
    (
        "background, 20 s token just issued: not due",
        SHORT,
        POLICY,
        B,
        {},
        Action.SKIP,
        "fresh",
    ),
    (
        "background, in backoff",
        replace(EXPIRED, **FAILED),
        POLICY,
        B,
        {},
        Action.SKIP,
        "backoff",
    ),
    (
        "background, Retry-After not over",
        replace(EXPIRED, failure_kind="transient", retry_not_before=at(10)),
        POLICY,
        B,
        {},
        Action.SKIP,
        "backoff",
    ),
    (
        "background, backoff over",
        replace(EXPIRED, failure_kind="transient", next_attempt_at=at(-1)),
        POLICY,
        B,
        {},
        Action.REFRESH,
        "expiring",
    ),
    (
        "background, leased elsewhere",
        replace(EXPIRED, leased_elsewhere=True),
        POLICY,
        B,
        {},
        Action.SKIP,
        "leased",
    ),
    (
        "background, idle for a day: refresh",
        TokenState(expires_at=at(86400 * 30), issued_at=at(-86401)),
        POLICY,
        B,
        {},
        Action.REFRESH,
        "too_old",
    ),
    (
        "background, no expiry and not too old",
        TokenState(expires_at=None, issued_at=at(-60)),
        POLICY,
        B,
        {},
        Action.SKIP,
        "fresh",
    ),
    # -- forced (admin "Refresh now")
    ("forced, fresh token: refresh anyway", HOURLY, POLICY, F, {}, Action.REFRESH, "forced"),
    (
        "forced, in backoff: a person asked",
        replace(HOURLY, **FAILED),
        POLICY,
        F,
        {},
        Action.REFRESH,
        "forced",
    ),
    (
        "forced, leased elsewhere",
        replace(HOURLY, leased_elsewhere=True),
        POLICY,
        F,
        {},
        Action.SKIP,
        "leased",
    ),
    # -- the upstream rejected a token
    ("rejected, current and old: refresh", HOURLY, POLICY, J, {}, Action.REFRESH, "rejected"),
    (
        "rejected, a rejection refreshed it within the cooldown: pass the answer on",
        replace(HOURLY, issued_at=at(-10), rejection_refreshed_at=at(-10)),
        POLICY,
        J,
        {},
        Action.PASS,
        "cooldown",
    ),
    (
        "rejected, refreshed for expiry moments ago (the provider revoked it): refresh",
        replace(HOURLY, issued_at=at(-2)),
        POLICY,
        J,
        {},
        Action.REFRESH,
        "rejected",
    ),
    (
        "rejected, refreshed for expiry moments ago, an older rejection refresh: refresh",
        replace(HOURLY, issued_at=at(-2), rejection_refreshed_at=at(-31)),
        POLICY,
        J,
        {},
        Action.REFRESH,
        "rejected",
    ),
    (
        "rejected, a rejection refresh just past the cooldown: refresh",
        replace(HOURLY, issued_at=at(-30), rejection_refreshed_at=at(-30)),
        POLICY,
        J,
        {},
        Action.REFRESH,
        "rejected",
    ),
    (
        "rejected, a rejection refresh 29 s ago, token since refreshed for expiry: pass",
        replace(HOURLY, issued_at=at(-1), rejection_refreshed_at=at(-29)),
        POLICY,
        J,
        {},
        Action.PASS,
        "cooldown",
    ),
    (
        "rejected, expired and a rejection refresh within the cooldown: pass",
        replace(EXPIRED, rejection_refreshed_at=at(-5)),
        POLICY,
        J,
        {},
        Action.PASS,
        "cooldown",
    ),
    (
        "rejected, already replaced: retry with the new one",
        replace(HOURLY, issued_at=at(-1)),
        POLICY,
        J,
        {"rejected_is_current": False},
        Action.USE,
        "replaced",
    ),
    (
        "rejected, leased elsewhere: wait for the new token",
        replace(HOURLY, leased_elsewhere=True),
        POLICY,
        J,
        {},
        Action.WAIT,
        "wait",
    ),
    (
        "rejected while a refresh is in flight, however young: wait for it",
        replace(HOURLY, issued_at=at(-2), leased_elsewhere=True),
        POLICY,
        J,
        {},
        Action.WAIT,
        "wait",
    ),
    (
        "rejected, refresh failed moments ago: 503, never the 401",
        replace(HOURLY, **FAILED),
        POLICY,
        J,
        {},
        Action.UNAVAILABLE,
        "probe_later",
    ),
    (
        "rejected a second before its expiry, refresh failed moments ago: 503",
        replace(HOURLY, expires_at=at(1), **FAILED),
        POLICY,
        J,
        {},
        Action.UNAVAILABLE,
        "probe_later",
    ),
    (
        "rejected, the token endpoint's Retry-After not over: 503",
        replace(HOURLY, **{**FAILED, "last_attempt_at": at(-60), "retry_not_before": at(30)}),
        POLICY,
        J,
        {},
        Action.UNAVAILABLE,
        "probe_later",
    ),
    (
        "rejected, configuration error moments ago: 503",
        replace(HOURLY, **{**FAILED, "failure_kind": "configuration"}),
        POLICY,
        J,
        {},
        Action.UNAVAILABLE,
        "probe_later",
    ),
    (
        "rejected, last failed refresh 6 s ago: probe with a refresh",
        replace(HOURLY, **{**FAILED, "last_attempt_at": at(-6)}),
        POLICY,
        J,
        {},
        Action.REFRESH,
        "rejected",
    ),
    (
        "rejected after a failed refresh, within the cooldown of a rejection refresh: pass",
        replace(HOURLY, rejection_refreshed_at=at(-5), **FAILED),
        POLICY,
        J,
        {},
        Action.PASS,
        "cooldown",
    ),
    (
        "rejected, expired, refresh failed moments ago: 503",
        replace(EXPIRED, **FAILED),
        POLICY,
        J,
        {},
        Action.UNAVAILABLE,
        "probe_later",
    ),
    (
        "rejected, no refresh token: needs a person",
        TokenState(
            has_refresh_token=False, expires_at=None, expiry_known=False, issued_at=at(-3600)
        ),
        POLICY,
        J,
        {},
        Action.REAUTHORIZE,
        "rejected_without_refresh_token",
    ),
    (
        "rejected, no refresh token, just issued: pass",
        TokenState(has_refresh_token=False, expires_at=None, expiry_known=False, issued_at=NOW),
        POLICY,
        J,
        {},
        Action.PASS,
        "cooldown",
    ),
]


@pytest.mark.parametrize(
    ("state", "policy", "situation", "inputs", "action", "reason"),
    [row[1:] for row in ROWS],
    ids=[row[0] for row in ROWS],
)
def test_decide(state, policy, situation, inputs, action, reason):
    decision = decide(state, policy, situation, NOW, **inputs)
    assert (decision.action, decision.reason) == (action, reason)


def test_unavailable_says_when_to_come_back():
    probe = decide(replace(EXPIRED, **FAILED), POLICY, R, NOW)
    assert probe.retry_after == pytest.approx(4)
    retry_after = replace(
        EXPIRED, **{**FAILED, "last_attempt_at": at(-60), "retry_not_before": at(30)}
    )
    assert decide(retry_after, POLICY, R, NOW).retry_after == pytest.approx(30)


def test_a_rejected_token_that_cannot_be_renewed_now_says_when_to_come_back():
    """The upstream refused the token and the refresh just failed: the same wait as an expired
    token's (the next probe, or the token endpoint's Retry-After)."""
    assert decide(replace(HOURLY, **FAILED), POLICY, J, NOW).retry_after == pytest.approx(4)
    retry_after = replace(
        HOURLY, **{**FAILED, "last_attempt_at": at(-60), "retry_not_before": at(30)}
    )
    assert decide(retry_after, POLICY, J, NOW).retry_after == pytest.approx(30)


@pytest.mark.parametrize("lifetime", [2, 5, 10, 20, 60, 120, 3600, 86400 * 7])
def test_one_refresh_per_lifetime_for_any_lifetime(lifetime):
    """Simulated time, many callers a second: a token is refreshed once or twice per lifetime
    (at the latest half-way through it), never on every call, whatever its lifetime compared
    with the leeway."""
    issued, refreshes, t = 0.0, 0, 0.0
    step = max(0.25, lifetime / 200)
    while t < lifetime * 3:
        state = TokenState(expires_at=at(issued + lifetime), issued_at=at(issued))
        if decide(state, POLICY, R, at(t)).action is Action.REFRESH:
            refreshes, issued = refreshes + 1, t
        assert decide(state, POLICY, R, at(t)).action in (Action.USE, Action.REFRESH)
        t += step
    assert 2 <= refreshes <= 6


def test_window_is_capped_at_a_fraction_of_the_lifetime():
    assert window(300, HOURLY, 0.5) == 300
    assert window(30, SHORT, 0.5) == 10
    assert window(30, TokenState(expires_at=None), 0.5) == 30


def test_background_refreshes_are_spread_per_token():
    spreads = [spread_of(token_id) for token_id in range(1, 1001)]
    assert all(0 <= s < 1 for s in spreads)
    assert spread_of(7) == spread_of(7)
    # Tokens issued together become due at different times over a fifth of the margin.
    due_at = []
    for token_id in range(1, 201):
        state = replace(HOURLY, spread=spread_of(token_id))
        first = next(
            t for t in range(2000, 3601) if decide(state, POLICY, B, at(t)).action is Action.REFRESH
        )
        due_at.append(first)
    assert max(due_at) - min(due_at) >= 50
    assert min(due_at) >= 3000 - 300  # never earlier than the configured margin


# --- what a token-endpoint error means --------------------------------------------------------

P, C, T = FailureKind.PERMANENT, FailureKind.CONFIGURATION, FailureKind.TRANSIENT
CLASSES = [
    ("invalid_grant", 400, P),
    ("invalid_client", 401, P),
    ("unauthorized_client", 400, P),
    (None, 401, P),  # a bare 401
    ("invalid_token", 401, P),  # an unrecognised error with 401
    ("bad_refresh_token", 200, P),  # GitHub Apps
    ("invalid_refresh_token", 200, P),  # Slack
    ("invalid_code", 200, P),  # Zoho
    # OIDC Core §3.1.2.6 on a refresh: only a person can help (Entra: MFA, consent revoked)
    ("interaction_required", 400, P),
    ("login_required", 400, P),
    ("consent_required", 400, P),
    ("account_selection_required", 400, P),
    ("interaction_required", 503, T),  # a 5xx is still no verdict
    ("invalid_scope", 400, C),
    ("invalid_request", 400, C),
    ("unsupported_grant_type", 400, C),
    ("temporarily_unavailable", 400, T),
    ("server_error", 400, T),
    ("temporarily_unavailable", 401, T),
    ("slow_down_please", 400, T),  # unknown code
    ("invalid_response", 200, T),
    (None, 400, T),
    (None, 503, T),
    ("invalid_grant", 503, T),  # a 5xx is never a verdict on the grant
    (None, 429, T),
]


@pytest.mark.parametrize(("code", "status", "kind"), CLASSES)
def test_classify_answer(code, status, kind):
    assert classify_answer(code, status) is kind


# --- expiry ---------------------------------------------------------------------------------------

EXPIRES_IN = [
    (3600, 3600),
    ("3600", 3600),
    (" 3599 ", 3599),
    ("3599.7", 3599),
    (3599.7, 3599),
    (0, None),
    ("0", None),
    (-5, None),
    ("-5", None),
    (10**12, MAX_LIFETIME),
    ("1e400", None),  # inf
    ("nan", None),
    ("soon", None),
    ("", None),
    (None, None),
    (True, None),
    ([3600], None),
    ({"s": 1}, None),
]


@pytest.mark.parametrize(("value", "seconds"), EXPIRES_IN)
def test_parse_expires_in(value, seconds):
    assert parse_expires_in(value) == seconds


def _jwt(**claims) -> str:
    return jwt.encode(claims, "not-checked-" + "k" * 32, algorithm="HS256")


def test_jwt_exp_gives_the_expiry():
    now = datetime.now(tz=UTC)
    token = _jwt(exp=int(time.time()) + 1800, sub="x")
    assert 1795 <= jwt_expires_in(token, now) <= 1800
    assert jwt_expires_in(_jwt(exp=int(time.time()) - 10), now) is None  # past: unknown
    assert jwt_expires_in(_jwt(sub="no exp"), now) is None
    assert jwt_expires_in(_jwt(exp="tomorrow"), now) is None
    assert jwt_expires_in("opaque-token", now) is None
    assert jwt_expires_in("a.b.c", now) is None


@pytest.mark.parametrize(
    ("expires_in", "access_token", "renewable", "expected"),
    [
        (3600, "opaque", True, (3600, True, "expires_in")),
        ("3600", "opaque", False, (3600, True, "expires_in")),
        (None, "jwt", True, (1800, True, "jwt")),
        (0, "jwt", False, (1800, True, "jwt")),
        (None, "opaque", True, (600, False, "assumed")),
        (-1, "opaque", True, (600, False, "assumed")),
        (None, "opaque", False, (None, False, "none")),  # GitHub OAuth apps
        (10**12, "opaque", True, (MAX_LIFETIME, True, "expires_in")),
    ],
)
def test_expiry_of(expires_in, access_token, renewable, expected):
    now = datetime.now(tz=UTC)
    if access_token == "jwt":
        access_token = _jwt(exp=int(now.timestamp()) + 1800)
    expiry = expiry_of(
        expires_in=expires_in,
        access_token=access_token,
        renewable=renewable,
        assumed_lifetime=600,
        now=now,
    )
    seconds = None if expiry.expires_at is None else (expiry.expires_at - now).total_seconds()
    if seconds is not None and expected[0] is not None:
        assert seconds == pytest.approx(expected[0], abs=2)
    else:
        assert seconds is expected[0]
    assert (expiry.known, expiry.source) == expected[1:]


# --- when the background should look next (the sweep's index) ---------------------------------

DUE_STATES = [
    ("hourly", HOURLY, POLICY),
    ("20 s token", SHORT, POLICY),
    ("spread token", replace(HOURLY, spread=0.73), POLICY),
    ("idle monthly token", TokenState(expires_at=at(86400 * 30), issued_at=at(-600)), POLICY),
    ("in backoff", replace(EXPIRED, **FAILED), POLICY),
    (
        "Retry-After beyond the backoff",
        replace(EXPIRED, failure_kind="transient", retry_not_before=at(900)),
        POLICY,
    ),
    ("no refresh token, known expiry", replace(HOURLY, has_refresh_token=False), POLICY),
    (
        "client credentials never fetched",
        TokenState(status="not_authorized", has_access_token=False, has_refresh_token=False),
        CC,
    ),
    (
        "client credentials after a failure",
        TokenState(
            status="not_authorized",
            has_access_token=False,
            has_refresh_token=False,
            failure_kind="transient",
            next_attempt_at=at(120),
        ),
        CC,
    ),
]


@pytest.mark.parametrize(
    ("state", "policy"), [row[1:] for row in DUE_STATES], ids=[row[0] for row in DUE_STATES]
)
def test_refresh_due_at_is_when_the_background_decision_turns(state, policy):
    """The stored due time and decide() agree: nothing to do a moment before, work at it."""
    due = refresh_due_at(state, policy, NOW)
    assert due is not None
    work = (Action.REFRESH, Action.REAUTHORIZE)
    if due > NOW:
        before = decide(state, policy, B, due - timedelta(milliseconds=1))
        assert before.action is Action.SKIP, before
    assert decide(state, policy, B, max(due, NOW)).action in work


NEVER_DUE = [
    ("needs re-authorization", replace(HOURLY, status="needs_reauthorization")),
    ("never authorized", TokenState(status="not_authorized", has_access_token=False)),
    (
        "no refresh token, no expiry",
        TokenState(has_refresh_token=False, expires_at=None, expiry_known=False, issued_at=NOW),
    ),
]


@pytest.mark.parametrize("state", [row[1] for row in NEVER_DUE], ids=[row[0] for row in NEVER_DUE])
def test_tokens_only_a_person_can_help_are_never_due(state):
    assert refresh_due_at(state, POLICY, NOW) is None
    for days in (0, 1, 7, 60):
        decision = decide(state, POLICY, B, at(days * 86400))
        assert decision.action is not Action.REFRESH
        assert decision.action is Action.SKIP or decision.reason == "needs_reauthorization"


@pytest.mark.parametrize(
    ("grant_type", "machine"),
    [("authorization_code", False), ("client_credentials", True), ("jwt_bearer", True)],
)
def test_grants_without_a_person_share_the_client_credentials_rules(grant_type, machine):
    from datasources.models import Datasource

    assert Policy.of(Datasource(grant_type=grant_type)).client_credentials is machine


# --- the fast lane's once-per-token question ---------------------------------------------------

USE_UNTIL_STATES = {row[0]: (row[1], row[2]) for row in ROWS if row[3] is R} | {
    row[0]: (row[1], row[2]) for row in DUE_STATES
}
OFFSETS = [-86400, -3600, -60, -1, 0, 1, 10, 19, 20, 29, 30, 60, 600, 2969, 2970, 2999, 3000]


@pytest.mark.parametrize("name", list(USE_UNTIL_STATES))
def test_use_until_agrees_with_decide(name):
    """Before use_until, decide() answers USE on the request path at every moment; at it, the
    reason it said USE ("fresh", or a token that cannot be renewed still valid) has ended."""
    state, policy = USE_UNTIL_STATES[name]
    until = use_until(state, policy)
    moments = [at(seconds) for seconds in [*OFFSETS, 86400 * 40]]
    if until is not None:
        if until is not FOREVER:
            moments.append(until - timedelta(milliseconds=1))
        for moment in [m for m in moments if m < until]:
            assert decide(state, policy, R, moment).action is Action.USE, moment
        if until is not FOREVER:
            after = decide(state, policy, R, until)
            assert after.reason not in ("fresh", "no_refresh_token"), after
    else:
        # Nothing follows from the token alone: decide() is asked each time, and says
        # something other than "fresh" now.
        assert decide(state, policy, R, NOW).reason not in ("fresh", "no_refresh_token")


def test_use_until_covers_the_common_tokens():
    """The hot path's tokens get an answer (else the lane would ask decide() on every call)."""
    assert use_until(HOURLY, POLICY) == at(3000 - 30)
    assert use_until(SHORT, POLICY) == at(10)  # leeway capped at half the 20 s lifetime
    assert use_until(replace(HOURLY, has_refresh_token=False), POLICY) == at(3000)
    assert use_until(TokenState(expires_at=None, issued_at=NOW), POLICY) is FOREVER
    assert use_until(replace(HOURLY, status="needs_reauthorization"), POLICY) is None
