"""Counters this process keeps in memory for /metrics: what could not be stored in the database,
and what was served without it.

Every other metric is read from the database, so that each process answers with the same totals.
These count what the database never received (usage counts and call-log rows dropped because
the database refused them for so long that the bounded buffers filled up): they cannot be kept
there, so each process reports its own, and a scrape of every process (or a sum over them)
gives the whole.
"""

from __future__ import annotations

import logging
import threading

#: Proxied calls whose usage counts were dropped (datasources_usage_dropped_total).
USAGE_DROPPED = "usage_dropped"
#: Call-log rows dropped (datasources_call_log_dropped_total).
CALL_LOG_DROPPED = "call_log_dropped"

#: Lookups served from a stale cache entry while the database was unavailable
#: (datasources_proxy_stale_served_total).
STALE_SERVED = "stale_served"

_lock = threading.Lock()
_values: dict[str, int] = {USAGE_DROPPED: 0, CALL_LOG_DROPPED: 0, STALE_SERVED: 0}


def add(name: str, amount: int = 1) -> None:
    """Count ``amount`` more of ``name`` (never lowered: Prometheus counters only grow)."""
    with _lock:
        _values[name] = _values.get(name, 0) + amount


def value(name: str) -> int:
    with _lock:
        return _values.get(name, 0)


class Outage:
    """One batched writer's view of a database that refuses its writes (the usage counts, the
    call log): say when writes start failing, whenever rows are dropped, and once when they
    work again, by the error's name only (a database error's message can carry its URL and
    password); count what was dropped. One place, so both writers say it the same way."""

    def __init__(self, logger: logging.Logger, what: str, unit: str, counter: str) -> None:
        self.logger, self.what, self.unit, self.counter = logger, what, unit, counter
        self.failing = False
        self._lock = threading.Lock()

    def failed(self, err: BaseException, kept: int, dropped: int) -> None:
        with self._lock:
            first, self.failing = not self.failing, True
        if dropped:
            add(self.counter, dropped)
        if first or dropped:
            self.logger.warning(
                "%s not written (%s); %d %s kept for the next flush, %d dropped",
                self.what,
                type(err).__name__,
                kept,
                self.unit,
                dropped,
            )

    def written(self) -> None:
        with self._lock:
            was, self.failing = self.failing, False
        if was:
            self.logger.warning("%s written again after failed flushes", self.what)
