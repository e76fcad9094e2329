"""Benchmark: background refresh of N tokens expiring within the margin.

Seeds N authorization-code datasources whose tokens expire soon, starts a local token endpoint
and real Celery workers, runs one sweep, and waits until every token is refreshed. Prints wall
time, refreshes/s, token-endpoint calls (must equal N: no duplicates, no reused refresh token),
database queries per refresh (measured in-process for two batch sizes: must be constant), and
the ratio to a baseline measured in the same run: the raw token endpoint driven directly by the
same number of client threads with no database at all.

    python bench/refresh_sweep.py [--tokens 10000] [--workers 2] [--concurrency 8]

Uses BENCH_DATABASE_URL (a database it may wipe; default: a fresh SQLite file under var/bench)
and REDIS_URL for the broker
(default redis://127.0.0.1:6379/15 when reachable, else the filesystem broker).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "var" / "bench"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--pool", default="prefork", choices=["prefork", "threads", "solo"])
    args = parser.parse_args()

    shutil.rmtree(BENCH_DIR, ignore_errors=True)
    BENCH_DIR.mkdir(parents=True)
    env = dict(os.environ)
    # A dedicated database: the benchmark deletes every datasource in it first.
    env["DATABASE_URL"] = os.environ.get(
        "BENCH_DATABASE_URL", f"sqlite:///{BENCH_DIR / 'bench.sqlite3'}"
    )
    env.setdefault("SECRET_KEY", "bench-secret-key")
    env.setdefault("FERNET_KEYS", "bench-fernet-key-0123456789")
    env["DATA_DIR"] = str(BENCH_DIR)
    env["DJANGO_SETTINGS_MODULE"] = "config.settings"
    env["LOG_LEVEL"] = "WARNING"
    env["DATASOURCES_SWEEP_BATCH_SIZE"] = str(args.tokens)
    env["DATASOURCES_SWEEP_INTERVAL"] = "3600"  # the benchmark triggers the one sweep itself
    env["CELERY_TASK_DEFAULT_QUEUE"] = f"bench-{uuid.uuid4().hex[:8]}"
    env["CELERY_BROKER_URL"] = broker_url(env)
    os.environ.update(env)
    sys.path.insert(0, str(ROOT))

    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    from datasources.models import Datasource

    Datasource.objects.all().delete()
    vacuum(full=True)

    server = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "token_server.py")], stdout=subprocess.PIPE, text=True
    )
    port = int(server.stdout.readline())
    token_url = f"http://127.0.0.1:{port}/token"
    try:
        baseline_rate = baseline(token_url, args.workers * args.concurrency, min(args.tokens, 3000))
        queries = queries_per_refresh(token_url)
        seed(args.tokens, token_url)
        vacuum(full=False)
        calls_before = count(port)
        rate, wall = run_workers(args, env, port, calls_before)
        stats = json.loads(http_get(f"http://127.0.0.1:{port}/count"))
        calls = stats["calls"] - calls_before
    finally:
        server.terminate()

    print()
    print(
        f"database: {env['DATABASE_URL'].split('://')[0]}, broker: {env['CELERY_BROKER_URL'].split('://')[0]}"
    )
    print(f"workers: {args.workers} x concurrency {args.concurrency} ({args.pool} pool)")
    print(f"tokens refreshed:            {args.tokens}")
    print(f"wall time:                   {wall:.2f} s")
    print(f"refreshes per second:        {rate:.0f}  (target >= 200)")
    print(f"token-endpoint calls:        {calls}  (must equal {args.tokens})")
    print(f"reused refresh tokens:       {stats['reused_refresh_tokens']}  (must be 0)")
    print(
        f"queries per refresh:         {queries[0]:.1f} (batch of 10), {queries[1]:.1f} (batch of 100)"
    )
    print(f"baseline (raw endpoint, no DB, same client threads): {baseline_rate:.0f} calls/s")
    print(f"ratio ours / raw endpoint:   {rate / baseline_rate:.2f}")
    ok = calls == args.tokens and stats["reused_refresh_tokens"] == 0 and queries[0] == queries[1]
    sys.exit(0 if ok else 1)


def broker_url(env: dict[str, str]) -> str:
    url = env.get("CELERY_BROKER_URL") or env.get("REDIS_URL") or "redis://127.0.0.1:6379/15"
    if url.startswith("redis"):
        import redis

        try:
            redis.Redis.from_url(url, socket_connect_timeout=1).ping()
            return url
        except redis.RedisError:
            print("Redis not reachable: using the filesystem broker (much slower for 10k tasks)")
    return "filesystem://"


def vacuum(*, full: bool) -> None:
    """Start every run from the same table state on PostgreSQL.

    Each run deletes and rewrites tens of thousands of rows; where autovacuum is off (as on the
    machine these numbers were recorded on) the dead rows pile up and every later run is slower
    than the one before, and the seeding's dirty pages would otherwise be flushed by a
    checkpoint in the middle of the timed run. Without this the benchmark would measure its own
    history.
    """
    from django.db import DatabaseError, connection

    from datasources.models import Datasource, Token, TokenEvent

    if connection.vendor != "postgresql":
        return
    tables = [m._meta.db_table for m in (Datasource, Token, TokenEvent)]
    with connection.cursor() as cursor:
        for table in tables:
            cursor.execute(f"VACUUM {'FULL ' if full else ''}ANALYZE {table}")
        if not full:
            # Write out the seeding's dirty pages now rather than during the timed run.
            try:
                cursor.execute("CHECKPOINT")
            except DatabaseError:
                print("CHECKPOINT not allowed for this database user: skipped")


def http_get(url: str) -> str:
    import requests

    return requests.get(url, timeout=10).text


def count(port: int) -> int:
    return json.loads(http_get(f"http://127.0.0.1:{port}/count"))["calls"]


def make_datasource_rows(n: int, token_url: str, prefix: str):
    from datasources.models import Datasource

    return [
        Datasource(
            name=f"{prefix} {i}",
            slug=f"{prefix}-{i}",
            base_url="http://127.0.0.1:9/",
            grant_type="authorization_code",
            authorization_url="http://127.0.0.1:9/authorize",
            access_token_url=token_url,
            client_id=f"client-{i}",
            client_secret="bench-secret",
            client_authentication="body",
        )
        for i in range(n)
    ]


def seed(n: int, token_url: str, prefix: str = "bench") -> list[int]:
    from django.utils import timezone

    from datasources.models import Datasource, Token

    now = timezone.now()
    created = Datasource.objects.bulk_create(
        make_datasource_rows(n, token_url, prefix), batch_size=1000
    )
    Token.objects.bulk_create(
        [
            Token(
                datasource=ds,
                access_token=f"seed-access-{ds.pk}",
                refresh_token=f"seed-refresh-{ds.pk}",
                status="active",
                # Hourly tokens a minute from expiry: due (a margin is capped at half the
                # lifetime, so a token issued just now with a 60 s life would not be).
                expires_at=now + timedelta(seconds=60),
                obtained_at=now - timedelta(seconds=3540),
                last_refreshed_at=now - timedelta(seconds=3540),
                refresh_due_at=now,  # what a store of such a token would have written
            )
            for ds in created
        ],
        batch_size=1000,
    )
    return [ds.pk for ds in created]


def queries_per_refresh(token_url: str) -> tuple[float, float]:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from datasources.models import Datasource, Token
    from datasources.tasks import refresh

    results = []
    for size in (10, 100):
        ids = seed(size, token_url, prefix=f"q{size}")
        batch = list(Token.objects.filter(datasource_id__in=ids).values_list("pk", flat=True))
        with CaptureQueriesContext(connection) as ctx:
            for token_id in batch:  # the whole task body, from its token id
                assert refresh.run(token_id) == "refreshed"
        results.append(len(ctx.captured_queries) / size)
        Datasource.objects.filter(pk__in=ids).delete()
    return results[0], results[1]


def baseline(token_url: str, threads: int, calls: int) -> float:
    import requests

    local = __import__("threading").local()

    def one(i: int) -> None:
        session = getattr(local, "s", None) or requests.Session()
        local.s = session
        session.post(
            token_url, data={"grant_type": "refresh_token", "refresh_token": f"b{i}"}, timeout=10
        )

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(calls)))
    return calls / (time.perf_counter() - started)


def run_workers(args, env, port: int, calls_before: int) -> tuple[float, float]:
    from datasources.models import Token
    from datasources.tasks import sweep

    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "config",
                "worker",
                "--loglevel=WARNING",
                f"--concurrency={args.concurrency}",
                "-Q",
                env["CELERY_TASK_DEFAULT_QUEUE"],
                f"--hostname=bench{i}-{uuid.uuid4().hex[:6]}@%h",
                "--without-mingle",
                "--without-gossip",
            ],
            cwd=ROOT,
            env=env,
        )
        for i in range(args.workers)
    ]
    try:
        time.sleep(4)  # let the workers boot before the clock starts
        started = time.perf_counter()
        sweep.delay()
        while True:
            done = count(port) - calls_before
            if done >= args.tokens:
                break
            if any(p.poll() is not None for p in procs):
                raise SystemExit("a worker died")
            time.sleep(0.1)
        # wait until the last results are stored too
        while (
            Token.objects.filter(
                refresh_count__gte=1, datasource__slug__startswith="bench-"
            ).count()
            < args.tokens
        ):
            time.sleep(0.1)
        wall = time.perf_counter() - started
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
    return args.tokens / wall, wall


if __name__ == "__main__":
    main()
