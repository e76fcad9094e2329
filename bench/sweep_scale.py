"""Benchmark: the sweep's selection of due tokens at 10 k, 100 k and 1 M tokens, and a steady state.

Part 1, selection (PostgreSQL). For each size the tables are filled with bulk SQL (1,000 per-user
datasources x size/1,000 users, INSERT ... SELECT over a cross join: seconds, not ORM loops):
active tokens whose expiries are spread over 24 h (24 h lifetimes, last refreshed one lifetime
before expiry, ``refresh_due_at`` = expiry - 300 s) so that 1 % are due, 2 % needing
re-authorization (no due time), 0.1 % leased. Then VACUUM ANALYZE, and ``due_token_ids(1000)``
is timed (median and p95 of --runs calls), interleaved with its own SQL run raw and with the
pre-#14 selection (the OR of five conditions joined to the datasource, as raw SQL, on the old
``next_attempt_at`` index too). Prints the EXPLAIN (ANALYZE, BUFFERS) plans and a table: size,
selection ms, plan shape, old/new ratio. Goal: <= 5 ms at 1 M tokens, a flat curve.

Part 2, steady state. 20,000 tokens (1,000 per-user datasources x 20 users): a band of them
expires continuously at --rate per minute (default 4,000: four times the 1,000 per minute that
one batch per tick enqueues with the default settings, twice as many with the interval below) for
--window seconds, the rest later in the hour. Real Celery
workers, real beat (the sweep every SWEEP_INTERVAL), the local token endpoint
(bench/token_server.py). Counts the tokens whose expiry passed before they were refreshed (must
be 0), refreshes per minute, token-endpoint calls per refreshed token (must be 1). The margin
and interval are scaled down so expiries fall inside a run of a few minutes: REFRESH_MARGIN 75 s
(jittered to 60-75 s), SWEEP_INTERVAL 30 s, SWEEP_BATCH_SIZE 1000, so every tick finds twice a
batch due and only a sweep that drains its backlog keeps up.

    python bench/sweep_scale.py [--sizes 10000,100000,1000000] [--runs 30] [--skip-steady]

BENCH_DATABASE_URL: a PostgreSQL database it drops and creates again (default
postgres://postgres@127.0.0.1:5432/bench); REDIS_URL / CELERY_BROKER_URL for the broker (default
redis://127.0.0.1:6379/15). About 4.5 minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "var" / "bench-sweep-scale"
DEFAULT_DB = "postgres://postgres@127.0.0.1:5432/bench"
CELERY_LOG = BENCH_DIR / "celery.log"
GOAL_MS = 5.0
DATASOURCES = 1000
STEADY_MARGIN = 75
STEADY_INTERVAL = 30
STEADY_BATCH = 1000
#: Seconds from the start of the steady-state run to the first expiring token's due time.
LEAD = 5

#: The sweep's selection before #14 (``Token.objects.due(margin, max_age)`` ordered by expiry),
#: as Django generated it on PostgreSQL at 4e7f035; parameters: see :func:`old_params`.
OLD_SELECTION = """
SELECT "datasources_token"."id" AS "pk" FROM "datasources_token"
INNER JOIN "datasources_datasource"
  ON ("datasources_token"."datasource_id" = "datasources_datasource"."id")
WHERE ((("datasources_token"."expires_at" <= %s AND "datasources_token"."status" = %s)
  OR (("datasources_token"."refresh_token" IS NOT NULL
       OR "datasources_datasource"."grant_type" = %s)
      AND "datasources_token"."last_refreshed_at" <= %s AND "datasources_token"."status" = %s)
  OR ("datasources_datasource"."grant_type" = %s AND "datasources_token"."failure_count" = %s
      AND "datasources_token"."status" = %s)
  OR "datasources_token"."next_attempt_at" <= %s)
  AND NOT ("datasources_token"."status" = %s)
  AND ("datasources_token"."next_attempt_at" IS NULL OR "datasources_token"."next_attempt_at" <= %s)
  AND ("datasources_token"."lease_expires_at" IS NULL OR "datasources_token"."lease_expires_at" < %s))
