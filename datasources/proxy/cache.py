"""What the proxy keeps in memory so its hot path does not query the database.

Verified API keys and each datasource's current token (with its datasource) are reused for
PROXY_CACHE_SECONDS. This process's own edits apply at once (the receivers below empty the
caches); edits, revocations and re-authorizations made in other processes within that time.

While the database is away (a restart, a failover), an entry past its time still serves for
PROXY_STALE_IF_ERROR seconds more (:meth:`TTLCache.if_error`, stale-if-error): a caller the
process already knows keeps working through a restart, and after that bound a key revoked
meanwhile stops working. The token is never used past its own expiry (the token rules decide
that, not this cache). Anything not cached is 503 ``database_unavailable``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from django.db.models.signals import m2m_changed, post_delete, post_save
from django.dispatch import receiver

from ..conf import app_settings
from ..exceptions import is_database_outage
from ..models import ApiKey, Datasource, Token
from ..ops import counters

logger = logging.getLogger(__name__)


class TTLCache:
    """A small thread-safe map whose entries live PROXY_CACHE_SECONDS (0: nothing is kept)."""

    def __init__(self, max_entries: int = 10_000) -> None:
        self._data: dict[Any, tuple[float, Any]] = {}
        self._lock = threading.Lock()
        self._max_entries = max_entries

    def get(self, key: Any) -> Any:
        item = self._data.get(key)
        if item is not None and item[0] > time.monotonic():
            return item[1]
        return None

    def put(self, key: Any, value: Any) -> None:
        ttl = app_settings.PROXY_CACHE_SECONDS
        if ttl <= 0:
            return
        with self._lock:
            if len(self._data) >= self._max_entries and key not in self._data:
                self._make_room()
            self._data.pop(key, None)  # re-inserted last: the dict's order is the entries' age
            self._data[key] = (time.monotonic() + ttl, value)

    def _make_room(self) -> None:
        """Full (many end users, many keys): drop what is past its time and stale-if-error
        bound, else the older half (insertion order), rather than everything: the busy entries,
        the shared tokens among them, stay."""
        limit = time.monotonic() - app_settings.PROXY_STALE_IF_ERROR
        for key in [k for k, (expires, _) in self._data.items() if expires <= limit]:
            del self._data[key]
        if len(self._data) >= self._max_entries:
            for key in list(self._data)[: len(self._data) // 2]:
                del self._data[key]

    def keep(self, key: Any, value: Any) -> None:
        """:meth:`put`, unless the entry holds this very object already: using a cached entry
        does not extend its life, so edits made in other processes show within
        PROXY_CACHE_SECONDS however busy the proxy is."""
        item = self._data.get(key)
        if item is None or item[1] is not value or item[0] <= time.monotonic():
            self.put(key, value)

    def if_error(self, key: Any, err: BaseException) -> Any:
        """What serves ``key`` while the database is away (``err`` says so): the entry even
        past its time, up to PROXY_STALE_IF_ERROR seconds past it; else None (the caller
        raises ``err``: 503 database_unavailable). Counted and logged (not once per call)."""
        if not is_database_outage(err):
            return None
        item = self._data.get(key)
        if item is None or item[0] + app_settings.PROXY_STALE_IF_ERROR <= time.monotonic():
            return None
        counters.add(counters.STALE_SERVED)
        _say_stale(err)
        return item[1]

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


#: When serving from stale entries was last logged (monotonic seconds).
_stale_said = -60.0


def _say_stale(err: BaseException) -> None:
    global _stale_said
    now = time.monotonic()
    if now - _stale_said >= 10:
        _stale_said = now
        logger.warning(
            "the database is unavailable (%s): serving calls this process already knows from "
            "its caches for up to %g s (PROXY_STALE_IF_ERROR)",
            type(err).__name__,
            app_settings.PROXY_STALE_IF_ERROR,
        )


#: (slug, user id or None[, end user]) -> Token, with its datasource loaded
#: (:func:`datasources.calls.call.cache_key`).
tokens = TTLCache()
#: apikeys.hash_key(key) -> callers.Caller
keys = TTLCache()


def forget() -> None:
    """Drop everything this process remembers (after an edit, a revocation, a deletion)."""
    tokens.clear()
    keys.clear()


@receiver(post_save, sender=Datasource)
@receiver(post_delete, sender=Datasource)
@receiver(post_save, sender=ApiKey)
@receiver(post_delete, sender=ApiKey)
@receiver(m2m_changed, sender=ApiKey.datasources.through)
@receiver(post_delete, sender=Token)  # a disconnected end user: 409 at once in this process
def _forget(**kwargs: Any) -> None:
    forget()
