"""The proxy's process cache when it is full (tens of thousands of end users and keys): it drops
what has run out, then the older half, never everything at once (the busiest entries, e.g. the
shared tokens every caller uses, stay); an entry read again is kept as the newest."""

from __future__ import annotations

import pytest

from datasources.proxy.cache import TTLCache


@pytest.fixture(autouse=True)
def seconds(settings):
    settings.DATASOURCES = {
        **settings.DATASOURCES,
        "PROXY_CACHE_SECONDS": 60,
        "PROXY_STALE_IF_ERROR": 0,
    }


def test_a_full_cache_drops_the_older_half_not_everything():
    cache = TTLCache(max_entries=10)
    for n in range(10):
        cache.put(n, f"value-{n}")
    cache.put(0, "value-0 again")  # used again: now the newest
    cache.put("new", "value-new")  # full: make room
    kept = [n for n in [*range(10), "new"] if cache.get(n) is not None]
    assert kept == [0, 6, 7, 8, 9, "new"]
    assert cache.get(0) == "value-0 again"


def test_entries_past_their_time_go_first(settings, monkeypatch):
    from datasources.proxy import cache as module

    clock = [1000.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: clock[0])
    cache = TTLCache(max_entries=4)
    cache.put("old-1", 1)
    cache.put("old-2", 2)
    clock[0] += 61  # those two ran out
    cache.put("fresh-1", 3)
    cache.put("fresh-2", 4)
    cache.put("fresh-3", 5)  # full: only the two that ran out are dropped
    assert [cache.get(k) for k in ("fresh-1", "fresh-2", "fresh-3")] == [3, 4, 5]
    assert len(cache._data) == 3
