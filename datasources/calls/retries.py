"""Whether to send a failed upstream call again, and after how long: one pure function.

Shared by every path that calls an upstream API (the proxy view, the admin's Test, the Python
client, and any later serving path), so they all follow the same rules:

* only when the datasource opted in (``retry_count`` > 0), and no more often than that — or than
  the caller asked for with the ``X-Datasource-Retries`` header, whichever is fewer;
* only for the statuses the datasource lists (429, 502, 503, 504) and, when it says so, for
  connection errors (refused, reset, timed out): never for a 401, whose one refresh-and-retry is
  decided by the token rules, not here;
* only for idempotent methods, unless the caller sent an ``Idempotency-Key``;
* only when the request body can be sent again (buffered, not streamed);
* after exponential backoff with jitter, or the server's ``Retry-After`` when it sent one;
* never past the call's total budget: a wait that would end after it means the answer stands.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..authserver.outbound import parse_retry_after  # one parser for every Retry-After
from ..models import RETRYABLE_STATUSES  # statuses a datasource may retry: never a 401

#: RFC 9110 §9.2.2: sending these twice has the effect of sending them once.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
#: The request header with which a caller asks for fewer retries (never sent upstream).
RETRIES_HEADER = "X-Datasource-Retries"
#: A caller's key that makes a non-idempotent request safe to send again (forwarded upstream).
IDEMPOTENCY_HEADER = "Idempotency-Key"
#: Stand-in "status" for a connection that failed (refused, reset, timed out) without an answer.
CONNECTION_ERROR = 0


@dataclass(frozen=True)
class RetryPolicy:
    """What a datasource allows, after the caller's request for fewer retries."""

    max_retries: int = 0
    statuses: frozenset[int] = RETRYABLE_STATUSES
    connection_errors: bool = True
    budget: float = 10.0  # seconds, the whole call including every wait
    backoff_base: float = 0.5
    backoff_max: float = 8.0

    @classmethod
    def of(cls, datasource, *, requested: str | None = None, settings=None) -> RetryPolicy:
        """The datasource's policy; ``requested`` is the caller's header value (fewer only)."""
        count = datasource.retry_count or 0
        asked = caller_retries(requested)
        if asked is not None:
            count = min(count, asked)
        if count <= 0:
            return NO_RETRIES  # most datasources, on every call: nothing else to read
        from ..conf import app_settings

        settings = settings or app_settings
        return cls(
            max_retries=count,
            statuses=datasource.retry_status_set,
            connection_errors=datasource.retry_on_connection_errors,
            budget=float(datasource.retry_budget),
            backoff_base=settings.RETRY_BACKOFF_BASE,
            backoff_max=settings.RETRY_BACKOFF_MAX,
        )


NO_RETRIES = RetryPolicy(max_retries=0)


def caller_retries(value: str | None) -> int | None:
    """The caller's ``X-Datasource-Retries``: a non-negative integer, else ignored (None)."""
    if value is None:
        return None
    value = value.strip()
    return int(value) if value.isdigit() and len(value) <= 3 else None


def decide_retry(
    policy: RetryPolicy,
    *,
    method: str,
    status: int,
    retries_done: int,
    elapsed: float,
    retry_after: float | None = None,
    idempotency_key: bool = False,
    replayable: bool = True,
    jitter: float | None = None,
) -> float | None:
    """Seconds to wait before sending the call again, or None: the answer (or error) stands.

    ``status`` is the upstream's status, or :data:`CONNECTION_ERROR`; ``elapsed`` the seconds
    the call has taken so far; ``jitter`` a number in [0, 1) (random when not given).
    """
    if retries_done >= policy.max_retries or not replayable:
        return None
    if method.upper() not in IDEMPOTENT_METHODS and not idempotency_key:
        return None
    if status == CONNECTION_ERROR:
        if not policy.connection_errors:
            return None
    elif status not in policy.statuses:
        return None
    if retry_after is not None:
        wait = max(0.0, retry_after)
    else:
        if jitter is None:
            jitter = random.random()
        ceiling = min(policy.backoff_max, policy.backoff_base * 2**retries_done)
        wait = ceiling * (0.5 + jitter / 2)  # "equal jitter": between half and all of it
    if elapsed + wait > policy.budget:
        return None
    return wait


__all__ = [
    "CONNECTION_ERROR",
    "IDEMPOTENCY_HEADER",
    "IDEMPOTENT_METHODS",
    "NO_RETRIES",
    "RETRIES_HEADER",
    "RetryPolicy",
    "caller_retries",
    "decide_retry",
    "parse_retry_after",
]
