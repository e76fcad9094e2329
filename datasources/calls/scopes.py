"""An API that refuses a call for lack of scope: remembered so the admin can say which scope.

``WWW-Authenticate: Bearer error="insufficient_scope", scope="Mail.Read"`` (RFC 6750 §3.1)
means the token is fine but was not granted that scope; a refresh cannot help (it keeps the
same scopes), so the answer is passed on (:mod:`.challenge`), and a token event records the
scope the API asked for. The datasource's page then says it in plain words: add the scope to
Scope(s), save, re-authorize.

Why a process-local memo in front of the event: an app that keeps calling the same endpoint
would otherwise write a row per call. One row per datasource and scope per NOTE_INTERVAL per
process is enough for a person to see it. The check needs no I/O, so the fast lane can ask it
on the event loop and go off the loop only when there is something to write.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from . import challenge

#: Seconds before the same (datasource, scope) refusal is recorded again by one process.
NOTE_INTERVAL = 3600.0
#: The most (datasource, scope) pairs remembered (a hostile upstream cannot grow it forever).
MAX_REMEMBERED = 1024

#: How a recorded refusal names the scope (:func:`needed_scope` reads it back).
_NEEDED = "scope needed: "

_noted: dict[tuple[int, str], float] = {}
_lock = threading.Lock()


def refused_scope(status: int, header: Callable[[str], str | None] | None) -> str | None:
    """The scope an ``insufficient_scope`` answer names ("" when it names none), or None when
    the answer is not one. Cheap for every other answer: a status test and a substring test."""
    if header is None or status not in (401, 403):
        return None
    value = header("WWW-Authenticate")
    if not value or "insufficient_scope" not in value:
        return None
    reading = challenge.read_answer(status, value, frozenset())
    if reading.verdict is not challenge.Verdict.INSUFFICIENT_SCOPE:
        return None
    return reading.scope[:200]


def due(datasource_id: int, scope: str, now: float | None = None) -> bool:
    """Whether this refusal should be recorded now (no I/O)."""
    now = time.monotonic() if now is None else now
    last = _noted.get((datasource_id, scope))
    return last is None or now - last >= NOTE_INTERVAL


def learn(datasource, status: int, header: Callable[[str], str | None] | None) -> None:
    """Record a scope refusal as a token event (at most once per NOTE_INTERVAL per process)."""
    scope = refused_scope(status, header)
    if scope is None:
        return
    now = time.monotonic()
    with _lock:
        if not due(datasource.pk, scope, now):
            return
        if len(_noted) >= MAX_REMEMBERED:
            _noted.clear()
        _noted[(datasource.pk, scope)] = now
    from ..models import TokenEvent
    from ..tokens import record_event

    needed = f"{_NEEDED}{scope}" if scope else "the API named no scope"
    record_event(
        datasource,
        TokenEvent.Kind.SCOPE_REFUSED,
        f"The API refused a call for lack of scope (HTTP {status}; {needed}).",
    )


def needed_scope(detail: str) -> str:
    """The scope a recorded refusal (its event's ``detail``, written by :func:`learn`) names;
    "" when it named none. Kept beside the writer so the two cannot drift apart."""
    return detail.partition(_NEEDED)[2].removesuffix(").")


def pending(datasource, status: int, header: Callable[[str], str | None] | None) -> bool:
    """True when :func:`learn` would write for this answer (the lane then goes off the loop)."""
    scope = refused_scope(status, header)
    return scope is not None and due(datasource.pk, scope)


def forget() -> None:
    """Tests: start from an empty memo."""
    with _lock:
        _noted.clear()
