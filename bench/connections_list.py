"""Benchmark: the JSON API's list of end users' connections at 100,000 end users (PostgreSQL).

One authorization-code datasource with --end-users token rows of end users (bulk-created:
``user-000000`` …; 95 % active, 4 % needing re-authorization, 1 % not authorized), then VACUUM
ANALYZE. Timed through the whole API (Django's test client: key check, query, serialization),
--runs calls each, median and p95:

* the first page (``GET …/connections?limit=100``);
* a middle page (``?cursor=<the id half way>``);
* a filtered page (``?status=needs_reauthorization``) and a filtered middle page;
* one end user (``?end_user=<id>``).

Then the plans of the page queries (EXPLAIN ANALYZE): pages walk the (datasource, end_user)
unique index from the cursor, so a page costs the same wherever it is. Goal: well under a
second per page (it is milliseconds).

    python bench/connections_list.py [--end-users 100000] [--runs 20] [--limit 100]

BENCH_DATABASE_URL: a PostgreSQL database it drops and creates again (default
postgres://postgres@127.0.0.1:5432/bench_connections). About a minute on a 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DB = "postgres://postgres@127.0.0.1:5432/bench_connections"
GOAL_MS = 1000.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--end-users", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--limit", type=int, default=100)
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from bench.sweep_scale import recreate_database

    url = os.environ.get("BENCH_DATABASE_URL", DEFAULT_DB)
    if not url.startswith("postgres"):
        raise SystemExit("BENCH_DATABASE_URL must be a PostgreSQL database")
    os.environ.update(
        DATABASE_URL=url,
        ENV_FILE="/dev/null",
        DJANGO_SETTINGS_MODULE="config.settings",
        LOG_LEVEL="WARNING",
        DATA_DIR=str(ROOT / "var" / "bench-connections"),
    )
    os.environ.setdefault("SECRET_KEY", "bench-secret-key")
    os.environ.setdefault("FERNET_KEYS", "bench-fernet-key-0123456789")
    recreate_database(url)

    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command
    from django.db import connection

    settings.ALLOWED_HOSTS = ["*"]
    warnings.filterwarnings("ignore", message="No directory at")  # static files: not served
    call_command("migrate", verbosity=0)
    with connection.cursor() as cursor:
        cursor.execute("SELECT version()")
        print(cursor.fetchone()[0].split(" on ")[0])

    datasource = seed(args.end_users)
    from datasources.proxy.apikeys import create_api_key

    _, key = create_api_key("bench", permissions=("manage",), datasources=[datasource])
    from django.test import Client

    client = Client(HTTP_AUTHORIZATION=f"Api-Key {key}")
    base = f"/api/v1/datasources/{datasource.slug}/connections?limit={args.limit}"
    middle = f"user-{args.end_users // 2:06d}"
    cases = [
        ("first page", base),
        ("middle page (cursor)", f"{base}&cursor={middle}"),
        ("filtered: status", f"{base}&status=needs_reauthorization"),
        ("filtered: status, middle", f"{base}&status=needs_reauthorization&cursor={middle}"),
        ("filtered: one end user", f"{base}&end_user={middle}"),
    ]
    print(f"\n{args.end_users:,} end users, limit {args.limit}, {args.runs} runs each")
    print(f"{'page':<28} {'items':>5} {'median ms':>10} {'p95 ms':>8}")
    worst = 0.0
    for name, path in cases:
        items, times = timed(client, path, args.runs)
        worst = max(worst, p95(times))
        print(f"{name:<28} {items:>5} {statistics.median(times):>10.1f} {p95(times):>8.1f}")
    verdict = "met" if worst < GOAL_MS else "MISSED"
    print(f"goal: every page under {GOAL_MS:.0f} ms (p95): {verdict} (worst p95 {worst:.1f} ms)")
    print()
    explain(datasource, middle, args.limit)


def seed(count: int):
    """The datasource and ``count`` end users' token rows, bulk-created."""
    from django.db import connection
    from django.utils import timezone

    from datasources.models import Datasource, Token

    datasource = Datasource(
        name="Bench API",
        slug="bench",
        base_url="https://api.example.com/",
        grant_type="authorization_code",
        authorization_url="https://auth.example.com/authorize",
        access_token_url="https://auth.example.com/token",
        client_id="bench",
        client_secret="bench-secret",
    )
    datasource.full_clean()
    datasource.save()
    now = timezone.now()
    started = time.perf_counter()
    batch: list[Token] = []
    for i in range(count):
        if i % 100 < 95:
            status, error = "active", ""
        elif i % 100 < 99:
            status, error = "needs_reauthorization", "invalid_grant: the grant was revoked"
        else:
            status, error = "not_authorized", ""
        batch.append(
            Token(
                datasource=datasource,
                end_user=f"user-{i:06d}",
                access_token=f"access-{i}" if status != "not_authorized" else None,
                refresh_token=f"refresh-{i}" if status != "not_authorized" else None,
                token_type="Bearer",
                status=status,
                last_error=error,
                expires_at=now + timedelta(seconds=i % 3600),
                obtained_at=now - timedelta(days=1),
                last_refreshed_at=now - timedelta(seconds=i % 3600),
            )
        )
        if len(batch) == 5000:
            Token.objects.bulk_create(batch)
            batch = []
    if batch:
        Token.objects.bulk_create(batch)
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE datasources_token")
    print(f"seeded {count:,} end users in {time.perf_counter() - started:.1f} s")
    return datasource


def timed(client, path: str, runs: int) -> tuple[int, list[float]]:
    import json

    response = client.get(path)  # warm (connection, key row, plan)
    assert response.status_code == 200, response.content[:300]
    items = len(json.loads(response.content)["items"])
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        response = client.get(path)
        times.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200
    return items, times


def explain(datasource, middle: str, limit: int) -> None:
    """The plans of the middle page's and the filtered page's queries, as the API runs them."""
    from django.db import connection

    from datasources.api.endpoints import _CONNECTION_FIELDS
    from datasources.models import Token

    rows = Token.objects.of_end_users().filter(datasource=datasource, user=None)
    for name, queryset in (
        ("middle page", rows.filter(end_user__gt=middle)),
        ("filtered page", rows.filter(status="needs_reauthorization")),
    ):
        query = queryset.order_by("end_user").only(*_CONNECTION_FIELDS)[: limit + 1]
        sql, params = query.query.sql_with_params()
        with connection.cursor() as cursor:
            cursor.execute(f"EXPLAIN (ANALYZE, BUFFERS) {sql}", params)
            plan = "\n".join("    " + row[0] for row in cursor.fetchall())
        print(f"plan, {name}:\n{plan}\n")


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


if __name__ == "__main__":
    main()