ORDER BY "datasources_token"."expires_at" ASC NULLS FIRST LIMIT 1000
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--runs", type=int, default=30, help="timed calls per query and size")
    parser.add_argument("--due-fraction", type=float, default=0.01)
    parser.add_argument("--skip-steady", action="store_true")
    parser.add_argument("--steady-tokens", type=int, default=20_000)
    parser.add_argument("--rate", type=int, default=4000, help="tokens coming due per minute")
    parser.add_argument("--window", type=int, default=120, help="seconds of continuous expiry")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    shutil.rmtree(BENCH_DIR, ignore_errors=True)
    BENCH_DIR.mkdir(parents=True)
    sys.path.insert(0, str(ROOT))
    from bench.refresh_sweep import broker_url

    env = dict(os.environ)
    env["DATABASE_URL"] = os.environ.get("BENCH_DATABASE_URL", DEFAULT_DB)
    env["ENV_FILE"] = "/dev/null"  # a developer's .env must not change the margins below
    env.setdefault("SECRET_KEY", "bench-secret-key")
    env.setdefault("FERNET_KEYS", "bench-fernet-key-0123456789")
    env["DATA_DIR"] = str(BENCH_DIR)
    env["DJANGO_SETTINGS_MODULE"] = "config.settings"
    env["LOG_LEVEL"] = "WARNING"
    # Part 1 does not depend on these; part 2 runs its workers, beat and seeding with them.
    env["DATASOURCES_REFRESH_MARGIN"] = str(STEADY_MARGIN)
    env["DATASOURCES_SWEEP_INTERVAL"] = str(STEADY_INTERVAL)
    env["DATASOURCES_SWEEP_BATCH_SIZE"] = str(STEADY_BATCH)
    env["CELERY_TASK_DEFAULT_QUEUE"] = f"bench-sweep-{uuid.uuid4().hex[:8]}"
    env["CELERY_BROKER_URL"] = broker_url(env)
    if not env["DATABASE_URL"].startswith("postgres"):
        raise SystemExit("BENCH_DATABASE_URL must be a PostgreSQL database")
    recreate_database(env["DATABASE_URL"])
    os.environ.update(env)

    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection

    call_command("migrate", verbosity=0)
    with connection.cursor() as cursor:
        cursor.execute("SELECT version()")
        print(cursor.fetchone()[0].split(" on ")[0])
        # The old selection ran with the index on next_attempt_at that #14 dropped.
        cursor.execute(
            "CREATE INDEX IF NOT EXISTS bench_old_next_attempt ON datasources_token (next_attempt_at)"
        )

    rows = [selection(size, args) for size in sizes]
    print_selection_table(rows)
    if not args.skip_steady:
        steady_state(args, env)


# --- database ----------------------------------------------------------------------------------


def recreate_database(url: str) -> None:
    """DROP DATABASE and CREATE DATABASE, so every run starts from the same empty files."""
    import environ
    import psycopg

    cfg = environ.Env.db_url_config(url)
    name = cfg["NAME"]
    conninfo = {
        "host": cfg.get("HOST") or None,
        "port": cfg.get("PORT") or None,
        "user": cfg.get("USER") or None,
        "password": cfg.get("PASSWORD") or None,
    }
    with psycopg.connect(dbname="postgres", autocommit=True, **conninfo) as conn:
        try:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        except psycopg.errors.ObjectInUse as err:
            raise SystemExit(f"cannot drop {name}: {err}(stop whatever uses it)") from err
        conn.execute(f'CREATE DATABASE "{name}"')


def wipe() -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "TRUNCATE datasources_token, datasources_tokenevent, datasources_datasource, auth_user "
            "RESTART IDENTITY CASCADE"
        )
        cursor.execute("DROP TABLE IF EXISTS bench_seed")


def create_users(count: int, prefix: str) -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO auth_user (password, is_superuser, username, first_name, last_name, "
            "email, is_staff, is_active, date_joined) "
            "SELECT '!', false, %s || g, '', '', '', false, true, now() "
            "FROM generate_series(1, %s) g",
            [f"{prefix}-user-", count],
        )


