"""The shared memory of each upstream's health (rate limit, circuit breaker), across every web
process and worker: Redis when ``REDIS_URL`` is configured, the database otherwise.

The rules are the pure functions of :mod:`.limits`; a store only reads a record and changes it
atomically (:meth:`HealthStore.update`: the database under a row lock, Redis with an optimistic
``WATCH`` transaction). On the hot path a process reads a datasource's record at most once per
``HEALTH_CACHE_SECONDS`` (its own changes apply at once) and writes only when something happened:
a failure, a rate limit, the first success after failures.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Protocol

from django.conf import settings
from django.core.signals import setting_changed
from django.db import IntegrityError, transaction
from django.db.models.signals import post_delete
from django.dispatch import receiver

from ..conf import app_settings
from ..models import Datasource, UpstreamHealth
from . import limits, scopes
from .limits import CLEAN, Gate, Health, Verdict

logger = logging.getLogger(__name__)

Change = Callable[[Health], Health | None]


class HealthStore(Protocol):
    def read(self, datasource_id: int) -> Health: ...

    def read_many(self, datasource_ids: Iterable[int]) -> dict[int, Health]: ...

    def update(self, datasource_id: int, change: Change) -> Health | None:
        """Atomically apply ``change`` to the stored record; the new record, or None when
        ``change`` declined (returned None)."""

    def clear(self, datasource_id: int | None = None) -> None:
        """Forget one datasource's record (or every record)."""

    def dropped(self) -> int:
        """Updates given up (contention past every retry) since counting began."""


# --- the database ----------------------------------------------------------------------------

_FIELDS = (
    "rate_limited_until",
    "failures",
    "first_failure_at",
    "open_until",
    "opened_at",
    "probe_until",
)
_TIMES = frozenset(_FIELDS) - {"failures"}


def _to_health(row: UpstreamHealth) -> Health:
    values = {}
    for name in _FIELDS:
        value = getattr(row, name)
        values[name] = value.timestamp() if name in _TIMES and value is not None else value
    return Health(**values)


def _to_row_values(health: Health) -> dict:
    values = {}
    for name in _FIELDS:
        value = getattr(health, name)
        values[name] = (
            datetime.fromtimestamp(value, UTC) if name in _TIMES and value is not None else value
        )
    return values


class DatabaseStore:
    def read(self, datasource_id: int) -> Health:
        row = UpstreamHealth.objects.filter(pk=datasource_id).first()
        return CLEAN if row is None else _to_health(row)

    def read_many(self, datasource_ids: Iterable[int]) -> dict[int, Health]:
        rows = UpstreamHealth.objects.filter(pk__in=list(datasource_ids))
        return {row.pk: _to_health(row) for row in rows}

    def update(self, datasource_id: int, change: Change) -> Health | None:
        for _ in range(3):
            try:
                with transaction.atomic():
                    row = (
                        UpstreamHealth.objects.select_for_update().filter(pk=datasource_id).first()
                    )
                    current = CLEAN if row is None else _to_health(row)
                    new = change(current)
                    if new is None or new == current:
                        return new
                    if new.clean:
                        UpstreamHealth.objects.filter(pk=datasource_id).delete()
                    elif row is None:
                        UpstreamHealth.objects.create(
                            datasource_id=datasource_id, **_to_row_values(new)
                        )
                    else:
                        UpstreamHealth.objects.filter(pk=datasource_id).update(
                            **_to_row_values(new)
                        )
                    return new
            except IntegrityError:
                # Another process created the row first (read again, under its lock), or the
                # datasource is gone (then the loop ends with nothing to remember).
                continue
        return None

    def dropped(self) -> int:
        """Row locks queue writers: an update is never dropped for contention."""
        return _dropped_here

    def clear(self, datasource_id: int | None = None) -> None:
        rows = UpstreamHealth.objects.all()
        if datasource_id is not None:
            rows = rows.filter(pk=datasource_id)
        rows.delete()


# --- Redis -----------------------------------------------------------------------------------


