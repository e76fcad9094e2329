"""Real Celery workers (subprocesses) with beat, on the filesystem broker or on Redis when
REDIS_URL is set, refreshing tokens at django-oauth-toolkit with no traffic."""

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone
from oauth2_provider.models import RefreshToken

from datasources.models import Token, TokenStatus

from .conftest import make_datasource
from .helpers import ROOT, subprocess_env

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]


def broker_env(tmp_path) -> dict[str, str]:
    env = {
        "DATA_DIR": str(tmp_path),
        "CELERY_TASK_DEFAULT_QUEUE": f"test-{uuid.uuid4().hex[:8]}",
        "DATASOURCES_SWEEP_INTERVAL": "1",
        "DATASOURCES_REFRESH_MARGIN": "8",
    }
    redis_url = os.environ.get("REDIS_URL")
    if redis_url:
        _require_redis(redis_url)
        env["CELERY_BROKER_URL"] = redis_url
    else:
        env["CELERY_BROKER_URL"] = "filesystem://"
    return env


def _require_redis(url: str) -> None:
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except redis.RedisError as err:
        pytest.skip(f"REDIS_URL is set but Redis is not reachable: {err}")


class Workers:
    def __init__(
        self, tmp_path, count: int, concurrency: int = 2, env: dict[str, str] | None = None
    ) -> None:
        env = subprocess_env(**{**broker_env(tmp_path), **(env or {})})
        self.env = env
        self.procs = []
        self.logs = []
        for number in range(count):
            log = open(tmp_path / f"worker{number}.log", "w+")  # noqa: SIM115
            args = [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "config",
                "worker",
                "--loglevel=INFO",
                f"--concurrency={concurrency}",
                f"--hostname=w{number}-{uuid.uuid4().hex[:6]}@%h",
                "-Q",
                env["CELERY_TASK_DEFAULT_QUEUE"],
                "--without-mingle",
                "--without-gossip",
            ]
            if number == 0:
                args += ["--beat", f"--schedule={tmp_path / 'beat-schedule'}"]
            self.procs.append(
                subprocess.Popen(
                    args,
                    env=env,
                    cwd=ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group: children are stopped too
                )
            )
            self.logs.append(log)

    def output(self) -> str:
        text = []
        for log in self.logs:
            log.flush()
            log.seek(0)
            text.append(log.read())
        return "\n".join(text)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            # Pool children that outlived their parent would keep database sessions open.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture
def workers(tmp_path):
    started = []

    def start(count: int = 1, concurrency: int = 2, env: dict[str, str] | None = None) -> Workers:
        group = Workers(tmp_path, count, concurrency, env)
        started.append(group)
        return group

    yield start
    for group in started:
        group.stop()
    _wait_for_worker_sessions_to_close()


def _wait_for_worker_sessions_to_close(timeout: float = 10.0) -> None:
    """A killed worker's PostgreSQL backend ends a moment after the process; wait for it so the
    test database can be dropped at the end of the run."""
    from django.db import connection

    if connection.vendor != "postgresql":
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            if cursor.fetchone()[0] == 0:
                return
        time.sleep(0.1)


def wait_for(predicate, timeout: float, group: Workers) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if any(proc.poll() is not None for proc in group.procs):
            raise AssertionError("a worker exited early:\n" + group.output()[-4000:])
        time.sleep(0.25)
    raise AssertionError("timed out; worker output:\n" + group.output()[-4000:])