def create_datasources(token_url: str, prefix: str) -> list:
    from bench.refresh_sweep import make_datasource_rows
    from datasources.models import Datasource

    rows = make_datasource_rows(DATASOURCES, token_url, prefix)
    for ds in rows:
        ds.token_sharing = "per_user"
    return Datasource.objects.bulk_create(rows, batch_size=1000)


# --- part 1: selection at scale ----------------------------------------------------------------


def fill(size: int, due_fraction: float) -> float:
    """1,000 per-user datasources x size/1,000 users, one token per (datasource, user)."""
    from django.db import connection

    from bench.refresh_sweep import vacuum
    from datasources.models import Token

    started = time.perf_counter()
    wipe()
    create_users(size // DATASOURCES, "scale")
    create_datasources("http://127.0.0.1:9/token", "scale")
    # One real ciphertext for every row: nothing here decrypts, but nothing would fail to.
    blob = Token._meta.get_field("refresh_token").get_db_prep_save("bench-secret", connection)
    with connection.cursor() as cursor:
        cursor.execute("SELECT setseed(0.14)")
        cursor.execute(
            """
            INSERT INTO datasources_token (
                datasource_id, user_id, access_token, refresh_token, token_type, scope,
                expires_at, expiry_known, client_id, obtained_at, last_refreshed_at, status,
                last_error, failure_count, failure_kind, next_attempt_at, retry_not_before,
                last_attempt_at, outcome_unknown_at, refresh_count, lease_id, lease_expires_at,
                refresh_due_at)
            SELECT ds, uid, %(blob)s, %(blob)s, 'Bearer', '',
                expires, true, cid, expires - interval '24 hours', expires - interval '24 hours',
                CASE WHEN reauth THEN 'needs_reauthorization' ELSE 'active' END,
                '', 0, '', NULL, NULL,
                expires - interval '24 hours', NULL, 1,
                CASE WHEN leased THEN 'bench-lease' ELSE '' END,
                CASE WHEN leased THEN now() + interval '1 hour' END,
                CASE WHEN reauth THEN NULL ELSE expires - interval '300 seconds' END
            FROM (
                SELECT d.id AS ds, d.client_id AS cid, u.id AS uid,
                    now() + (random() * 86400 - %(due)s * 86400 + 300) * interval '1 second'
                        AS expires,
                    random() < 0.02 AS reauth,
                    random() < 0.001 AS leased
                FROM datasources_datasource d CROSS JOIN auth_user u
            ) AS x
            """,
            {"blob": blob, "due": due_fraction},
        )
    vacuum(full=False)  # VACUUM ANALYZE (visibility map, statistics) and CHECKPOINT
    return time.perf_counter() - started


def old_params() -> list:
    from django.utils import timezone

    now = timezone.now()
    return [
        now + timedelta(seconds=300),
        "active",
        "client_credentials",
        now - timedelta(seconds=86400),
        "active",
        "client_credentials",
        0,
        "not_authorized",
        now,
        "needs_reauthorization",
        now,
        now,
    ]


def selection(size: int, args) -> dict:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from datasources.tokens.lifecycle import due_token_ids

    print(f"\n=== {size:,} tokens ===", flush=True)
    fill_seconds = fill(size, args.due_fraction)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*), count(*) FILTER (WHERE refresh_due_at <= now()), "
            "count(*) FILTER (WHERE refresh_due_at IS NULL) FROM datasources_token"
        )
        total, due, no_due = cursor.fetchone()
    print(
        f"filled in {fill_seconds:.1f} s (INSERT ... SELECT, VACUUM ANALYZE, CHECKPOINT): "
        f"{total:,} tokens, {due:,} due now, {no_due:,} without a due time"
    )

    with CaptureQueriesContext(connection) as ctx:
        ids = due_token_ids(1000)
    statements = [q["sql"] for q in ctx.captured_queries]
    writes = [s for s in statements if not s.lstrip().upper().startswith("SELECT")]
    if len(statements) != 1 or writes:
        print(f"NOTE: due_token_ids(1000) ran {len(statements)} statements: {statements}")
    new_sql = next(s for s in statements if s.lstrip().upper().startswith("SELECT"))

    def run_new() -> int:
        return len(due_token_ids(1000))

    def run_new_sql() -> int:
        with connection.cursor() as cursor:
            cursor.execute(new_sql)
            return len(cursor.fetchall())

    def run_old_sql() -> int:
        with connection.cursor() as cursor:
            cursor.execute(OLD_SELECTION, old_params())
            return len(cursor.fetchall())

    timers = {"new": run_new, "new_sql": run_new_sql, "old_sql": run_old_sql}
    times: dict[str, list[float]] = {name: [] for name in timers}
    counts: dict[str, int] = {}
    names = list(timers)
    for i in range(args.runs + 2):  # two warm-up rounds
        for name in names[i % 3 :] + names[: i % 3]:  # rotate the order: interleaved runs
            started = time.perf_counter()
            counts[name] = timers[name]()
            if i >= 2:
                times[name].append((time.perf_counter() - started) * 1000)

    new_plan = explain(new_sql, None)
    old_plan = explain(OLD_SELECTION, old_params())
    print(f"\nEXPLAIN (ANALYZE, BUFFERS) due_token_ids(1000) at {size:,}:\n{indent(new_plan)}")
    print(f"\nEXPLAIN (ANALYZE, BUFFERS) pre-#14 selection at {size:,}:\n{indent(old_plan)}")
    row = {
        "size": total,
        "due": due,
        "returned": len(ids),
        "returned_old": counts["old_sql"],
        "fill": fill_seconds,
        "plan": plan_shape(new_plan),
        "old_plan": plan_shape(old_plan),
        **{name: (median(t), p95(t)) for name, t in times.items()},
    }
    print(
        f"\ndue_token_ids(1000): median {row['new'][0]:.2f} ms, p95 {row['new'][1]:.2f} ms; "
        f"its SQL alone {row['new_sql'][0]:.2f} ms; pre-#14 selection {row['old_sql'][0]:.2f} ms "
        f"(rows: {len(ids)} new, {counts['old_sql']} old)",
        flush=True,
    )
    return row


