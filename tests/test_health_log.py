"""The upstream health store (Redis) down says so once, not once per call: a soak with Redis
away for 30 s logged ~5 lines a second before. Then once more every SAY_EVERY seconds, and
once when it answers again."""

from __future__ import annotations

import logging

import pytest

from datasources.calls import health
from datasources.calls.limits import CLEAN


class Away:
    def read(self, datasource_id):
        raise ConnectionError("redis down")

    def update(self, datasource_id, change):
        raise ConnectionError("redis down")


class Back:
    def read(self, datasource_id):
        return CLEAN

    def update(self, datasource_id, change):
        return None


@pytest.fixture(autouse=True)
def fresh(monkeypatch, settings):
    settings.DATASOURCES = {**settings.DATASOURCES, "HEALTH_CACHE_SECONDS": 0}
    monkeypatch.setitem(health._unavailable, "since", None)
    monkeypatch.setitem(health._unavailable, "said", 0.0)
    yield
    health.reset()


def test_an_unavailable_store_is_said_once_then_its_return(monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="datasources.calls.health")
    monkeypatch.setattr(health, "store", lambda: Away())
    for datasource_id in range(50):
        assert health.current(datasource_id) == CLEAN  # calls go on without the memory
        health._update(datasource_id, lambda h: h)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["Upstream health store unavailable (ConnectionError)"]

    monkeypatch.setattr(health, "store", lambda: Back())
    health.current(1)
    health.current(2)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[1].startswith("Upstream health store answers again after")


def test_a_long_outage_is_said_again_every_so_often(monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="datasources.calls.health")
    monkeypatch.setattr(health, "store", lambda: Away())
    clock = [1000.0]
    monkeypatch.setattr(health.time, "monotonic", lambda: clock[0])
    health.current(1)
    clock[0] += health.SAY_EVERY - 1
    health.current(2)
    clock[0] += 2
    health.current(3)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "still unavailable" in lines[1] and "after 31 s" in lines[1]