def test_worker_refreshes_a_short_lived_token_before_it_expires(auth_server, authorize, workers):
    from oauth2_provider.models import AccessToken

    auth_server.app("client-basic")
    datasource = make_datasource(auth_server)
    token = authorize(datasource)
    # Make it short-lived at the provider and here: 12 seconds left.
    soon = timezone.now() + timedelta(seconds=12)
    AccessToken.objects.update(expires=soon)
    Token.objects.filter(pk=token.pk).update(
        expires_at=soon, refresh_due_at=soon - timedelta(seconds=8)
    )
    token.refresh_from_db()
    original_expiry = token.expires_at
    assert (original_expiry - timezone.now()).total_seconds() <= 15

    # A datasource that needs re-authorization must be left alone.
    auth_server.app("client-body")
    broken = make_datasource(auth_server, slug="broken", client_id="client-body")
    Token.objects.filter(datasource=broken).update(
        status=TokenStatus.NEEDS_REAUTHORIZATION,
        access_token="dead",
        refresh_token="dead-refresh",
        expires_at=timezone.now() - timedelta(minutes=1),
    )

    group = workers(1)
    wait_for(lambda: Token.objects.get(datasource=datasource).refresh_count >= 1, 60, group)
    refreshed = Token.objects.get(datasource=datasource)
    assert refreshed.last_refreshed_at < original_expiry
    assert refreshed.access_token != token.access_token
    assert refreshed.expires_at > original_expiry
    import requests

    echo = requests.get(
        f"{auth_server.base}/upstream/me",
        headers={"Authorization": f"Bearer {refreshed.access_token}"},
        timeout=10,
    )
    assert echo.status_code == 200
    still_broken = Token.objects.get(datasource=broken)
    assert still_broken.status == TokenStatus.NEEDS_REAUTHORIZATION
    assert still_broken.refresh_count == 0 and still_broken.failure_count == 0


def test_two_workers_never_refresh_the_same_token_twice(auth_server, authorize, workers):
    auth_server.app("client-basic")
    datasources = []
    for number in range(12):
        datasource = make_datasource(auth_server, slug=f"ds-{number}", name=f"DS {number}")
        authorize(datasource)
        datasources.append(datasource)
    refresh_rows_before = RefreshToken.objects.count()
    # As a store would leave tokens this close to expiry: due for the background now.
    Token.objects.update(
        expires_at=timezone.now() + timedelta(seconds=3), refresh_due_at=timezone.now()
    )

    group = workers(2, concurrency=2)
    wait_for(
        lambda: Token.objects.filter(refresh_count__gte=1).count() == len(datasources),
        90,
        group,
    )
    time.sleep(3)  # let a few more sweeps run: nothing is due any more
    counts = list(Token.objects.values_list("refresh_count", flat=True))
    assert counts == [1] * len(datasources)
    assert RefreshToken.objects.count() == refresh_rows_before + len(datasources)
    assert not Token.objects.exclude(status=TokenStatus.ACTIVE).exists()


def send_task(group: Workers, name: str) -> None:
    """Send task ``name`` to the workers' queue on their broker (not the test process's)."""
    from kombu import Connection

    from config.celery import app
    from config.paths import broker_folders, filesystem_transport_options

    url = group.env["CELERY_BROKER_URL"]
    options, transport = {}, None
    if url.startswith("filesystem://"):
        transport = "config.fsbroker:Transport"
        data_dir = Path(group.env["DATA_DIR"])
        for folder in broker_folders(data_dir).values():  # the worker may not have made them yet
            folder.mkdir(parents=True, exist_ok=True)
        options = filesystem_transport_options(data_dir)
    with Connection(url, transport=transport, transport_options=options) as connection:
        app.send_task(name, queue=group.env["CELERY_TASK_DEFAULT_QUEUE"], connection=connection)


def test_one_sweep_drains_a_backlog_larger_than_a_batch(auth_server, authorize, workers):
    """12 due tokens, batches of 5, and no further beat tick for an hour: the one sweep keeps
    enqueuing until nothing is due, and every token is refreshed exactly once."""
    auth_server.app("client-basic")
    for number in range(12):
        authorize(make_datasource(auth_server, slug=f"ds-{number}", name=f"DS {number}"))
    refresh_rows_before = RefreshToken.objects.count()
    # As a store would leave hour-long tokens seconds from expiry (the workers' margin is 8 s):
    # due now.
    Token.objects.update(
        expires_at=timezone.now() + timedelta(seconds=5),
        last_refreshed_at=timezone.now() - timedelta(seconds=3595),
        refresh_due_at=timezone.now(),
    )
    group = workers(
        1, env={"DATASOURCES_SWEEP_BATCH_SIZE": "5", "DATASOURCES_SWEEP_INTERVAL": "3600"}
    )
    send_task(group, "datasources.tasks.sweep")
    wait_for(lambda: not Token.objects.filter(refresh_count=0).exists(), 60, group)
    assert list(Token.objects.values_list("refresh_count", flat=True)) == [1] * 12
    assert RefreshToken.objects.count() == refresh_rows_before + 12
    assert "sweep enqueued 12 token refresh(es)" in group.output()
    # Each refreshed token is scheduled again, about an hour ahead.
    assert not Token.objects.filter(refresh_due_at__lt=timezone.now() + timedelta(minutes=50))