def explain(sql: str, params) -> str:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql, params)
        return "\n".join(r[0] for r in cursor.fetchall())


def plan_shape(plan: str) -> str:
    on_token = r"on datasources_token\b"
    if re.search(r"Seq Scan " + on_token, plan):
        kind = "parallel seq scan" if "Parallel Seq Scan" in plan else "seq scan"
        return f"{kind} of datasources_token"
    used = re.findall(r"(Index Only Scan|Index Scan) using (\w+) " + on_token, plan)
    used += re.findall(r"(Bitmap Index Scan) on (\w+)", plan)
    if not used:
        return "?"
    shape = ", ".join(sorted({f"{kind.lower()} {name}" for kind, name in used}))
    return shape + (" + sort" if re.search(r"\bSort\b", plan) else "")


def print_selection_table(rows: list[dict]) -> None:
    print("\n=== selection of due tokens: due_token_ids(1000) ===")
    print(
        f"goal: <= {GOAL_MS:.0f} ms at 1,000,000 tokens, flat curve (cost follows the due tokens)"
    )
    print(
        "ratio: pre-#14 selection / the new selection's SQL, same runs interleaved "
        "(both raw SQL through the same cursor)\n"
    )
    header = (
        "| tokens | due | rows | fill s | due_token_ids ms p50 / p95 | new SQL ms p50 | "
        "pre-#14 ms p50 / p95 | old / new | plan (new) | plan (pre-#14) |"
    )
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    for r in rows:
        print(
            f"| {r['size']:,} | {r['due']:,} | {r['returned']} | {r['fill']:.1f} | "
            f"{r['new'][0]:.2f} / {r['new'][1]:.2f} | {r['new_sql'][0]:.2f} | "
            f"{r['old_sql'][0]:.1f} / {r['old_sql'][1]:.1f} | "
            f"{r['old_sql'][0] / r['new_sql'][0]:.0f}x | {r['plan']} | {r['old_plan']} |"
        )
    if rows:
        last = rows[-1]
        verdict = "met" if last["new"][0] <= GOAL_MS else "NOT met"
        print(f"\ngoal at {last['size']:,}: median {last['new'][0]:.2f} ms -> {verdict}")
        for a, b in itertools.pairwise(rows):
            print(
                f"{a['size']:,} -> {b['size']:,} tokens: {b['new'][0] / a['new'][0]:.2f}x the time "
                f"({a['returned']} -> {b['returned']} ids returned; pre-#14 selection "
                f"{b['old_sql'][0] / a['old_sql'][0]:.1f}x)"
            )


