"""What the proxy keeps in memory so its hot path does not query the database.

Verified API keys and each datasource's current token (with its datasource) are reused for
PROXY_CACHE_SECONDS. This process's own edits apply at once (the receivers below empty the
caches); edits, revocations and re-authorizations made in other processes within that time.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from django.db.models.signals import m2m_changed, post_delete, post_save
from django.dispatch import receiver

from ..conf import app_settings
from ..models import ApiKey, Datasource


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
            if len(self._data) >= self._max_entries:
                self._data.clear()
            self._data[key] = (time.monotonic() + ttl, value)

    def keep(self, key: Any, value: Any) -> None:
        """:meth:`put`, unless the entry holds this very object already: using a cached entry
        does not extend its life, so edits made in other processes show within
        PROXY_CACHE_SECONDS however busy the proxy is."""
        item = self._data.get(key)
        if item is None or item[1] is not value or item[0] <= time.monotonic():
            self.put(key, value)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


#: (slug, user id or None) -> Token, with its datasource loaded.
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
def _forget(**kwargs: Any) -> None:
    forget()
