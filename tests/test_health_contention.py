"""Redis health updates under contention: every update applies (retried until it does, within
a generous deadline); one that still cannot is logged once and counted in /metrics. Against
the real Redis at 127.0.0.1:6379, on database 14 (cleaned up after)."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import replace

import pytest
import redis
from django.test import Client

from datasources.calls import health
from datasources.calls.limits import CLEAN, Health

from .conftest import make_datasource

URL = "redis://127.0.0.1:6379/14"
THREADS = 16
UPDATES = 40


@pytest.fixture
def store() -> Iterator[health.RedisStore]:
    try:
        redis.Redis.from_url(URL, socket_connect_timeout=2).ping()
    except redis.RedisError as err:
        if os.environ.get("CI"):
            raise  # CI has Redis: never skipped there
        pytest.skip(f"needs Redis at {URL}: {err}")
    made = health.RedisStore(URL)
    made.redis.flushdb()
    yield made
    made.redis.flushdb()
    made.redis.close()


def _one_more(current: Health) -> Health:
    return replace(current, failures=current.failures + 1)


def test_every_concurrent_update_of_one_key_applies(store, caplog):
    """16 threads, each with its own connection, add 40 failures each to the same record at
    once: all 640 are there, none dropped, nothing logged."""
    dropped = store.dropped()
    start = threading.Barrier(THREADS)
    results: list[Health | None] = []
    lock = threading.Lock()

    def add() -> None:
        mine = health.RedisStore(URL)
        start.wait()
        for _ in range(UPDATES):
            new = mine.update(7, _one_more)
            with lock:
                results.append(new)
        mine.redis.close()

    with caplog.at_level(logging.WARNING, logger="datasources"):
        threads = [threading.Thread(target=add) for _ in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    assert store.read(7).failures == THREADS * UPDATES
    assert None not in results and len(results) == THREADS * UPDATES
    assert store.dropped() == dropped
    assert "dropped" not in caplog.text


@pytest.mark.django_db
def test_an_update_that_cannot_apply_is_logged_once_and_counted(
    store, monkeypatch, caplog, settings
):
    """Another writer changes the record on every try until the deadline: the update is
    dropped, one WARNING says so (not one per try), and /metrics counts it."""
    other = redis.Redis.from_url(URL)
    dropped = store.dropped()
    monkeypatch.setattr(health.RedisStore, "UPDATE_DEADLINE", 0.2)
    tries = 0

    def always_overtaken(current: Health) -> Health:
        nonlocal tries
        tries += 1
        other.set(store._key(9), f'{{"failures": {tries}}}')  # someone else wrote meanwhile
        return _one_more(current)

    with caplog.at_level(logging.WARNING, logger="datasources"):
        assert store.update(9, always_overtaken) is None
    other.close()
    assert tries > 1
    warnings = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert store.dropped() == dropped + 1
    assert store.read(3) == CLEAN

    make_datasource()
    settings.REDIS_URL = URL
    settings.DATASOURCES = {
        **settings.DATASOURCES,
        "HEALTH_STORE": "redis",
        "METRICS_TOKEN": "scrape-me",
    }
    try:
        text = Client().get("/metrics", HTTP_AUTHORIZATION="Bearer scrape-me").content.decode()
    finally:
        health.reset()
    assert "# TYPE datasources_health_updates_dropped_total counter" in text
    count = [x for x in text.splitlines() if x.startswith("datasources_health_updates_dropped_")]
    assert count and int(count[0].split()[-1]) >= 1