# --- part 2: steady state ----------------------------------------------------------------------


def steady_state(args, env: dict[str, str]) -> None:
    from django.db import connection

    from bench.refresh_sweep import count, http_get, vacuum

    print(
        f"\n=== steady state: {args.steady_tokens:,} tokens, {args.rate:,} expiring per minute "
        f"for {args.window} s ==="
    )
    print(
        f"REFRESH_MARGIN {STEADY_MARGIN} s (jittered), SWEEP_INTERVAL {STEADY_INTERVAL} s, "
        f"SWEEP_BATCH_SIZE {STEADY_BATCH}: {args.rate * STEADY_INTERVAL // 60:,} tokens come due "
        f"per beat tick; workers {args.workers} x concurrency {args.concurrency}, "
        f"broker {env['CELERY_BROKER_URL'].split('://')[0]}",
        flush=True,
    )
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "token_server.py")], stdout=subprocess.PIPE, text=True
    )
    procs: list[subprocess.Popen] = []
    try:
        port = int(server.stdout.readline())
        band, placeholder = seed_steady(args, f"http://127.0.0.1:{port}/token")
        vacuum(full=False)
        procs = start_celery(args, env)
        time.sleep(5)  # workers and beat boot
        if any(p.poll() is not None for p in procs):
            raise SystemExit(f"a worker or beat died at start: see {CELERY_LOG}")
        t0 = shift_times(placeholder)
        end = t0 + timedelta(seconds=LEAD + STEADY_MARGIN + args.window + 5)
        calls_before = count(port)
        print(f"run until every band token's expiry has passed: {(end - t0).total_seconds():.0f} s")
        print("   t s | due, not yet enqueued | refreshed | token-endpoint calls | queued msgs")
        next_print = 0.0
        while True:
            elapsed = (now() - t0).total_seconds()
            if elapsed >= next_print:
                with connection.cursor() as cursor:
                    cursor.execute(
                        "SELECT count(*) FILTER (WHERE refresh_due_at <= now()), "
                        "count(*) FILTER (WHERE refresh_count >= 1) FROM datasources_token"
                    )
                    backlog, refreshed = cursor.fetchone()
                print(
                    f"  {elapsed:4.0f} | {backlog:21,} | {refreshed:9,} | "
                    f"{count(port) - calls_before:20,} | {queued(env)}",
                    flush=True,
                )
                next_print += 10
            if now() >= end:
                break
            if any(p.poll() is not None for p in procs):
                raise SystemExit(f"a worker or beat died: see {CELERY_LOG}")
            time.sleep(0.5)
    finally:
        stop(procs)
        stats = None
        if server.poll() is None:
            try:
                stats = json.loads(http_get(f"http://127.0.0.1:{port}/count"))
            except Exception as err:  # report what we have
                print(f"token endpoint count failed: {err}")
        server.terminate()
    report_steady(args, t0, end, band, stats, calls_before)


def now() -> datetime:
    from django.utils import timezone

    return timezone.now()


