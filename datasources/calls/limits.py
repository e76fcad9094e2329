"""An upstream's health as every process sees it: when its rate limit lifts, and its circuit
breaker. Pure functions over one small record; :mod:`.health` stores the record (Redis or the
database) and applies them atomically, so any number of processes share one memory.

Rate limit: an upstream ``429`` with ``Retry-After``, or a ``RateLimit-*`` / ``X-RateLimit-*``
answer saying nothing remains, sets ``rate_limited_until``; until then calls are answered
``429`` with ``Retry-After`` without calling the upstream.

Circuit breaker: ``threshold`` consecutive failures (5xx, connection errors, timeouts) with no
more than ``window`` seconds between the first and the last open the circuit for ``cooldown``
seconds: calls are answered ``503`` at once. After the cooldown one call (the probe) goes
through; its success closes the circuit, its failure opens it again for another cooldown.

Times are Unix seconds (floats), the same in every process and store.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, replace

from . import retries


@dataclass(frozen=True)
class Health:
    rate_limited_until: float | None = None
    failures: int = 0  # consecutive
    first_failure_at: float | None = None  # of the current run of failures
    open_until: float | None = None  # None: closed; past: half-open (one probe may go)
    opened_at: float | None = None
    probe_until: float | None = None  # a probe is under way until then (its lease)

    @property
    def clean(self) -> bool:
        """Nothing to remember: the common case, written never."""
        return self == CLEAN


CLEAN = Health()


@dataclass(frozen=True)
class BreakerPolicy:
    threshold: int = 5  # 0: no circuit breaker
    window: float = 60.0
    cooldown: float = 30.0
    probe_seconds: float = 70.0  # a probe that never reports back frees the slot after this


class Verdict(enum.Enum):
    PASS = "pass"
    PROBE = "probe"  # half-open: this call may be the one probe, if it can claim it
    RATE_LIMITED = "rate_limited"
    CIRCUIT_OPEN = "circuit_open"


@dataclass(frozen=True)
class Gate:
    verdict: Verdict
    retry_after: float = 0.0  # seconds, for the refusals


_PASS = Gate(Verdict.PASS)  # (frozen: one for every call that passes)


def gate(health: Health, now: float) -> Gate:
    """May a call go upstream now?"""
    if health.rate_limited_until is not None and health.rate_limited_until > now:
        return Gate(Verdict.RATE_LIMITED, health.rate_limited_until - now)
    if health.open_until is not None:
        if health.open_until > now:
            return Gate(Verdict.CIRCUIT_OPEN, health.open_until - now)
        if health.probe_until is not None and health.probe_until > now:
            return Gate(Verdict.CIRCUIT_OPEN, 1.0)  # another call is probing
        return Gate(Verdict.PROBE)
    return _PASS


def claim_probe(health: Health, now: float, policy: BreakerPolicy) -> Health | None:
    """The record with this caller's probe lease, or None if it may not probe."""
    if gate(health, now).verdict is not Verdict.PROBE:
        return None
    return replace(health, probe_until=now + policy.probe_seconds)


def is_failure(status: int) -> bool:
    """What counts against the breaker: 5xx and no answer at all (4xx are answers)."""
    return status == retries.CONNECTION_ERROR or status >= 500


def after_failure(health: Health, now: float, policy: BreakerPolicy) -> Health:
    if policy.threshold <= 0:
        return health
    if health.open_until is not None:
        # The probe (or a call let through just before the circuit opened) failed: open again.
        return replace(health, open_until=now + policy.cooldown, opened_at=now, probe_until=None)
    in_window = (
        health.first_failure_at is not None and now - health.first_failure_at <= policy.window
    )
    failures = health.failures + 1 if in_window else 1
    first = health.first_failure_at if in_window else now
    if failures >= policy.threshold:
        return replace(
            health,
            failures=failures,
            first_failure_at=first,
            open_until=now + policy.cooldown,
            opened_at=now,
            probe_until=None,
        )
    return replace(health, failures=failures, first_failure_at=first)


def after_success(health: Health) -> Health:
    """An answer that is not a failure: the run of failures ends and the circuit closes."""
    return replace(
        health, failures=0, first_failure_at=None, open_until=None, opened_at=None, probe_until=None
    )


def after_rate_limit(health: Health, until: float) -> Health:
    current = health.rate_limited_until
    return replace(health, rate_limited_until=until if current is None else max(current, until))


def tidy(health: Health, now: float) -> Health:
    """Forget a rate limit that has passed (so a record can become clean again)."""
    if health.rate_limited_until is not None and health.rate_limited_until <= now:
        return replace(health, rate_limited_until=None)
    return health


_RATELIMIT_FIELD = re.compile(r"(?:^|[,;\s])(remaining|reset|r|t)\s*=\s*(\d+)", re.I)
#: X-RateLimit-Reset values above this are Unix times (GitHub), below it seconds (most others).
_EPOCH_THRESHOLD = 1_000_000_000


def rate_limited_until(
    status: int, header, now: float, *, max_seconds: float = 3600.0
) -> float | None:
    """When the upstream's rate limit lifts, from its answer; None when it said nothing usable.

    ``header(name)`` reads one response header. Understood: ``429`` with ``Retry-After``
    (seconds or HTTP date); ``RateLimit-Remaining: 0`` with ``RateLimit-Reset`` (seconds); the
    structured ``RateLimit: remaining=0, reset=N`` (also ``r=`` / ``t=``); and
    ``X-RateLimit-Remaining: 0`` with ``X-RateLimit-Reset`` (Unix time or seconds). Never more
    than ``max_seconds`` ahead, so a wrong header cannot block a datasource for days.
    """
    wait: float | None = None
    if status == 429:
        wait = retries.parse_retry_after(header("Retry-After"), now)
    if wait is None:
        for prefix in ("RateLimit-", "X-RateLimit-"):
            remaining = (header(prefix + "Remaining") or "").strip()
            if remaining == "0":
                wait = _reset_seconds(header(prefix + "Reset"), now)
                if wait is not None:
                    break
    if wait is None:
        structured = header("RateLimit")
        if structured:
            fields = {k.lower(): int(v) for k, v in _RATELIMIT_FIELD.findall(structured)}
            if fields.get("remaining", fields.get("r")) == 0:
                reset = fields.get("reset", fields.get("t"))
                wait = float(reset) if reset is not None else None
    if wait is None or wait <= 0:
        return None
    return now + min(wait, max_seconds)


def _reset_seconds(value: str | None, now: float) -> float | None:
    value = (value or "").strip()
    if not value.isdigit():
        return None
    number = float(value)
    return number - now if number > _EPOCH_THRESHOLD else number
