"""Issue 30: nothing the proxy holds in memory is lost when the database refuses a write.

Usage counts and call-log rows are batched in memory and written by flushes (the view's, in
the request's thread; the fast lane's, a background task in the thread pool). While the
database refuses them (here: an ``OperationalError`` for every write to their tables, as during
a PostgreSQL restart), each flush keeps what it could not write, and the first flush after the
database is back writes it, adding up exactly. What is held is bounded; what the bound drops is
counted in /metrics. Both serving paths (the ``serving`` fixture).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from django.db import OperationalError, connection
from django.test import Client

from datasources.models import LATENCY_BUCKETS_MS, DatasourceUsage, ProxyCall
from datasources.proxy import calllog, usage
from datasources.proxy.apikeys import create_api_key

from .flaky import status
from .test_retries import flaky_datasource

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("serving")]

_TABLES = (DatasourceUsage._meta.db_table, ProxyCall._meta.db_table)
#: A database URL with its password, as some database errors' messages carry it.
DSN = "postgres://user:db-secret@db/x"


@dataclass
class Refusal:
    """Refuses INSERT and UPDATE statements into the usage and call-log tables while ``on``."""

    on: bool = False
    refused: int = 0

    def __call__(self, execute, sql, params, many, context):
        statement = sql.lstrip().upper()
        if (
            self.on
            and statement.startswith(("INSERT", "UPDATE"))
            and any(table.upper() in statement for table in _TABLES)
        ):
            self.refused += 1
            raise OperationalError(f"could not connect to {DSN}")
        return execute(sql, params, many, context)


@pytest.fixture
def refusal() -> Iterator[Refusal]:
    """The database's refusal, on this thread's connection: the one the view and (in the
    tests' harness) the lane's pool jobs use."""
    refuse = Refusal()
    with connection.execute_wrapper(refuse):
        yield refuse


@pytest.fixture
def app() -> Client:
    _, key = create_api_key("held-app")
    return Client(HTTP_AUTHORIZATION=f"Api-Key {key}")


def tune(settings, **values) -> None:
    settings.DATASOURCES = {**settings.DATASOURCES, **values}


def dropped(staff_client) -> dict[str, int]:
    """The dropped counters /metrics shows."""
    text = staff_client.get("/metrics").content.decode()
    values = dict(
        line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#")
    )
    return {
        name: int(values[f"datasources_{name}_dropped_total"]) for name in ("usage", "call_log")
    }


def usage_of(datasource) -> DatasourceUsage | None:
    return DatasourceUsage.objects.filter(datasource=datasource).first()


def test_what_a_failed_flush_kept_is_written_by_the_next(
    flaky, app, settings, refusal, caplog, serving
):
    tune(settings, USAGE_FLUSH_INTERVAL=0, CALL_LOG_FLUSH_INTERVAL=0)  # every call flushes
    datasource = flaky_datasource(flaky)
    base = f"/api/v1/datasources/{datasource.slug}/proxy/"
    caplog.set_level(logging.WARNING)
    refusal.on = True
    for n in range(3):
        assert app.get(f"{base}items/{n}").status_code == 200  # no 500 for a failed flush
    flaky.script("/api/broken", status(500))
    assert app.get(f"{base}broken").status_code == 500  # the upstream's own 500, relayed
    assert refusal.refused >= 8  # both batches were tried after every call, and refused
    assert ProxyCall.objects.count() == 0 and usage_of(datasource) is None
    assert (usage.held(), calllog.held()) == (4, 4)

    refusal.on = False
    assert app.get(f"{base}items/last").status_code == 200
    assert (usage.held(), calllog.held()) == (0, 0)
    rows = list(ProxyCall.objects.order_by("id").values_list("path", "status"))
    paths = ["items/0", "items/1", "items/2", "broken", "items/last"]
    assert rows == [(path, 500 if path == "broken" else 200) for path in paths]
    counted = usage_of(datasource)
    assert (counted.calls, counted.errors, counted.last_status) == (5, 1, 200)
    buckets = [getattr(counted, f"latency_le_{le}") for le in LATENCY_BUCKETS_MS]
    assert sum(buckets) <= 5 and counted.total_duration_ms >= 0

    # Logged once per outage and kind (not once per failed flush), and once when it ends.
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if m.startswith("Usage counts not written")]) == 1
    assert len([m for m in messages if m.startswith("Call log rows not written")]) == 1
    assert "Usage counts written again after failed flushes" in messages
    assert "Call log rows written again after failed flushes" in messages
    assert "Task exception was never retrieved" not in caplog.text
    assert "OperationalError" in caplog.text  # what failed, by name only:
    assert "db-secret" not in caplog.text  # a database error's message can carry a password


def test_held_rows_are_bounded_and_the_dropped_ones_counted(
    flaky, app, settings, refusal, staff_client
):
    tune(settings, CALL_LOG_MAX_BUFFER=2, CALL_LOG_FLUSH_INTERVAL=3600, USAGE_FLUSH_INTERVAL=0)
    bound = calllog.max_held()
    assert bound == 2 * calllog.HELD_BUFFERS
    datasource = flaky_datasource(flaky)
    base = f"/api/v1/datasources/{datasource.slug}/proxy/"
    before = dropped(staff_client)
    refusal.on = True
    calls = bound + 5
    for n in range(calls):
        assert app.get(f"{base}items/{n}").status_code == 200
    assert calllog.held() == bound
    during = dropped(staff_client)
    assert during["call_log"] - before["call_log"] == calls - bound
    assert during["usage"] == before["usage"]  # one entry per datasource: nothing to drop

    refusal.on = False
    assert app.get(f"{base}items/last").status_code == 200  # makes the flush due
    after = dropped(staff_client)
    lost = after["call_log"] - before["call_log"]
    written = list(ProxyCall.objects.order_by("id").values_list("path", flat=True))
    assert len(written) + lost == calls + 1  # every row written once, or counted as dropped
    assert written == [f"items/{n}" for n in range(lost, calls)] + ["items/last"]  # the newest
    assert calllog.held() == 0
    assert usage_of(datasource).calls == calls + 1  # the counts lost nothing


def test_usage_held_for_too_many_datasources_is_dropped_and_counted(
    flaky, app, settings, refusal, staff_client, monkeypatch
):
    tune(settings, USAGE_FLUSH_INTERVAL=0)
    monkeypatch.setattr(usage, "MAX_HELD_DATASOURCES", 1)
    first = flaky_datasource(flaky)
    second = flaky_datasource(flaky, slug="flaky-two", name="Flaky API two")
    before = dropped(staff_client)
    refusal.on = True
    assert app.get(f"/api/v1/datasources/{first.slug}/proxy/a").status_code == 200
    assert app.get(f"/api/v1/datasources/{second.slug}/proxy/b").status_code == 200
    assert dropped(staff_client)["usage"] - before["usage"] == 1
    refusal.on = False
    assert app.get(f"/api/v1/datasources/{first.slug}/proxy/c").status_code == 200
    assert usage_of(first).calls == 2
    assert usage_of(second) is None


@pytest.mark.parametrize("serving", ["asgi"], indirect=True)  # the lane's own flush
def test_a_lane_flush_that_fails_is_logged_once_not_left_in_its_task(
    flaky, app, settings, caplog, monkeypatch, serving
):
    """The lane's flush is a background task nobody awaits: an error in it is retrieved and
    logged by the task itself, once, never asyncio's "Task exception was never retrieved"."""
    from datasources.proxy import lane as fast_lane

    from .serving import LANE

    def broken(counts: bool, log: bool) -> None:
        raise RuntimeError(f"the flush broke: {DSN}")

    monkeypatch.setattr(fast_lane, "_flush", broken)
    tune(settings, USAGE_FLUSH_INTERVAL=0, CALL_LOG_FLUSH_INTERVAL=0)
    datasource = flaky_datasource(flaky)
    served = LANE.served
    caplog.set_level(logging.WARNING)
    assert app.get(f"/api/v1/datasources/{datasource.slug}/proxy/x").status_code == 200
    assert LANE.served == served + 1
    assert LANE._flushing is not None and LANE._flushing.done()
    assert LANE._flushing.exception() is None  # retrieved inside the task
    records = [r for r in caplog.records if r.name == fast_lane.logger.name]
    assert len(records) == 1
    logged = records[0].getMessage()
    assert "flush failed (RuntimeError)" in logged and "in broken" in logged  # what and where
    assert "db-secret" not in caplog.text