def seed_steady(args, token_url: str) -> tuple[int, datetime]:
    """Tokens with real (encrypted, distinct) refresh tokens; their times are relative to a
    placeholder start an hour ahead, so nothing is due until :func:`shift_times` moves them to
    the real start. Returns the band size and the placeholder."""
    from django.db import connection

    from datasources.models import Token
    from datasources.tokens.decide import due_for

    wipe()
    users = max(1, args.steady_tokens // DATASOURCES)
    create_users(users, "steady")
    datasources = create_datasources(token_url, "steady")
    with connection.cursor() as cursor:
        cursor.execute("SELECT id FROM auth_user ORDER BY id")
        user_ids = [r[0] for r in cursor.fetchall()]
    placeholder = now() + timedelta(hours=1)
    band = min(args.steady_tokens, args.rate * args.window // 60)
    rng = random.Random(14)
    # Evenly spaced expiries (the band) and later ones in the hour, assigned at random.
    expiries = [
        placeholder + timedelta(seconds=LEAD + STEADY_MARGIN + args.window * k / band)
        for k in range(band)
    ]
    rest = len(datasources) * len(user_ids) - band
    expiries += [
        placeholder + timedelta(seconds=600 + 3000 * k / max(1, rest)) for k in range(rest)
    ]
    rng.shuffle(expiries)
    band_end = placeholder + timedelta(seconds=LEAD + STEADY_MARGIN + args.window)
    started = time.perf_counter()
    tokens = []
    i = 0
    for ds in datasources:
        for uid in user_ids:
            exp = expiries[i]
            i += 1
            tokens.append(
                Token(
                    datasource=ds,
                    user_id=uid,
                    access_token=f"seed-access-{i}",
                    refresh_token=f"seed-refresh-{i}",
                    token_type="Bearer",
                    status="active",
                    client_id=ds.client_id,
                    expires_at=exp,
                    obtained_at=exp - timedelta(hours=1),
                    last_refreshed_at=exp - timedelta(hours=1),
                )
            )
    tokens = Token.objects.bulk_create(tokens, batch_size=2000)
    # The due time the core would have written when storing each token (margin jitter by id).
    seeded = []
    for token in tokens:
        due = due_for(token.datasource, token, token.last_refreshed_at)
        seeded.append((token.pk, token.expires_at, due, token.expires_at <= band_end))
    with connection.cursor() as cursor:
        cursor.execute(
            "CREATE TABLE bench_seed (token_id integer PRIMARY KEY, expires_at timestamptz, "
            "due_at timestamptz, band boolean)"
        )
        cursor.execute(
            "INSERT INTO bench_seed SELECT * FROM unnest(%s::integer[], %s::timestamptz[], "
            "%s::timestamptz[], %s::boolean[])",
            [list(col) for col in zip(*seeded, strict=True)],
        )
        cursor.execute(
            "UPDATE datasources_token t SET refresh_due_at = s.due_at "
            "FROM bench_seed s WHERE s.token_id = t.id"
        )
    print(
        f"seeded {len(tokens):,} tokens in {time.perf_counter() - started:.1f} s "
        f"({band:,} expiring within {args.window} s, the rest 10-60 min later)",
        flush=True,
    )
    return band, placeholder


def shift_times(placeholder: datetime) -> datetime:
    """Move every seeded time so that the placeholder start is now; returns the start."""
    from django.db import connection

    start = now()
    delta = start - placeholder
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE datasources_token SET expires_at = expires_at + %s, "
            "obtained_at = obtained_at + %s, last_refreshed_at = last_refreshed_at + %s, "
            "refresh_due_at = refresh_due_at + %s",
            [delta] * 4,
        )
        cursor.execute(
            "UPDATE bench_seed SET expires_at = expires_at + %s, due_at = due_at + %s",
            [delta] * 2,
        )
    return start


def start_celery(args, env: dict[str, str]) -> list[subprocess.Popen]:
    """Workers and beat, their output in CELERY_LOG (banners, warnings, tracebacks)."""
    common = [sys.executable, "-m", "celery", "-A", "config"]
    log = CELERY_LOG.open("ab")
    procs = [
        subprocess.Popen(
            [
                *common,
                "worker",
                "--loglevel=WARNING",
                f"--concurrency={args.concurrency}",
                "-Q",
                env["CELERY_TASK_DEFAULT_QUEUE"],
                f"--hostname=sweep{i}-{uuid.uuid4().hex[:6]}@%h",
                "--without-mingle",
                "--without-gossip",
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        for i in range(args.workers)
    ]
    beat = subprocess.Popen(
        [*common, "beat", "--loglevel=WARNING", "-s", str(BENCH_DIR / "celerybeat-schedule")],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return [*procs, beat]


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


def queued(env: dict[str, str]) -> str:
    """Messages waiting in the benchmark's queue (Redis only)."""
    url = env["CELERY_BROKER_URL"]
    if not url.startswith("redis"):
        return "-"
    import redis

    try:
        return f"{redis.Redis.from_url(url).llen(env['CELERY_TASK_DEFAULT_QUEUE']):,}"
    except redis.RedisError:
        return "?"


def report_steady(args, t0: datetime, end: datetime, band: int, stats, calls_before: int) -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT count(*),
                count(*) FILTER (WHERE s.expires_at <= %(end)s),
                count(*) FILTER (WHERE t.refresh_count >= 1),
                count(*) FILTER (WHERE s.expires_at <= %(end)s AND
                    (t.refresh_count = 0 OR t.last_refreshed_at >= s.expires_at)),
                count(*) FILTER (WHERE t.refresh_count >= 2),
                percentile_cont(ARRAY[0.5, 0.95, 1.0]) WITHIN GROUP (
                    ORDER BY extract(epoch FROM t.last_refreshed_at - s.due_at))
                    FILTER (WHERE t.refresh_count >= 1),
                min(extract(epoch FROM s.expires_at - t.last_refreshed_at))
                    FILTER (WHERE t.refresh_count >= 1),
                extract(epoch FROM max(t.last_refreshed_at) FILTER (WHERE t.refresh_count >= 1)
                    - min(s.due_at) FILTER (WHERE t.refresh_count >= 1))
            FROM bench_seed s JOIN datasources_token t ON t.id = s.token_id
            """,
            {"end": end},
        )
        (total, expiring, refreshed, expired_unrefreshed, twice, late, slack, span) = (
            cursor.fetchone()
        )
        cursor.execute(
            "SELECT floor(extract(epoch FROM last_refreshed_at - %s) / 60)::int AS m, count(*) "
            "FROM datasources_token WHERE refresh_count >= 1 GROUP BY m ORDER BY m",
            [t0],
        )
        refreshed_per_minute = dict(cursor.fetchall())
        cursor.execute(
            "SELECT floor(extract(epoch FROM due_at - %s) / 60)::int AS m, count(*) "
            "FROM bench_seed WHERE due_at <= %s GROUP BY m ORDER BY m",
            [t0, end],
        )
        due_per_minute = dict(cursor.fetchall())
    duration = (end - t0).total_seconds()
    calls = (stats or {}).get("calls", calls_before) - calls_before
    print(f"\n=== steady state result ({duration:.0f} s run) ===")
    print(f"tokens: {total:,}; expiry within the run: {expiring:,} (band {band:,})")
    print(f"tokens refreshed:                               {refreshed:,}")
    print(f"expired before being refreshed (must be 0):     {expired_unrefreshed:,}")
    print(f"refreshed twice (must be 0):                    {twice:,}")
    print(f"token-endpoint calls:                           {calls:,} (must equal {refreshed:,})")
    if stats:
        print(f"reused refresh tokens (must be 0):              {stats['reused_refresh_tokens']:,}")
    if late:
        print(
            f"refresh after due time: p50 {late[0]:.1f} s, p95 {late[1]:.1f} s, max {late[2]:.1f} s; "
            f"least time left before expiry: {slack:.1f} s"
        )
    print("\n| minute | came due | refreshed |")
    print("| --- | --- | --- |")
    for m in sorted(set(due_per_minute) | set(refreshed_per_minute)):
        print(f"| {m} | {due_per_minute.get(m, 0):,} | {refreshed_per_minute.get(m, 0):,} |")
    if refreshed and span:
        print(
            f"\nrefreshes per minute: {refreshed * 60 / span:,.0f} from the first due time to the "
            f"last refresh ({refreshed:,} in {span:.0f} s), busiest minute "
            f"{max(refreshed_per_minute.values()):,}; tokens came due at {args.rate:,}/min for "
            f"{args.window} s. The pre-#14 sweep (one batch per tick) enqueued at most "
            f"{STEADY_BATCH * 60 // STEADY_INTERVAL:,}/min with these settings."
        )
    ok = expired_unrefreshed == 0 and twice == 0 and calls == refreshed
    print("steady state: OK" if ok else "steady state: FAILED")


# --- small helpers -----------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return statistics.median(values)


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


if __name__ == "__main__":
    main()