class RedisStore:
    """One JSON value per datasource under ``datasources:health:<id>``, expiring once nothing in
    it matters any more."""

    PREFIX = "datasources:health:"
    #: Outside PREFIX: clearing the records keeps the count.
    DROPPED_KEY = "datasources:health-updates-dropped"
    #: Seconds an update keeps trying under contention: generous, as every try that fails
    #: does so because another update succeeded.
    UPDATE_DEADLINE = 30.0

    def __init__(self, url: str) -> None:
        import redis

        self.redis = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self.errors: tuple[type[BaseException], ...] = (redis.RedisError,)
        self._watch_error = redis.WatchError

    def _key(self, datasource_id: int) -> str:
        return f"{self.PREFIX}{datasource_id}"

    @staticmethod
    def _decode(raw: bytes | None) -> Health:
        if not raw:
            return CLEAN
        try:
            return Health(**{k: v for k, v in json.loads(raw).items() if k in _FIELDS})
        except (ValueError, TypeError):
            return CLEAN

    def read(self, datasource_id: int) -> Health:
        return self._decode(self.redis.get(self._key(datasource_id)))

    def read_many(self, datasource_ids: Iterable[int]) -> dict[int, Health]:
        ids = list(datasource_ids)
        if not ids:
            return {}
        values = self.redis.mget([self._key(i) for i in ids])
        return {i: self._decode(raw) for i, raw in zip(ids, values, strict=True) if raw}

    def update(self, datasource_id: int, change: Change) -> Health | None:
        """Optimistic: read under WATCH, write in MULTI; a write by someone else in between
        aborts ours and it is applied again to their result. Retried (with a short random
        pause, so contenders stop colliding) until it applies or UPDATE_DEADLINE has passed:
        a failure count, a rate limit or an opened circuit must not be lost to contention.
        Dropped after all that, the update is logged and counted (``dropped``)."""
        key = self._key(datasource_id)
        deadline = time.monotonic() + self.UPDATE_DEADLINE
        collisions = 0
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    return self._apply(pipe, key, change)
                except self._watch_error:  # changed by another process meanwhile
                    collisions += 1
                    if time.monotonic() >= deadline:
                        break
                    time.sleep(random.uniform(0, 0.0005 * 2 ** min(collisions, 7)))
        self._drop(datasource_id, collisions)
        return None

    def _apply(self, pipe, key: str, change: Change) -> Health | None:
        pipe.watch(key)
        current = self._decode(pipe.get(key))
        new = change(current)
        if new is None or new == current:
            pipe.unwatch()
            return new
        pipe.multi()
        if new.clean:
            pipe.delete(key)
        else:
            pipe.set(key, json.dumps(new.__dict__), ex=_lifetime(new))
        pipe.execute()
        return new

    def _drop(self, datasource_id: int, collisions: int) -> None:
        """Count a dropped update where /metrics of every process sees it, and say so once."""
        global _dropped_here
        with _dropped_lock:
            _dropped_here += 1
        with contextlib.suppress(*self.errors):  # the process's own count still has it
            self.redis.incr(self.DROPPED_KEY)
        logger.warning(
            "Upstream health update of datasource %s dropped after %d conflicting writes in "
            "%.0f s (counted in datasources_health_updates_dropped_total)",
            datasource_id,
            collisions,
            self.UPDATE_DEADLINE,
        )

    def dropped(self) -> int:
        """Updates dropped so far, by every process (this one's if Redis cannot say)."""
        try:
            return max(int(self.redis.get(self.DROPPED_KEY) or 0), _dropped_here)
        except (*self.errors, ValueError):
            return _dropped_here

    def clear(self, datasource_id: int | None = None) -> None:
        if datasource_id is not None:
            self.redis.delete(self._key(datasource_id))
            return
        keys = list(self.redis.scan_iter(f"{self.PREFIX}*"))
        if keys:
            self.redis.delete(*keys)


def _lifetime(health: Health) -> int:
    """Seconds a record must outlive: its latest time plus the breaker window, at least a day
    while a circuit is open or failures are being counted."""
    times = [t for t in (health.rate_limited_until, health.open_until, health.probe_until) if t]
    horizon = max(times, default=time.time()) - time.time()
    return int(max(horizon, 0) + max(app_settings.BREAKER_WINDOW, 60) + 86400)


