"""Benchmark: the proxy under load, against direct calls, nginx and a naive forwarding view.

Drives, with wrk on loopback, in interleaved slices of one run:
(a) ``direct``: a small upstream server (asyncio, keep-alive);
(b) ``nginx``: Debian's nginx ``proxy_pass`` to it, adding a static Authorization header (what a
    user would put in front of an API);
(c) ``proxy``: our proxy, served the way the README's production command serves it
    (``--server asgi``: uvicorn serving config.asgi, the proxy's fast lane), and/or
    ``granian`` (the same application under granian), ``asgi-threads`` (uvicorn with
    DATASOURCES_PROXY_FAST_LANE=0: every call on the thread-pool path) and ``wsgi`` (gunicorn
    gthread workers, config.wsgi); ``--server asgi,wsgi`` runs both;
(d) ``naive``: a minimal Django view that forwards with a new requests session per request.
Prints requests/s, p50/p99 latency, ours/nginx, ours/naive and the added p50 latency at one
connection, then streams a 1 GB response (and a 1 GB request body) through each server and
reports the growth of its workers' resident memory.

    python bench/proxy.py [--server asgi,wsgi] [--duration 10] [--rounds 5] [--connections 16]
                          [--stream-bytes 1000000000]
    python bench/proxy.py --features [--duration 30] [--rounds 10]
    python bench/proxy.py --tracing [--duration 30] [--rounds 10]
    python bench/proxy.py --body-rule [--server asgi,wsgi] [--duration 30] [--rounds 10]
    python bench/proxy.py --server asgi --baseline /tmp/before   # before/after, one run

``--baseline DIR`` adds, for each ``--server`` kind, the same server run from another checkout
(``DIR``, e.g. ``git worktree add /tmp/before <rev>``) to the same interleaved slices, against the
same upstream, nginx and database: ``base-<kind>`` beside ``ours-<kind>``, both as a share of
nginx, so a change's cost is measured in one run on one machine.

``--features`` measures instead what the call log, the retries machinery and the shared upstream
health (rate-limit memory, circuit breaker) cost when no retry happens: two gunicorn servers,
one with them (a datasource with 3 retries configured, call log on) and one without
(``BENCH_FEATURES=off``: call log and upstream health off, no retries configured), driven in
interleaved slices; prints both and the ratio.

``--tracing`` measures what OpenTelemetry spans cost (docs/tracing.md): two gunicorn servers,
one with ``DATASOURCES_TRACING=1`` exporting every span over OTLP/HTTP (the SDK's batch
processor) to a local sink that only counts, one with tracing off (the default); interleaved
slices, both printed with the ratio; then the cost per call of the off path's calls into
``datasources.ops.tracing``, timed in this process.

``--body-rule`` measures what an expired-token body condition (#29) costs the hot path: the
same servers serve two datasources on the same upstream, ``bench`` (no condition) and
``bench-rule`` (Slack's condition, ``error`` in invalid_auth…); the upstream's small JSON answer
does not meet it, so every call reads and parses the answer and passes it on. nginx and both
datasources per server are driven in interleaved slices; prints each and the ratio.

Install what it drives (Debian, as root): ``apt-get install -y wrk nginx-light`` (or ``nginx``);
``make bench-proxy`` installs the Python side (``pip install -e '.[test]'``: gunicorn, uvicorn).
Uses BENCH_DATABASE_URL (default: SQLite under var/bench-proxy). The machine should be
otherwise idle: check ``uptime``, and repeat the run to see the noise.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "var" / "bench-proxy"


NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--server", default="asgi,wsgi", help="comma-separated: asgi, granian, asgi-threads, wsgi"
    )
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--stream-bytes", type=int, default=1_000_000_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8, help="gunicorn gthread threads")
    parser.add_argument("--asgi-threads", type=int, default=16, help="PROXY_ASGI_THREADS")
    parser.add_argument("--asgi-workers", type=int, default=None, help="default: --workers")
    parser.add_argument("--features", action="store_true", help="features on vs off (see above)")
    parser.add_argument("--tracing", action="store_true", help="tracing on vs off (see above)")
    parser.add_argument("--baseline", type=Path, default=None, help="another checkout to compare")
    parser.add_argument(
        "--body-rule", action="store_true", help="a body condition vs none (see above)"
    )
    args = parser.parse_args()
    args.asgi_workers = args.asgi_workers or args.workers
    kinds = [kind.strip() for kind in args.server.split(",") if kind.strip()]
    if not kinds or not set(kinds) <= set(SERVER_KINDS):
        raise SystemExit(f"--server takes a comma-separated list of {', '.join(SERVER_KINDS)}")
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed: apt-get install -y wrk")
    if not os.access(NGINX, os.X_OK):
        raise SystemExit("nginx is not installed: apt-get install -y nginx-light (or nginx)")

    shutil.rmtree(BENCH_DIR, ignore_errors=True)
    BENCH_DIR.mkdir(parents=True)
    env = dict(os.environ)
    env.update(
        DATABASE_URL=os.environ.get(
            "BENCH_DATABASE_URL", f"sqlite:///{BENCH_DIR / 'bench.sqlite3'}"
        ),
        SECRET_KEY="bench-secret-key",
        FERNET_KEYS="bench-fernet-key-0123456789",
        DATA_DIR=str(BENCH_DIR),
        DJANGO_SETTINGS_MODULE="bench.settings",
        DATASOURCES_PROXY_ASGI_THREADS=str(args.asgi_threads),
        LOG_LEVEL="WARNING",
        CELERY_BROKER_URL="memory://",
    )
    os.environ.update(env)
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from django.core.management import call_command
    from django.utils import timezone

    from datasources.models import Datasource, Token
    from datasources.proxy.apikeys import create_api_key

    call_command("migrate", verbosity=0)
    Datasource.objects.all().delete()

    processes: list[subprocess.Popen] = []
    upstream = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "upstream_server.py")],
        stdout=subprocess.PIPE,
        text=True,
    )
    processes.append(upstream)
    upstream_port = int(upstream.stdout.readline())
    datasource = Datasource(
        name="Bench",
        slug="bench",
        base_url=f"http://127.0.0.1:{upstream_port}/",
        grant_type="client_credentials",
        access_token_url="http://127.0.0.1:9/token",
        client_id="bench",
        client_secret="bench-secret",
        allowed_methods="GET,HEAD,POST,PUT,PATCH,DELETE",
    )
    datasource.save()
    Token.objects.filter(datasource=datasource).update(
        access_token="bench-access-token",
        status="active",
        expires_at=timezone.now() + timedelta(hours=2),
        last_refreshed_at=timezone.now(),
    )
    _, key = create_api_key("bench")
    auth = f"Authorization: Api-Key {key}"
    if args.features:
        return features(args, env, datasource, key)
    if args.tracing:
        return tracing_cost(args, env, key)
    if args.body_rule:
        return body_rule_cost(args, env, datasource, key, kinds)

    try:
        nginx_port = start_nginx(upstream_port, args.workers, processes)
        servers: dict[str, tuple[int, subprocess.Popen]] = {}
        for kind in kinds:
            port = free_port()
            server_env = {**env, **SERVER_KINDS[kind]}
            server = subprocess.Popen(server_command(kind, port, args), cwd=ROOT, env=server_env)
            processes.append(server)
            servers[kind] = (port, server)
            wait_until_up(f"http://127.0.0.1:{port}/admin/login/")
        naive_port = servers.get("wsgi", next(iter(servers.values())))[0]
        baselines = start_baselines(kinds, args, env, processes) if args.baseline else {}

        def proxy_url(port: int) -> str:
            return f"http://127.0.0.1:{port}/api/v1/datasources/bench/proxy/items"

        targets = {
            "direct": (f"http://127.0.0.1:{upstream_port}/items", None),
            "nginx": (f"http://127.0.0.1:{nginx_port}/items", None),
            **{f"ours-{kind}": (proxy_url(port), auth) for kind, (port, _) in servers.items()},
            **{f"base-{kind}": (proxy_url(port), auth) for kind, port in baselines.items()},
            "naive": (f"http://127.0.0.1:{naive_port}/naive/bench/items", None),
        }
        runs = interleaved(targets, args)
        single = interleaved(
            {name: targets[name] for name in targets if name != "naive"}, args, connections=1
        )
        streams = {
            kind: stream_memory(port, key, args.stream_bytes, server.pid)
            for kind, (port, server) in servers.items()
        }
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            process.wait(10)

    print()
    print(f"load average before the run: {LOAD_BEFORE}; after: {os.getloadavg()}")
    print(
        f"servers: {', '.join(server_description(kind, args) for kind in kinds)}; nginx "
        f"{args.workers} workers; wrk: {args.connections} connections, {args.duration}s per "
        f"target in {args.rounds} interleaved rounds"
    )
    print(f"{'':12} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'p50 ms @1 conn':>15}")
    for name, (rps, p50, p99) in runs.items():
        one = f"{single[name][1]:15.3f}" if name in single else f"{'':>15}"
        print(f"{name:12} {rps:10.0f} {p50:8.2f} {p99:8.2f} {one}")
    direct, nginx, naive = runs["direct"], runs["nginx"], runs["naive"]
    print(
        f"nginx: {nginx[0] / direct[0]:.0%} of direct; added p50 at 1 connection "
        f"{single['nginx'][1] - single['direct'][1]:.3f} ms"
    )
    for kind in kinds:
        ours = runs[f"ours-{kind}"]
        added = single[f"ours-{kind}"][1] - single["direct"][1]
        print(
            f"ours ({kind}): {ours[0] / nginx[0]:.1%} of nginx (goal >= 25%), "
            f"{ours[0] / naive[0]:.1f}x naive, added p50 at 1 connection {added:.3f} ms "
            f"(goal <= 0.3 ms)"
        )
    for kind in baselines:
        ours, base = runs[f"ours-{kind}"], runs[f"base-{kind}"]
        print(
            f"before/after ({kind}): base {base[0] / nginx[0]:.1%} of nginx, ours "
            f"{ours[0] / nginx[0]:.1%} (ours/base {ours[0] / base[0]:.3f}); p99 {base[2]:.2f} -> "
            f"{ours[2]:.2f} ms; added p50 at 1 connection "
            f"{single[f'base-{kind}'][1] - single['direct'][1]:.3f} -> "
            f"{single[f'ours-{kind}'][1] - single['direct'][1]:.3f} ms"
        )
    for kind, (
        growth,
        streamed,
        seconds,
        upload_growth,
        uploaded,
        upload_seconds,
    ) in streams.items():
        print(
            f"ours ({kind}): streamed {streamed / 1e9:.2f} GB down in {seconds:.1f}s "
            f"({streamed / seconds / 1e6:.0f} MB/s), worker RSS growth {growth / 1e6:.1f} MB; "
            f"{uploaded / 1e9:.2f} GB up in {upload_seconds:.1f}s, growth "
            f"{upload_growth / 1e6:.1f} MB (target <= 30 MB)"
        )


LOAD_BEFORE = os.getloadavg()


#: The servers the benchmark can drive, with their environment.
SERVER_KINDS = {
    "asgi": {},
    "granian": {},
    "asgi-threads": {"DATASOURCES_PROXY_FAST_LANE": "0"},
    "wsgi": {},
}


def server_command(kind: str, port: int, args) -> list[str]:
    """The README's production commands, on loopback."""
    if kind == "granian":
        return [
            *(sys.executable, "-m", "granian", "--interface", "asgi", "config.asgi:application"),
            *("--host", "127.0.0.1", "--port", str(port), "--workers", str(args.asgi_workers)),
            *("--loop", "uvloop", "--no-ws", "--log-level", "warning"),
        ]
    if kind in ("asgi", "asgi-threads"):
        return [
            *(sys.executable, "-m", "uvicorn", "config.asgi:application"),
            *("--host", "127.0.0.1", "--port", str(port), "--workers", str(args.asgi_workers)),
            *("--loop", "uvloop", "--http", "httptools", "--no-access-log"),
            # The rest of the README's production flags (what each costs is in the run).
            *("--lifespan", "on", "--proxy-headers", "--forwarded-allow-ips", "127.0.0.1"),
            *("--timeout-keep-alive", "75", "--no-server-header", "--log-level", "warning"),
        ]
    return [
        *(sys.executable, "-m", "gunicorn", "config.wsgi", "-b", f"127.0.0.1:{port}"),
        *("-w", str(args.workers), "-k", "gthread", "--threads", str(args.threads)),
        "--log-level",
        "warning",
        # One listening socket per worker: the kernel spreads connections across workers.
        # With a shared socket one worker often accepts every keep-alive connection.
        "--reuse-port",
    ]