# --- database failover ----------------------------------------------------------------------

WORKER_APPLICATION_NAME = "datasources-failover-worker"


def persistent_connection_settings(tmp_path) -> dict[str, str]:
    """Environment for a worker that keeps its database connections as in production.

    tests/settings.py sets CONN_MAX_AGE=0 for the live server's threads; a worker with that
    setting would get a new connection whenever something closes the old one, which hides the
    failure this test is about. The worker gets the production shape instead (persistent
    connections, health checks on) and names its sessions so the test can see them.
    """
    module = tmp_path / "failover_worker_settings.py"
    module.write_text(
        "from tests.settings import *  # noqa: F403\n"
        "from tests.settings import DATABASES\n"
        'DATABASES["default"]["CONN_MAX_AGE"] = 600\n'
        'DATABASES["default"]["CONN_HEALTH_CHECKS"] = True\n'
        'DATABASES["default"]["OPTIONS"] = {\n'
        '    **DATABASES["default"].get("OPTIONS", {}),\n'
        f'    "application_name": "{WORKER_APPLICATION_NAME}",\n'
        "}\n"
    )
    return {
        "DJANGO_SETTINGS_MODULE": module.stem,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)]),
    }


def worker_sessions() -> list[int]:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = %s",
            [WORKER_APPLICATION_NAME],
        )
        return [row[0] for row in cursor.fetchall()]


def terminate_other_sessions() -> list[tuple[str, bool]]:
    """What a PostgreSQL restart or failover does to every client: their sessions end."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT application_name, pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return list(cursor.fetchall())


@pytest.mark.postgres_only
def test_worker_survives_its_database_connections_being_cut(
    auth_server, authorize, workers, tmp_path
):
    auth_server.app("client-basic")
    datasource = make_datasource(auth_server)
    authorize(datasource)
    Token.objects.filter(datasource=datasource).update(
        # As a store would leave a token this close to expiry: due for the background now.
        expires_at=timezone.now() + timedelta(seconds=3),
        refresh_due_at=timezone.now(),
    )
    # One pool process: the connection that is cut is the one the next task must use.
    group = workers(1, concurrency=1, env=persistent_connection_settings(tmp_path))
    wait_for(lambda: Token.objects.get(datasource=datasource).refresh_count == 1, 60, group)
    # The worker keeps its connection between tasks (CELERY_DB_REUSE_MAX + CONN_MAX_AGE): the
    # sweep runs every second, so a session of its pool process is there to be cut.
    wait_for(lambda: bool(worker_sessions()), 10, group)
    cut = set(worker_sessions())

    killed = terminate_other_sessions()
    assert (WORKER_APPLICATION_NAME, True) in killed, killed
    Token.objects.filter(datasource=datasource).update(
        # As a store would leave a token this close to expiry: due for the background now.
        expires_at=timezone.now() + timedelta(seconds=3),
        refresh_due_at=timezone.now(),
    )

    wait_for(lambda: Token.objects.get(datasource=datasource).refresh_count == 2, 30, group)
    token = Token.objects.get(datasource=datasource)
    assert token.status == TokenStatus.ACTIVE
    assert RefreshToken.objects.get(revoked__isnull=True).token == token.refresh_token
    import requests

    echo = requests.get(
        f"{auth_server.base}/upstream/me",
        headers={"Authorization": f"Bearer {token.access_token}"},
        timeout=10,
    )
    assert echo.status_code == 200
    # It works on a new session, not on a resurrected one.
    assert set(worker_sessions()).isdisjoint(cut)


def test_every_task_of_the_app_gets_the_database_failover_hooks():
    """The connection hooks run only around the app's own tasks (named in _OWN_TASKS): a task
    added without its name there would run on a connection that a failover left broken."""
    from celery import current_app

    from datasources import tasks

    current_app.loader.import_default_modules()
    ours = {name for name in current_app.tasks if name.startswith("datasources.tasks.")}
    assert ours, "no datasources task registered"
    assert ours == set(tasks._OWN_TASKS)