# --- the process's view ----------------------------------------------------------------------

_store: HealthStore | None = None
_store_lock = threading.Lock()
_dropped_here = 0  # updates this process dropped (a fallback when Redis cannot count them)
_dropped_lock = threading.Lock()
_cache: dict[int, tuple[float, Health]] = {}


def store() -> HealthStore:
    global _store
    if _store is None:
        with _store_lock:
            if _store is None:
                _store = _make_store()
    return _store


def _make_store() -> HealthStore:
    kind = app_settings.HEALTH_STORE
    url = getattr(settings, "REDIS_URL", "") or ""
    if kind == "redis" or (kind == "auto" and url):
        return RedisStore(url)
    return DatabaseStore()


def reset() -> None:
    """Use the configured store afresh and forget what this process remembers (tests,
    settings changes)."""
    global _store
    with _store_lock:
        _store = None
    _cache.clear()


def policy() -> limits.BreakerPolicy:
    return limits.BreakerPolicy(
        threshold=app_settings.BREAKER_THRESHOLD,
        window=app_settings.BREAKER_WINDOW,
        cooldown=app_settings.BREAKER_COOLDOWN,
        probe_seconds=app_settings.PROXY_CONNECT_TIMEOUT + app_settings.PROXY_READ_TIMEOUT + 5,
    )


def current(datasource_id: int) -> Health:
    """The datasource's record as this process knows it (read at most once per
    HEALTH_CACHE_SECONDS). A store that cannot be reached is taken as "nothing known"."""
    entry = _cache.get(datasource_id)
    now = time.monotonic()
    if entry is not None and entry[0] > now:
        return entry[1]
    try:
        health = store().read(datasource_id)
    except Exception as err:  # Redis down: never block calls because the memory is away
        _store_unavailable(err)
        health = CLEAN
    else:
        _store_answered()
    _remember(datasource_id, health, now)
    return health


#: When the store stopped answering (monotonic; None: it answers) and when that was last said.
_unavailable: dict[str, float | None] = {"since": None, "said": 0.0}
#: While the store is away, say so at most this often (a call per second would say it per call).
SAY_EVERY = 30.0


def _store_unavailable(err: Exception) -> None:
    now = time.monotonic()
    since = _unavailable["since"]
    if since is None:
        _unavailable["since"] = _unavailable["said"] = now
        logger.warning("Upstream health store unavailable (%s)", type(err).__name__)
    elif now - (_unavailable["said"] or 0.0) >= SAY_EVERY:
        _unavailable["said"] = now
        logger.warning(
            "Upstream health store still unavailable (%s) after %.0f s",
            type(err).__name__,
            now - since,
        )


def _store_answered() -> None:
    since = _unavailable["since"]
    if since is not None:
        _unavailable["since"] = None
        logger.warning("Upstream health store answers again after %.0f s", time.monotonic() - since)


def cached(datasource_id: int) -> Health | None:
    """The datasource's record if this process read it less than HEALTH_CACHE_SECONDS ago
    (no I/O: the fast lane asks this on its event loop), else None."""
    entry = _cache.get(datasource_id)
    if entry is not None and entry[0] > time.monotonic():
        return entry[1]
    return None


def _remember(datasource_id: int, health: Health, now: float | None = None) -> None:
    ttl = app_settings.HEALTH_CACHE_SECONDS
    if ttl > 0:
        if len(_cache) > 10_000:
            _cache.clear()
        _cache[datasource_id] = ((now or time.monotonic()) + ttl, health)
    else:
        _cache.pop(datasource_id, None)


def _update(datasource_id: int, change: Change) -> Health | None:
    try:
        new = store().update(datasource_id, change)
    except Exception as err:
        _store_unavailable(err)
        return None
    _store_answered()
    if new is not None:
        _remember(datasource_id, new)
    return new