def start_baselines(
    kinds: list[str], args, env: dict[str, str], processes: list[subprocess.Popen]
) -> dict[str, int]:
    """The same servers run from the checkout ``args.baseline``, on the same database. The
    working directory comes first on ``sys.path``, so its ``datasources`` and ``config`` are
    the ones imported (checked below: a baseline that silently ran this tree would compare
    nothing)."""
    base = args.baseline.resolve()
    found = subprocess.run(
        [sys.executable, "-c", "import datasources, config; print(datasources.__file__)"],
        cwd=base,
        env={**env, "PYTHONPATH": str(base)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not found.startswith(str(base)):
        raise SystemExit(f"the baseline imports datasources from {found}, not from {base}")
    ports = {}
    for kind in kinds:
        port = free_port()
        server_env = {**env, **SERVER_KINDS[kind], "PYTHONPATH": str(base)}
        processes.append(
            subprocess.Popen(server_command(kind, port, args), cwd=base, env=server_env)
        )
        wait_until_up(f"http://127.0.0.1:{port}/admin/login/")
        ports[kind] = port
    return ports


def server_description(kind: str, args) -> str:
    if kind == "granian":
        return f"granian = granian (asgi, uvloop) {args.asgi_workers} workers"
    if kind == "asgi-threads":
        return f"asgi-threads = uvicorn, fast lane off, {args.asgi_workers} workers"
    if kind == "asgi":
        return (
            f"asgi = uvicorn (uvloop, httptools) {args.asgi_workers} workers x "
            f"{args.asgi_threads} threads"
        )
    return f"wsgi = gunicorn {args.workers} gthread workers x {args.threads} threads"


def start_nginx(upstream_port: int, workers: int, processes: list[subprocess.Popen]) -> int:
    """nginx proxy_pass to the upstream with keep-alive, adding a static Authorization header."""
    port = free_port()
    directory = BENCH_DIR / "nginx"
    directory.mkdir()
    conf = directory / "nginx.conf"
    conf.write_text(
        f"""
worker_processes {workers};
daemon off;
pid {directory / "nginx.pid"};
error_log {directory / "error.log"} warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {directory / "body"};
    proxy_temp_path {directory / "proxy"};
    fastcgi_temp_path {directory / "fastcgi"};
    uwsgi_temp_path {directory / "uwsgi"};
    scgi_temp_path {directory / "scgi"};
    upstream api {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port} reuseport;
        location / {{
            proxy_pass http://api;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer bench-access-token";
        }}
    }}
}}
"""
    )
    user = ["-g", "user root;"] if os.geteuid() == 0 else []
    processes.append(subprocess.Popen([NGINX, "-p", str(directory), "-c", str(conf), *user]))
    wait_until_up(f"http://127.0.0.1:{port}/items")
    return port


def start_gunicorn(args, env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    port = free_port()
    server = subprocess.Popen(server_command("wsgi", port, args), cwd=ROOT, env=env)
    wait_until_up(f"http://127.0.0.1:{port}/admin/login/")
    return server, port


def features(args, env: dict[str, str], datasource, key: str) -> None:
    """Call log + retries machinery + upstream health on vs off, no retry happening."""
    from datasources.models import ProxyCall, Token

    resilient = type(datasource).objects.get(pk=datasource.pk)
    resilient.pk, resilient.slug, resilient.name = None, "bench-resilient", "Bench (resilient)"
    resilient.retry_count = 3
    resilient.save()
    Token.objects.filter(datasource=resilient).update(
        **Token.objects.filter(datasource=datasource).values(
            "access_token", "status", "expires_at", "last_refreshed_at"
        )[0]
    )
    on, on_port = start_gunicorn(args, env)
    off, off_port = start_gunicorn(args, {**env, "BENCH_FEATURES": "off"})
    try:
        auth = f"Authorization: Api-Key {key}"
        targets = {
            "on": (
                f"http://127.0.0.1:{on_port}/api/v1/datasources/bench-resilient/proxy/items",
                auth,
            ),
            "off": (f"http://127.0.0.1:{off_port}/api/v1/datasources/bench/proxy/items", auth),
        }
        runs = interleaved(targets, args)
    finally:
        for server in (on, off):
            server.terminate()
            server.wait(10)
    logged = ProxyCall.objects.filter(datasource=resilient).count()
    on_rps, off_rps = runs["on"][0], runs["off"][0]
    print()
    print(
        f"gunicorn: {args.workers} workers x {args.threads} threads; wrk: "
        f"{args.connections} connections, {args.duration}s each in {args.rounds} interleaved rounds"
    )
    print(f"{'':8} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8}")
    for name, (rps, p50, p99) in runs.items():
        print(f"{name:8} {rps:10.0f} {p50:8.2f} {p99:8.2f}")
    print(f"call-log rows written by 'on': {logged}")
    print(
        f"throughput on / off: {on_rps / off_rps:.3f}  (cost {100 * (1 - on_rps / off_rps):.1f}%, target < 10%)"
    )


#: Slack's preset condition (datasources/admin/presets/providers.json).
BODY_RULE = [
    {
        "path": "error",
        "values": ["invalid_auth", "token_expired", "token_revoked", "account_inactive"],
    }
]


def body_rule_cost(args, env: dict[str, str], datasource, key: str, kinds: list[str]) -> None:
    """nginx, then per server the datasource without and with a body condition, interleaved."""
    from datasources.models import Token

    ruled = type(datasource).objects.get(pk=datasource.pk)
    ruled.pk, ruled.slug, ruled.name = None, "bench-rule", "Bench (body condition)"
    ruled.expiry_body_rules = BODY_RULE
    ruled.full_clean()
    ruled.save()
    Token.objects.filter(datasource=ruled).update(
        **Token.objects.filter(datasource=datasource).values(
            "access_token", "status", "expires_at", "last_refreshed_at"
        )[0]
    )
    upstream_port = int(datasource.base_url.rstrip("/").rsplit(":", 1)[1])
    processes: list[subprocess.Popen] = []
    auth = f"Authorization: Api-Key {key}"
    try:
        nginx_port = start_nginx(upstream_port, args.workers, processes)
        targets: dict[str, tuple[str, str | None]] = {
            "nginx": (f"http://127.0.0.1:{nginx_port}/items", None)
        }
        for kind in kinds:
            port = free_port()
            processes.append(
                subprocess.Popen(
                    server_command(kind, port, args), cwd=ROOT, env={**env, **SERVER_KINDS[kind]}
                )
            )
            wait_until_up(f"http://127.0.0.1:{port}/admin/login/")
            for slug in ("bench", "bench-rule"):
                url = f"http://127.0.0.1:{port}/api/v1/datasources/{slug}/proxy/items"
                targets[f"{kind} {slug}"] = (url, auth)
        runs = interleaved(targets, args)
        single = interleaved(targets, args, connections=1)
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            process.wait(10)
    print()
    print(f"load average before the run: {LOAD_BEFORE}; after: {os.getloadavg()}")
    print(
        f"servers: {', '.join(server_description(kind, args) for kind in kinds)}; nginx "
        f"{args.workers} workers; wrk: {args.connections} connections (then 1), "
        f"{args.duration}s per target in {args.rounds} interleaved rounds"
    )
    print(f"{'':22} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'p50 ms @1 conn':>15}")
    for name, (rps, p50, p99) in runs.items():
        print(f"{name:22} {rps:10.0f} {p50:8.2f} {p99:8.2f} {single[name][1]:15.3f}")
    nginx = runs["nginx"][0]
    for kind in kinds:
        off, on = runs[f"{kind} bench"], runs[f"{kind} bench-rule"]
        added = single[f"{kind} bench-rule"][1] - single[f"{kind} bench"][1]
        print(
            f"{kind}: with a body condition {on[0] / off[0]:.3f} of without "
            f"(cost {100 * (1 - on[0] / off[0]):.1f}%); ours/nginx {off[0] / nginx:.1%} without, "
            f"{on[0] / nginx:.1%} with; added p50 at 1 connection {added:.3f} ms"
        )


def tracing_cost(args, env: dict[str, str], key: str) -> None:
    """Tracing on (every span exported over OTLP/HTTP to a local sink) vs off."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    received = {"requests": 0, "bytes": 0}

    class Sink(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            received["requests"] += 1
            received["bytes"] += len(body)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    sink = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    env = {k: v for k, v in env.items() if not k.startswith(("DATASOURCES_TRACING", "OTEL_"))}
    off, off_port = start_gunicorn(args, env)
    on, on_port = start_gunicorn(
        args,
        {
            **env,
            "DATASOURCES_TRACING": "1",
            "OTEL_SERVICE_NAME": "bench-proxy",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.server_address[1]}",
        },
    )
    try:
        auth = f"Authorization: Api-Key {key}"
        path = "api/v1/datasources/bench/proxy/items"
        targets = {
            "off": (f"http://127.0.0.1:{off_port}/{path}", auth),
            "on": (f"http://127.0.0.1:{on_port}/{path}", auth),
        }
        runs = interleaved(targets, args)
        single = interleaved(targets, args, connections=1)
    finally:
        for server in (on, off):
            server.terminate()
            server.wait(10)
        sink.shutdown()
    on_rps, off_rps = runs["on"][0], runs["off"][0]
    print()
    print(
        f"gunicorn: {args.workers} workers x {args.threads} threads; wrk: "
        f"{args.connections} connections (then 1), {args.duration}s each in {args.rounds} "
        "interleaved rounds"
    )
    print(f"{'':8} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'p50 ms, 1 conn':>15}")
    for name, (rps, p50, p99) in runs.items():
        print(f"{name:8} {rps:10.0f} {p50:8.2f} {p99:8.2f} {single[name][1]:15.3f}")
    print(f"OTLP export requests received: {received['requests']} ({received['bytes']} bytes)")
    print(
        f"throughput on / off: {on_rps / off_rps:.3f}  (cost {100 * (1 - on_rps / off_rps):.1f}%); "
        f"added p50 at one connection: {single['on'][1] - single['off'][1]:.3f} ms"
    )
    print(f"off: {off_path_ns():.0f} ns per proxy call in datasources.ops.tracing (this process)")


def off_path_ns(calls: int = 200_000) -> float:
    """What one proxy call spends in datasources.ops.tracing with tracing off: the proxy span, one
    upstream attempt's span, its status and the (skipped) header injection."""
    import timeit

    from datasources.ops import tracing

    tracing.reset()
    assert not tracing.enabled()
    headers: dict[str, str] = {}

    def one_call() -> None:
        with tracing.span(
            tracing.PROXY, {"http.request.method": "GET"}, parent_headers=headers
        ) as span:
            with tracing.upstream_attempt("GET", "http://127.0.0.1/", 1) as attempt:
                tracing.inject(headers)
                tracing.answered(attempt, 200)
            if span is not tracing.NOOP:
                raise AssertionError("tracing is on")

    best = min(timeit.repeat(one_call, number=calls, repeat=5))
    return best / calls * 1e9


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(url: str) -> None:
    import requests

    for _ in range(100):
        try:
            requests.get(url, timeout=1)
            return
        except requests.RequestException:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not answer")


def interleaved(
    targets: dict[str, tuple[str, str | None]], args, connections: int | None = None
) -> dict[str, tuple[float, float, float]]:
    """Each target gets --duration seconds in all, in --rounds slices taken in turn, so that a
    slow spell on this shared machine falls on every target alike rather than on one of them.
    Returns requests/s over all slices and the median p50 and p99 of the slices."""
    seconds = max(1, round(args.duration / args.rounds))
    slices: dict[str, list[tuple[float, float, float]]] = {name: [] for name in targets}
    for _ in range(args.rounds):
        for name, (url, header) in targets.items():
            slices[name].append(
                run_wrk(url, args, header, connections=connections, duration=seconds)
            )
    return {
        name: (
            statistics.fmean(rps for rps, _, _ in runs),
            statistics.median(p50 for _, p50, _ in runs),
            statistics.median(p99 for _, _, p99 in runs),
        )
        for name, runs in slices.items()
    }


def run_wrk(
    url: str,
    args,
    header: str | None,
    connections: int | None = None,
    duration: int | None = None,
) -> tuple[float, float, float]:
    connections = connections or args.connections
    threads = min(2, connections)
    duration = duration or args.duration
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency", url]
    if header:
        cmd[1:1] = ["-H", header]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        raise SystemExit(f"{url}: {non2xx.group(1)} error responses\n{out}")
    return rps, latency(out, "50%"), latency(out, "99%")


def latency(out: str, pct: str) -> float:
    value, unit = re.search(rf"{pct}\s+([\d.]+)(us|ms|s)", out).groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def worker_rss(master_pid: int) -> int:
    total = 0
    children = Path(f"/proc/{master_pid}/task/{master_pid}/children").read_text().split()
    for pid in children:
        status = Path(f"/proc/{pid}/status").read_text()
        total += int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024
    return total


def stream_memory(
    port: int, key: str, size: int, master_pid: int
) -> tuple[int, int, float, int, int, float]:
    """(RSS growth, bytes, seconds) for a response of ``size`` bytes, then for a request body."""
    down = stream_down(port, key, size, master_pid)
    up = stream_up(port, key, size, master_pid)
    return (*down, *up)


def peak_rss_during(master_pid: int, work) -> tuple[int, object]:
    baseline = worker_rss(master_pid)
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, worker_rss(master_pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = work()
    finally:
        done.set()
        sampler.join()
    return peak - baseline, result


def stream_up(port: int, key: str, size: int, master_pid: int) -> tuple[int, int, float]:
    import requests

    url = f"http://127.0.0.1:{port}/api/v1/datasources/bench/proxy/upload"
    headers = {"Authorization": f"Api-Key {key}"}

    class Body:
        """``size`` bytes made as they are read (a length, so no chunked encoding)."""

        def __init__(self) -> None:
            self.left = size

        def __len__(self) -> int:
            return self.left

        def read(self, amount: int = -1) -> bytes:
            amount = self.left if amount < 0 else min(amount, self.left)
            self.left -= amount
            return b"u" * amount

    def work() -> float:
        started = time.perf_counter()
        response = requests.post(url, data=Body(), headers=headers, timeout=300)
        if response.status_code != 200:
            raise SystemExit(f"upload: {response.status_code} {response.text[:200]}")
        return time.perf_counter() - started

    growth, seconds = peak_rss_during(master_pid, work)
    return growth, size, seconds


def stream_down(port: int, key: str, size: int, master_pid: int) -> tuple[int, int, float]:
    import requests

    url = f"http://127.0.0.1:{port}/api/v1/datasources/bench/proxy/big?size={size}"
    headers = {"Authorization": f"Api-Key {key}"}
    warm = requests.get(url.replace(str(size), "1000000"), headers=headers, timeout=30)
    assert len(warm.content) == 1_000_000

    def work() -> tuple[int, float]:
        started = time.perf_counter()
        received = 0
        with requests.get(url, headers=headers, stream=True, timeout=120) as response:
            for chunk in response.iter_content(1024 * 1024):
                received += len(chunk)
        return received, time.perf_counter() - started

    growth, (received, seconds) = peak_rss_during(master_pid, work)
    if received != size:
        raise SystemExit(f"streamed {received} bytes, expected {size}")
    return growth, received, seconds


if __name__ == "__main__":
    main()
