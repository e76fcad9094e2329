"""The call log: one :class:`~datasources.models.ProxyCall` row per proxied call.

Rows are kept in memory and written in multi-row ``INSERT`` statements at most every
CALL_LOG_FLUSH_INTERVAL seconds (or once CALL_LOG_MAX_BUFFER rows wait) per process, so the
proxy's hot path appends to a list and does not write to the database. What is recorded is
chosen so nothing secret can be in it: the method, the path below the base URL without its
query string, the status, sizes and timings; never headers, bodies or query values.

Rows the database refuses (a restart, a failover) are kept, ahead of newer ones, and written by
a later flush. What is held is bounded (:func:`max_held`: HELD_BUFFERS times
CALL_LOG_MAX_BUFFER rows); past it the oldest rows go, counted in /metrics
(``datasources_call_log_dropped_total``, :mod:`datasources.ops.counters`), so an outage costs
memory up to a known size and the rows lost are known.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from django.db import connections, router, transaction
from django.utils import timezone

from ..conf import app_settings
from ..models import ProxyCall
from ..ops import counters

logger = logging.getLogger(__name__)

#: Longest path kept (the column's size).
MAX_PATH = 1000


@dataclass(slots=True)
class Call:
    """What one call did, filled in as it goes (the proxy view and :class:`.proxy.attempts`)."""

    method: str
    path: str
    started: float  # time.perf_counter()
    called_at: float  # time.time()
    request_bytes: int = 0
    response_bytes: int = 0
    api_key_id: int | None = None
    user_id: int | None = None
    #: The end user whose token served the call ("" for the shared or a Django user's token):
    #: an id the application chose, never a secret.
    end_user: str = ""
    retries: int = 0
    refreshed: bool = False
    error: str = ""

    @classmethod
    def begin(cls, method: str, path: str, request_bytes: int = 0) -> Call:
        path = path.partition("?")[0]
        if not (path.isascii() and path.isprintable()):  # printable ASCII has no controls
            path = _CONTROL.sub(_escape, path)
        return cls(
            method,
            path[:MAX_PATH],
            time.perf_counter(),
            time.time(),
            request_bytes,
        )


#: Control characters (NUL among them) are stored percent-encoded: PostgreSQL refuses NUL in text,
#: and a log line should not carry raw control characters either.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _escape(match: re.Match[str]) -> str:
    return f"%{ord(match.group()):02X}"


_lock = threading.Lock()
_pending: list[tuple] = []
_last_flush = time.monotonic()
#: Whether the last flush failed (its failure was logged; the next success is logged too).
_outage = counters.Outage(logger, "Call log rows", "rows", counters.CALL_LOG_DROPPED)

#: How many CALL_LOG_MAX_BUFFER-sized batches may be held while writes fail (the default,
#: 10 x 5,000 rows, is about 15 MB and a minute of 800 calls a second).
HELD_BUFFERS = 10


def max_held() -> int:
    """Most rows held in memory: waiting for a flush, or kept after failed ones."""
    return max(1, app_settings.CALL_LOG_MAX_BUFFER * HELD_BUFFERS)


def record(
    call: Call, datasource_id: int, status: int, latency_ms: float, *, write: bool = True
) -> bool:
    """Queue one row; write the queue when it is due. ``write=False``: only say whether it is
    due (the fast lane then writes it with :func:`flush` off its event loop)."""
    if not app_settings.CALL_LOG:
        return False
    row = (
        call.called_at,
        datasource_id,
        call.api_key_id,
        call.user_id,
        call.end_user,
        call.method,
        call.path,
        status,
        call.error,
        int(latency_ms),
        call.request_bytes,
        call.response_bytes,
        call.retries,
        call.refreshed,
    )
    with _lock:
        if len(_pending) >= max_held():  # writes have been failing (or hanging) for a while
            del _pending[0]
            counters.add(counters.CALL_LOG_DROPPED)
        _pending.append(row)
        due = (
            len(_pending) >= app_settings.CALL_LOG_MAX_BUFFER
            or time.monotonic() - _last_flush >= app_settings.CALL_LOG_FLUSH_INTERVAL
        )
    if due and write:
        flush()
    return due


def flush() -> int:
    """Write every queued row now; how many were written. Never raises: a batch the database
    refuses (written in one transaction, so whole or not at all) is kept for the next flush,
    so the caller whose call made the flush due gets no 500 and the outage loses no row."""
    global _last_flush
    with _lock:
        batch = list(_pending)
        _pending.clear()
        _last_flush = time.monotonic()
    if not batch:
        return 0
    try:
        _write(batch)
    except Exception as err:
        _keep(batch, err)
        return 0
    _outage.written()
    return len(batch)


def held() -> int:
    """Rows not written yet."""
    with _lock:
        return len(_pending)


def _keep(batch: list[tuple], err: Exception) -> None:
    """Put a batch whose write failed back ahead of the rows queued since, the oldest dropped
    (and counted) past :func:`max_held`."""
    with _lock:
        _pending[:0] = batch
        dropped = max(0, len(_pending) - max_held())
        del _pending[:dropped]
        kept = len(_pending)
    _outage.failed(err, kept, dropped)


def _write(batch: list[tuple]) -> None:
    """One multi-row INSERT per statement-full of ``batch``, all in one transaction."""
    connection = connections[router.db_for_write(ProxyCall)]
    called_at = _called_at_values(connection)
    # Many rows per INSERT, without a model instance per row, in one transaction (autocommit
    # would commit each row: SQLite then writes its journal per row). Not executemany: that
    # steps the statement once per row, and Python's sqlite3 gives up and takes back the GIL
    # around every step, a handover with the fast lane's event loop per logged call. No
    # foreign-key constraints: nothing refuses a row.
    per_statement = _rows_per_statement(connection, len(batch))
    full = _insert_sql(connection, per_statement)
    with transaction.atomic(using=connection.alias), connection.cursor() as cursor:
        for start in range(0, len(batch), per_statement):
            rows = batch[start : start + per_statement]
            values = [value for row in rows for value in (called_at(row[0]), *row[1:])]
            sql = full if len(rows) == per_statement else _insert_sql(connection, len(rows))
            cursor.execute(sql, values)


def _called_at_values(connection) -> Callable[[float], Any]:
    """``called_at`` (a ``time.time()``) as ``connection`` takes it: Django's adapter, given
    the datetime. On SQLite that adapter makes the text of the naive UTC time, and it cost as
    much as the row's insert; there the text is built here instead, the date and time once per
    second, and used only where it is the adapter's text for a set of probe times."""
    adapt = connection.ops.adapt_datetimefield_value

    def adapted(stamp: float) -> Any:
        return adapt(datetime.fromtimestamp(stamp, UTC))

    seconds: dict[int, str] = {}

    def text(stamp: float) -> str:
        # Rounded to the microsecond half to even, carried into the second, as
        # datetime.fromtimestamp rounds.
        second = int(stamp)
        micro = round((stamp - second) * 1e6)
        if micro >= 1_000_000:
            second, micro = second + 1, micro - 1_000_000
        prefix = seconds.get(second)
        if prefix is None:
            prefix = seconds[second] = f"{datetime.fromtimestamp(second, UTC):%Y-%m-%d %H:%M:%S}"
        return f"{prefix}.{micro:06d}" if micro else prefix

    if all(text(stamp) == adapted(stamp) for stamp in _PROBES):
        return text
    return adapted