def admit(datasource_id: int) -> Gate:
    """May a call to this datasource go upstream now? PASS, PROBE (this call is the circuit's
    one probe), or a refusal with its Retry-After."""
    if not app_settings.UPSTREAM_HEALTH:
        return Gate(Verdict.PASS)
    now = time.time()
    verdict = limits.gate(current(datasource_id), now)
    if verdict.verdict is not Verdict.PROBE:
        return verdict
    breaker = policy()
    claimed = _update(datasource_id, lambda health: limits.claim_probe(health, now, breaker))
    if claimed is None:  # someone else is the probe
        return Gate(Verdict.CIRCUIT_OPEN, 1.0)
    return Gate(Verdict.PROBE)


def observe(datasource, status: int, header: Callable[[str], str | None] | None) -> None:
    """Learn from one upstream answer (or connection error): rate limits, failures, recovery.
    Writes only when something changes. A refusal for lack of scope is remembered too
    (:mod:`.scopes`), whether or not the shared health is on."""
    scopes.learn(datasource, status, header)
    if not app_settings.UPSTREAM_HEALTH:
        return
    _learn(datasource, status, header, current(datasource.pk))


def observe_without_io(datasource, status: int, header: Callable[[str], str | None] | None) -> bool:
    """:func:`observe` when that needs no I/O (the record is cached and nothing changes):
    True. False: nothing was done, call :func:`observe` off the event loop (the fast lane)."""
    if status in (401, 403) and scopes.pending(datasource, status, header):
        return False
    if not app_settings.UPSTREAM_HEALTH:
        return True
    known = cached(datasource.pk)
    return known is not None and _changes(known, status, header, time.time()) is None


def _changes(
    known: Health, status: int, header: Callable[[str], str | None] | None, now: float
) -> Change | None:
    """What one answer changes in the record (None: nothing, nothing to write)."""
    until = (
        limits.rate_limited_until(
            status, header, now, max_seconds=app_settings.RATE_LIMIT_MAX_SECONDS
        )
        if header is not None
        else None
    )
    failure = limits.is_failure(status)
    recovering = not failure and status != 429 and (known.failures or known.open_until is not None)
    if until is None and not failure and not recovering:
        return None  # the common answer: asked on every call, so nothing more is built
    breaker = policy()
    if until is None and not (failure and breaker.threshold > 0) and not recovering:
        return None

    def change(health: Health) -> Health:
        health = limits.tidy(health, now)
        if until is not None:
            health = limits.after_rate_limit(health, until)
        if failure:
            health = limits.after_failure(health, now, breaker)
        elif status != 429:
            health = limits.after_success(health)
        return health

    return change


def _learn(
    datasource, status: int, header: Callable[[str], str | None] | None, known: Health
) -> None:
    change = _changes(known, status, header, time.time())
    if change is None:
        return
    before_open = known.open_until is not None
    new = _update(datasource.pk, change)
    if new is not None and new.open_until is not None and not before_open:
        logger.warning(
            "Circuit opened for datasource %s after %d consecutive upstream failures",
            datasource.slug,
            new.failures,
        )


@receiver(setting_changed)
def _settings_changed(*, setting: str, **kwargs) -> None:
    if setting in ("DATASOURCES", "REDIS_URL"):
        reset()


@receiver(post_delete, sender=Datasource)
def _forget_deleted(*, instance: Datasource, **kwargs) -> None:
    _cache.pop(instance.pk, None)
    if not isinstance(store(), DatabaseStore):  # the database row goes with the datasource
        try:
            store().clear(instance.pk)
        except Exception as err:
            logger.warning("Upstream health store unavailable (%s)", type(err).__name__)


def refusal(gate: Gate) -> tuple[int, str, str]:
    """(status, error code, message) for a refused call."""
    seconds = max(1, int(gate.retry_after + 0.999))
    if gate.verdict is Verdict.RATE_LIMITED:
        return (
            429,
            "rate_limited",
            f"The upstream API asked for a pause; try again in {seconds} s.",
        )
    return (
        503,
        "circuit_open",
        f"The upstream API has been failing; calls resume with one test call in {seconds} s.",
    )


def retry_after_header(gate: Gate) -> str:
    return str(max(1, int(gate.retry_after + 0.999)))
