"""Per-datasource proxy counters (and the latency histogram), accumulated in memory and flushed at most once a second per
process, so the proxy's hot path does not write to the database on every call.

Counts the database refuses (a restart, a failover, a full disk) are kept and added to the next
flush, so a database outage loses no count. What is held is one entry per datasource, so it is
bounded by the number of datasources; beyond :data:`MAX_HELD_DATASOURCES` (never reached by a
sane deployment) a new datasource's calls are dropped and counted in /metrics
(``datasources_usage_dropped_total``, :mod:`datasources.ops.counters`)."""

from __future__ import annotations

import atexit
import logging
import threading
import time
from bisect import bisect_left
from dataclasses import dataclass, field
from datetime import UTC, datetime

from django.db import IntegrityError, transaction
from django.db.models import F

from ..conf import app_settings
from ..models import LATENCY_BUCKETS_MS, Datasource, DatasourceUsage
from ..ops import counters

logger = logging.getLogger(__name__)

_BUCKET_FIELDS = [f"latency_le_{le}" for le in LATENCY_BUCKETS_MS]


@dataclass
class _Pending:
    calls: int = 0
    errors: int = 0
    duration_ms: int = 0
    last_status: int | None = None
    last_called_at: float | None = None  # time.time()
    #: calls per latency bucket (LATENCY_BUCKETS_MS, then one for "slower than the last")
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_MS) + 1))

    def add(self, older: _Pending) -> None:
        """Take in the counts of ``older`` (an entry whose write failed); the last status and
        time stay this entry's own, the newer ones."""
        self.calls += older.calls
        self.errors += older.errors
        self.duration_ms += older.duration_ms
        self.buckets = [a + b for a, b in zip(self.buckets, older.buckets, strict=True)]


#: Most datasources whose counts are held at once (writes failing); a new one beyond it has
#: its calls dropped and counted.
MAX_HELD_DATASOURCES = 10_000

_lock = threading.Lock()
_pending: dict[int, _Pending] = {}
_last_flush = time.monotonic()
#: Whether the last flush failed (its failure was logged; the next success is logged too).
_outage = counters.Outage(logger, "Usage counts", "calls", counters.USAGE_DROPPED)


def record(
    datasource_id: int, status: int, duration_ms: float, *, error: bool, write: bool = True
) -> bool:
    """Count one call; write the counts when they are due. ``write=False``: only say whether
    they are due (the fast lane then writes them with :func:`flush` off its event loop)."""
    with _lock:
        entry = _pending.get(datasource_id)
        if entry is None:
            if len(_pending) >= MAX_HELD_DATASOURCES:
                counters.add(counters.USAGE_DROPPED)
                return False
            entry = _pending[datasource_id] = _Pending()
        entry.calls += 1
        entry.errors += int(error)
        entry.duration_ms += int(duration_ms)
        entry.buckets[bisect_left(LATENCY_BUCKETS_MS, duration_ms)] += 1
        entry.last_status = status
        entry.last_called_at = time.time()  # a datetime when written (not on every call)
        due = time.monotonic() - _last_flush >= app_settings.USAGE_FLUSH_INTERVAL
    if due and write:
        flush()
    return due


def flush() -> None:
    """Write the counts held; never raises. A write the database refuses keeps its counts
    (and those not tried after it: the database is away) for the next flush, which adds
    them up: the caller whose call made the flush due must not get a 500 for it, and no
    count is lost to an outage."""
    global _last_flush
    with _lock:
        batch = dict(_pending)
        _pending.clear()
        _last_flush = time.monotonic()
    entries = iter(batch.items())
    for datasource_id, entry in entries:
        try:
            with transaction.atomic():  # this entry's counts are written whole, or not at all
                _write(datasource_id, entry)
        except Exception as err:
            _keep({datasource_id: entry, **dict(entries)}, err)
            return
    _outage.written()


def held() -> int:
    """Calls counted and not written yet."""
    with _lock:
        return sum(entry.calls for entry in _pending.values())


def _keep(unwritten: dict[int, _Pending], err: Exception) -> None:
    """Put counts whose write failed back in front of those counted since."""
    dropped = 0
    with _lock:
        for datasource_id, entry in unwritten.items():
            newer = _pending.get(datasource_id)
            if newer is not None:
                newer.add(entry)
            elif len(_pending) < MAX_HELD_DATASOURCES:
                _pending[datasource_id] = entry
            else:
                dropped += entry.calls
    _outage.failed(err, held(), dropped)


def discard() -> None:
    """Forget the counts not written yet (tests start from nothing)."""
    global _last_flush
    with _lock:
        _pending.clear()
        _last_flush = time.monotonic()


def _when(timestamp: float | None) -> datetime | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC)


def _write(datasource_id: int, entry: _Pending) -> None:
    values = {
        "calls": F("calls") + entry.calls,
        "errors": F("errors") + entry.errors,
        "total_duration_ms": F("total_duration_ms") + entry.duration_ms,
        "last_status": entry.last_status,
        "last_called_at": _when(entry.last_called_at),
        **{
            name: F(name) + count
            for name, count in zip(_BUCKET_FIELDS, entry.buckets, strict=False)
            if count
        },
    }
    if DatasourceUsage.objects.filter(datasource_id=datasource_id).update(**values):
        return
    if not Datasource.objects.filter(pk=datasource_id).exists():
        return  # deleted since these calls were counted
    try:
        with transaction.atomic():
            DatasourceUsage.objects.create(
                datasource_id=datasource_id,
                calls=entry.calls,
                errors=entry.errors,
                total_duration_ms=entry.duration_ms,
                last_status=entry.last_status,
                last_called_at=_when(entry.last_called_at),
                **dict(zip(_BUCKET_FIELDS, entry.buckets, strict=False)),
            )
    except IntegrityError:  # another process created it first, or the datasource is gone
        DatasourceUsage.objects.filter(datasource_id=datasource_id).update(**values)


def write_held(when: str = "exit") -> None:
    """Write the usage counts and call-log rows this process still holds in memory: at exit (a
    gunicorn worker restarting), and at the ASGI lifespan's shutdown (uvicorn ends a worker
    stopped by SIGTERM by raising the signal again once it has shut down, so exit hooks never
    run there: datasources/proxy/asgi.py). Nothing held, nothing touched."""
    from . import calllog

    for name, write, left in (
        ("Usage counts", flush, held),
        ("Call log rows", calllog.flush, calllog.held),
    ):
        try:
            write()  # keeps what the database refuses (held below)
        except Exception as err:  # a guard: the other batch may still go
            logger.warning("%s lost at %s (%s)", name, when, type(err).__name__)
            continue
        lost = left()
        if lost:  # the database refused them; nothing will write them now
            logger.warning("%s lost at %s: %d (the database refused them)", name, when, lost)


atexit.register(write_held)
