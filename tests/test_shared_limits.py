"""The rate-limit memory and the circuit breaker are shared by every process: two gunicorn
servers (one worker process each, so which process answers is certain) on the same database
(and Redis, when REDIS_URL is set), in front of a real flaky upstream that counts its calls.

They run with the test settings (HEALTH_CACHE_SECONDS 0: every call reads the shared record;
with the default of 1 s a process may send one more call within that second)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import gunicorn
import pytest
import requests

from datasources.proxy.apikeys import create_api_key

from .appserver import free_port, wait_for
from .flaky import status
from .helpers import ROOT, subprocess_env
from .test_retries import flaky_datasource

pytestmark = pytest.mark.django_db(transaction=True)


def server_command(kind: str, port: int) -> list[str]:
    """One process of each serving path: gunicorn (config.wsgi) or uvicorn (config.asgi)."""
    if kind == "asgi":
        return [
            *(sys.executable, "-m", "uvicorn", "config.asgi:application", "--workers", "1"),
            *("--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop"),
            *("--http", "httptools", "--no-access-log"),
        ]
    return [
        *(sys.executable, "-m", "gunicorn", "config.wsgi", "-k", "gthread", "-w", "1"),
        *("--threads", "2", "-b", f"127.0.0.1:{port}"),
        *(["--no-control-socket"] if gunicorn.version_info >= (27,) else []),
    ]


@pytest.fixture(scope="module", params=["wsgi", "asgi"])
def workers(request, django_db_setup, django_db_blocker, tmp_path_factory) -> Iterator[list[str]]:
    """Two server processes of one serving path (the proxy behaves the same on both)."""
    directory = tmp_path_factory.mktemp("workers")
    with django_db_blocker.unblock():
        env = subprocess_env()
    processes, urls = [], []
    try:
        for n in range(2):
            port = free_port()
            log = open(directory / f"server-{n}.log", "wb")  # noqa: SIM115 (closed below)
            processes.append(
                (
                    subprocess.Popen(
                        server_command(request.param, port),
                        cwd=ROOT,
                        env={**env, "DJANGO_SETTINGS_MODULE": "tests.settings"},
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    ),
                    log,
                )
            )
            urls.append(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 60
        for url in urls:
            wait_for(f"{url}/healthz", deadline)
        yield urls
    finally:
        for process, _ in processes:
            process.terminate()
        for process, log in processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
            log.close()


def get(base: str, slug: str, path: str, key: str) -> requests.Response:
    return requests.get(
        f"{base}/api/v1/datasources/{slug}/proxy/{path}",
        headers={"Authorization": f"Api-Key {key}"},
        timeout=30,
    )


def test_the_second_worker_answers_429_without_calling_the_upstream(workers, flaky):
    flaky_datasource(flaky, slug="shared-limit")
    _, key = create_api_key("app")
    first, second = workers
    flaky.script("/api/items", status(429, Retry_After="120"))

    answered = get(first, "shared-limit", "items", key)
    assert answered.status_code == 429 and flaky.count("/api/items") == 1

    remembered = get(second, "shared-limit", "items", key)
    assert remembered.status_code == 429
    assert remembered.json()["error"] == "rate_limited"
    assert 100 <= int(remembered.headers["Retry-After"]) <= 120
    assert get(first, "shared-limit", "items", key).status_code == 429
    assert flaky.count("/api/items") == 1  # neither process called it again


def test_failures_seen_by_one_worker_open_the_circuit_for_the_other(workers, flaky):
    flaky_datasource(flaky, slug="shared-breaker")
    _, key = create_api_key("app")
    first, second = workers
    flaky.always["/api/items"] = status(502)
    # The default threshold (5 consecutive failures), spread over both processes.
    for base in (first, second, first, second, first):
        assert get(base, "shared-breaker", "items", key).status_code == 502
    assert flaky.count("/api/items") == 5
    for base in (second, first):
        refused = get(base, "shared-breaker", "items", key)
        assert refused.status_code == 503 and refused.json()["error"] == "circuit_open"
    assert flaky.count("/api/items") == 5