#: Times :func:`_called_at_values` compares its text with the adapter's on: whole seconds,
#: microseconds, a fraction that rounds up into the next second, a leap year's last second.
_PROBES = (0.0, 1767323045.0, 1767323045.000006, 1767323045.9999996, 1798761599.25, 951868799.5)


#: The columns of a queued row, in its order (:func:`record`).
_COLUMNS = (
    "called_at",
    "datasource_id",
    "api_key_id",
    "user_id",
    "end_user",
    "method",
    "path",
    "status",
    "error",
    "latency_ms",
    "request_bytes",
    "response_bytes",
    "retries",
    "refreshed",
)


#: Most rows in one INSERT (under every backend's limit on parameters per statement).
MAX_ROWS_PER_STATEMENT = 500


def _rows_per_statement(connection, rows: int) -> int:
    """Rows per INSERT: the backend's batch size for our columns (SQLite's is 999 parameters
    per statement), at most :data:`MAX_ROWS_PER_STATEMENT`."""
    fields = [ProxyCall._meta.get_field(name) for name in _COLUMNS]
    batch_size = connection.ops.bulk_batch_size(fields, range(rows))
    return max(1, min(batch_size, MAX_ROWS_PER_STATEMENT))


def _insert_sql(connection, rows: int) -> str:
    quote = connection.ops.quote_name
    columns = ", ".join(quote(ProxyCall._meta.get_field(name).column) for name in _COLUMNS)
    row = "(" + ", ".join(["%s"] * len(_COLUMNS)) + ")"
    # Names from the model's metadata, quoted; every value is a parameter.
    table = quote(ProxyCall._meta.db_table)
    return f"INSERT INTO {table} ({columns}) VALUES {', '.join([row] * rows)}"  # noqa: S608


def discard() -> None:
    """Forget the rows not written yet (tests start from nothing)."""
    global _last_flush
    with _lock:
        _pending.clear()
        _last_flush = time.monotonic()


def prune(now: datetime | None = None) -> int:
    """Delete rows older than CALL_LOG_RETENTION_DAYS; how many went."""
    cutoff = (now or timezone.now()) - timedelta(days=app_settings.CALL_LOG_RETENTION_DAYS)
    deleted, _ = ProxyCall.objects.filter(called_at__lt=cutoff).delete()
    return deleted
