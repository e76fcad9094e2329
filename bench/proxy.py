"""Benchmark: the proxy under load, against direct calls and a naive forwarding view.

Serves the project with gunicorn (gthread workers) and drives it with wrk on loopback:
(a) direct to a small upstream server, (b) through our proxy, (c) through a minimal Django view
that forwards with a new requests session per request. Prints requests/s, p50/p99 latency and
the ratios from one run, then streams a 1 GB response through the proxy and reports the growth
of the gunicorn workers' resident memory.

    python bench/proxy.py [--duration 10] [--rounds 5] [--connections 16] [--stream-bytes 1000000000]
    python bench/proxy.py --features [--duration 30] [--rounds 10]

``--features`` measures instead what the call log, the retries machinery and the shared upstream
health (rate-limit memory, circuit breaker) cost when no retry happens: two gunicorn servers,
one with them (a datasource with 3 retries configured, call log on) and one without
(``BENCH_FEATURES=off``: call log and upstream health off, no retries configured), driven in
interleaved slices; prints both and the ratio.

Needs wrk (Debian package `wrk`). Uses BENCH_DATABASE_URL (default: SQLite under var/bench).
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--stream-bytes", type=int, default=1_000_000_000)
    parser.add_argument("--gunicorn-workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--features", action="store_true", help="features on vs off (see above)")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed: apt-get install wrk")

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
        LOG_LEVEL="WARNING",
        CELERY_BROKER_URL="memory://",
    )
    os.environ.update(env)
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from django.core.management import call_command
    from django.utils import timezone

    from datasources.apikeys import create_api_key
    from datasources.models import Datasource, Token

    call_command("migrate", verbosity=0)
    Datasource.objects.all().delete()

    upstream = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "upstream_server.py")],
        stdout=subprocess.PIPE,
        text=True,
    )
    upstream_port = int(upstream.stdout.readline())
    datasource = Datasource(
        name="Bench",
        slug="bench",
        base_url=f"http://127.0.0.1:{upstream_port}/",
        grant_type="client_credentials",
        access_token_url="http://127.0.0.1:9/token",
        client_id="bench",
        client_secret="bench-secret",
    )
    datasource.save()
    Token.objects.filter(datasource=datasource).update(
        access_token="bench-access-token",
        status="active",
        expires_at=timezone.now() + timedelta(hours=2),
        last_refreshed_at=timezone.now(),
    )
    _, key = create_api_key("bench")
    if args.features:
        return features(args, env, datasource, key)

    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "config.wsgi",
            "-b",
            f"127.0.0.1:{port}",
            "-w",
            str(args.gunicorn_workers),
            "-k",
            "gthread",
            "--threads",
            str(args.threads),
            "--log-level",
            "warning",
            # One listening socket per worker: the kernel spreads connections across workers.
            # With a shared socket one worker often accepts every keep-alive connection.
            "--reuse-port",
        ],
        cwd=ROOT,
        env=env,
    )
    try:
        wait_until_up(f"http://127.0.0.1:{port}/admin/login/")
        auth = f"Authorization: Api-Key {key}"
        targets = {
            "direct": (f"http://127.0.0.1:{upstream_port}/items", None),
            "proxy": (f"http://127.0.0.1:{port}/api/v1/datasources/bench/proxy/items", auth),
            "naive": (f"http://127.0.0.1:{port}/naive/bench/items", None),
        }
        runs = interleaved(targets, args)
        single = {
            "direct": run_wrk(f"http://127.0.0.1:{upstream_port}/items", args, None, connections=1),
            "proxy": run_wrk(
                f"http://127.0.0.1:{port}/api/v1/datasources/bench/proxy/items",
                args,
                auth,
                connections=1,
            ),
        }
        growth, streamed, seconds = stream_memory(port, key, args.stream_bytes, server.pid)
    finally:
        server.terminate()
        server.wait(10)
        upstream.terminate()

    print()
    print(
        f"gunicorn: {args.gunicorn_workers} workers x {args.threads} threads; wrk: {args.connections} connections, {args.duration}s each in {args.rounds} interleaved rounds"
    )
    print(f"{'':8} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8}")
    for name, (rps, p50, p99) in runs.items():
        print(f"{name:8} {rps:10.0f} {p50:8.2f} {p99:8.2f}")
    d, p, n = runs["direct"], runs["proxy"], runs["naive"]
    sd, sp = single["direct"], single["proxy"]
    print(
        f"one connection: direct p50 {sd[1]:.2f} ms, proxy p50 {sp[1]:.2f} ms, p99 {sp[2]:.2f} ms"
    )
    print(
        f"added p50 latency over direct:   {sp[1] - sd[1]:.2f} ms at 1 connection  (target <= 2 ms)"
    )
    print(
        f"added p50 latency under load:    {p[1] - d[1]:.2f} ms at {args.connections} connections"
    )
    print(f"throughput ours / naive:         {p[0] / n[0]:.2f}x  (target >= 3x)")
    print(f"throughput ours / direct:        {p[0] / d[0]:.2f}")
    print(
        f"streamed {streamed / 1e9:.2f} GB in {seconds:.1f}s ({streamed / seconds / 1e6:.0f} MB/s); "
        f"worker RSS growth: {growth / 1e6:.1f} MB  (target <= 30 MB)"
    )


def start_gunicorn(args, env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "config.wsgi",
            "-b",
            f"127.0.0.1:{port}",
            "-w",
            str(args.gunicorn_workers),
            "-k",
            "gthread",
            "--threads",
            str(args.threads),
            "--log-level",
            "warning",
            "--reuse-port",
        ],
        cwd=ROOT,
        env=env,
    )
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
        f"gunicorn: {args.gunicorn_workers} workers x {args.threads} threads; wrk: "
        f"{args.connections} connections, {args.duration}s each in {args.rounds} interleaved rounds"
    )
    print(f"{'':8} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8}")
    for name, (rps, p50, p99) in runs.items():
        print(f"{name:8} {rps:10.0f} {p50:8.2f} {p99:8.2f}")
    print(f"call-log rows written by 'on': {logged}")
    print(
        f"throughput on / off: {on_rps / off_rps:.3f}  (cost {100 * (1 - on_rps / off_rps):.1f}%, target < 10%)"
    )


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
    raise SystemExit("gunicorn did not start")


def interleaved(
    targets: dict[str, tuple[str, str | None]], args
) -> dict[str, tuple[float, float, float]]:
    """Each target gets --duration seconds in all, in --rounds slices taken in turn, so that a
    slow spell on this shared machine falls on every target alike rather than on one of them.
    Returns requests/s over all slices and the median p50 and p99 of the slices."""
    seconds = max(1, round(args.duration / args.rounds))
    slices: dict[str, list[tuple[float, float, float]]] = {name: [] for name in targets}
    for _ in range(args.rounds):
        for name, (url, header) in targets.items():
            slices[name].append(run_wrk(url, args, header, duration=seconds))
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


def stream_memory(port: int, key: str, size: int, master_pid: int) -> tuple[int, int, float]:
    import requests

    url = f"http://127.0.0.1:{port}/api/v1/datasources/bench/proxy/big?size={size}"
    headers = {"Authorization": f"Api-Key {key}"}
    warm = requests.get(url.replace(str(size), "1000000"), headers=headers, timeout=30)
    assert len(warm.content) == 1_000_000
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
    started = time.perf_counter()
    received = 0
    with requests.get(url, headers=headers, stream=True, timeout=120) as response:
        for chunk in response.iter_content(1024 * 1024):
            received += len(chunk)
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    if received != size:
        raise SystemExit(f"streamed {received} bytes, expected {size}")
    return peak - baseline, received, seconds


if __name__ == "__main__":
    main()
