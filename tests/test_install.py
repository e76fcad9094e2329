"""docs/install.md followed as written, in a fresh project that installs the wheel (#28, goal 5).

The wheel is built from a copy of the repository, installed into a new virtualenv, and
``django-admin startproject config .`` makes the host project (it fails when the wheel ships a
top-level ``config`` package). The page's steps are read from the page itself: every fenced
block after an ``<!-- install-step: ACTION TARGET -->`` comment is applied (``append`` to or
``create`` a project file) or run (``run NAME``), so the page and this test cannot drift; a step
this test does not know fails it. Then, against the running project (uvicorn with the page's
``asgi.py``, gunicorn with startproject's ``wsgi.py``), every step of a newcomer's first day:
``check``, ``migrate``, the admin login page, ``import_datasources``, ``create_api_key``, the
admin's authorization flow, a proxied call carrying the issued token upstream,
``refresh_tokens``, and a Celery worker with the page's ``celery.py`` (and so the app's beat
schedule) refreshing a token that came due.

The peers run in this process on 127.0.0.1: a fake provider (``tests/fakeprovider.py``) that is
the token endpoint and the upstream API at once, and counts every grant it serves. The broker
is Redis (what the page tells a newcomer), on a queue of this run's own.

What the test adds to the page, and why: the wheel's path instead of the package name (it is
not on an index), ``--noinput`` for ``createsuperuser``, free ports instead of 8000, and a
settings block of its own (a private queue; a 2-second sweep, so beat's first tick comes
within the test's patience). The project runs with a clean environment: nothing of this
repository (settings module, ``PYTHONPATH``, database URL) leaks into it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, TypeVar

import pytest
import requests
from cryptography.fernet import Fernet

from . import fakeprovider
from .conftest import SECRET
from .fakeprovider import CLIENT_ID, PROFILES, FakeProvider
from .helpers import ROOT

pytestmark = [pytest.mark.install, pytest.mark.worker]

T = TypeVar("T")

#: A client that ignores proxy variables: everything here is on 127.0.0.1.
HTTP = requests.Session()
HTTP.trust_env = False

PAGE = ROOT / "docs" / "install.md"
STEP = re.compile(
    r"<!-- install-step: (?P<action>append|create|run) (?P<target>\S+) -->\s*\n"
    r"```(?P<language>\w+)\n(?P<body>.*?)```",
    re.DOTALL,
)
#: The commands this test runs, by the name the page gives them.
COMMANDS = {
    *("pip", "fernet-key", "migrate", "createsuperuser", "check"),
    *("worker", "uvicorn", "gunicorn"),
}
#: The files of startproject's layout the page may touch.
FILES = {
    *("config/settings.py", "config/urls.py", "config/__init__.py"),
    *("config/celery.py", "config/asgi.py"),
}
DISTRIBUTION = "django-oauth2-datasources"
ADMIN_PASSWORD = "install-test-" + "p" * 12
#: What the build copies from the repository: not the virtualenvs, data or build leftovers
#: (an in-tree build would also pack stale files from an old ``build/`` directory).
NOT_COPIED = shutil.ignore_patterns(
    ".git", ".venv*", "var", "build", "dist", "*.egg-info", "node_modules", "artifacts",
    "__pycache__", ".pytest*", ".ruff_cache",
)  # fmt: skip


@dataclass(frozen=True)
class Step:
    action: str  # append | create | run
    target: str  # a project file, or a command's name
    body: str


def page_steps() -> list[Step]:
    return [
        Step(match["action"], match["target"], match["body"])
        for match in STEP.finditer(PAGE.read_text(encoding="utf-8"))
    ]


def command(steps: list[Step], name: str) -> list[str]:
    """The page's one-line command called ``name``, as an argument list."""
    (body,) = [step.body for step in steps if step.action == "run" and step.target == name]
    lines = [line for line in body.splitlines() if line.strip()]
    assert len(lines) == 1, f"the page's {name!r} step should be one command: {lines}"
    return shlex.split(lines[0], comments=True)


def test_the_install_page_has_only_steps_this_test_follows():
    """Fast and everywhere: a step added to the page that the install test would not follow,
    or a file outside startproject's layout, fails here (and there)."""
    steps = page_steps()
    # A marker that is misspelt, or not right before its block, would be skipped silently.
    assert len(steps) == PAGE.read_text(encoding="utf-8").count("<!-- install-step:")
    runs = {step.target for step in steps if step.action == "run"}
    files = {step.target for step in steps if step.action != "run"}
    assert runs == COMMANDS
    assert files == FILES
    for name in COMMANDS:
        command(steps, name)
    for step in steps:
        if step.action != "run":
            compile(step.body, step.target, "exec")  # each file block is valid Python


# --- the processes -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tail(text: str | bytes, size: int = 3000) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return text[-size:]


def wait_until(predicate: Callable[[], T], timeout: float, what: str) -> T:
    """Poll every 0.1 s (the project's subprocesses are slow to change)."""
    return fakeprovider.wait_until(predicate, timeout, interval=0.1, what=what)


class Project:
    """The host project: a directory, its virtualenv and the environment its commands run in."""

    def __init__(self, directory: Path, venv: Path, env: dict[str, str]) -> None:
        self.directory, self.venv, self.env = directory, venv, env
        self.processes: list[tuple[subprocess.Popen, IO[bytes], Path]] = []

    def argv(self, args: list[str]) -> list[str]:
        """The page's command run with the project's virtualenv (as with it activated)."""
        program = self.venv / "bin" / args[0]
        assert program.exists(), f"{args[0]} is not installed in the project's virtualenv"
        return [str(program), *args[1:]]

    def run(
        self, args: list[str], *, env: dict[str, str] | None = None, timeout: float = 180
    ) -> subprocess.CompletedProcess:
        started = time.monotonic()
        result = subprocess.run(
            self.argv(args),
            cwd=self.directory,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        # stderr only: some commands print a secret on stdout (create_api_key, the Fernet key).
        assert result.returncode == 0, f"{shlex.join(args)} failed:\n{tail(result.stderr)}"
        # A transcript for `pytest -s` (the command and its exit, never its output).
        print(f"$ {shlex.join(args)[:100]}  -> exit 0 ({time.monotonic() - started:.1f}s)")
        return result

    def start(self, args: list[str], name: str) -> subprocess.Popen:
        log_path = self.directory / f"{name}.log"
        log = open(log_path, "wb")  # noqa: SIM115 (closed in stop())
        process = subprocess.Popen(
            self.argv(args),
            cwd=self.directory,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes.append((process, log, log_path))
        print(f"$ {shlex.join(args)[:100]} &  (pid {process.pid}, log {log_path.name})")
        return process

    def alive(self, process: subprocess.Popen) -> bool:
        if process.poll() is None:
            return True
        (log_path,) = [path for p, _, path in self.processes if p is process]
        raise AssertionError(
            f"{log_path.stem} exited with {process.returncode}:\n{tail(log_path.read_bytes())}"
        )

    def stop(self) -> None:
        for process, _, _ in self.processes:
            if process.poll() is None:
                process.terminate()
        for process, log, _ in self.processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                # The whole session: a server's or the worker's children too.
                os.killpg(process.pid, 9)
                process.wait(10)
            log.close()


@contextmanager
def fake_provider() -> Iterator[FakeProvider]:
    provider = FakeProvider(PROFILES["rfc"]).start()
    try:
        yield provider
    finally:
        provider.stop()


def redis_url() -> str:
    """The broker: the run's Redis (REDIS_URL) or the local one on a database tests may use."""
    import redis

    url = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/15"
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except redis.RedisError as err:
        pytest.skip(f"the install test needs Redis (the page's broker) at {url}: {err}")
    return url


# --- building and installing -----------------------------------------------------------------


def build_wheel(directory: Path) -> Path:
    """The wheel, built from a copy of the repository (an in-tree build writes ``build/`` and
    would pack whatever an earlier build left there)."""
    source = directory / "source"
    shutil.copytree(ROOT, source, ignore=NOT_COPIED)
    wheels = directory / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(wheels), source],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        top = {name.split("/")[0] for name in archive.namelist()}
    assert {name for name in top if not name.endswith(".dist-info")} == {"datasources"}, top
    return wheel


def clean_env(venv: Path) -> dict[str, str]:
    """What a shell with the project's virtualenv activated has: none of this repository's
    variables (DJANGO_SETTINGS_MODULE, PYTHONPATH, DATABASE_URL, broker URLs...), but this
    machine's pip configuration (an index mirror, certificates)."""
    keep = ("HOME", "LANG", "LC_ALL", "TMPDIR", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")
    env = {name: os.environ[name] for name in keep if name in os.environ}
    env.update({name: value for name, value in os.environ.items() if name.startswith("PIP_")})
    env["PATH"] = os.pathsep.join([str(venv / "bin"), "/usr/local/bin", "/usr/bin", "/bin"])
    env["VIRTUAL_ENV"] = str(venv)
    # gunicorn 27's control socket goes here (else one per user, shared with other runs).
    runtime = venv.parent / "run"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env["XDG_RUNTIME_DIR"] = str(runtime)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def pip_install(project: Project, args: list[str], wheel: Path) -> None:
    """The page's ``pip install "<distribution>[extras]"`` with the wheel in the name's place."""
    requirement = re.compile(rf"^{re.escape(DISTRIBUTION)}(\[[\w,]+\])?$")
    wanted = [arg for arg in args if requirement.match(arg)]
    assert args[:2] == ["pip", "install"] and len(wanted) == 1, args
    extras = requirement.match(wanted[0])[1] or ""
    project.run([arg if arg != wanted[0] else f"{wheel}{extras}" for arg in args], timeout=600)


def with_port(args: list[str], option: str, port: int) -> list[str]:
    """The page's server command listening on ``port`` (127.0.0.1:8000 on the page)."""
    index = args.index(option)
    value = args[index + 1]
    assert value in ("8000", "127.0.0.1:8000"), args
    return [*args[: index + 1], value.replace("8000", str(port)), *args[index + 2 :]]


# --- the journey -----------------------------------------------------------------------------


def sign_in(base: str) -> requests.Session:
    """The admin's login form, as a browser fills it in."""
    session = requests.Session()
    session.trust_env = False
    page = session.get(f"{base}/admin/login/", timeout=30)
    assert page.status_code == 200, page.text[:500]
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
    assert token, page.text[:2000]
    signed_in = session.post(
        f"{base}/admin/login/?next=/admin/",
        data={
            "csrfmiddlewaretoken": token[1],
            "username": "admin",
            "password": ADMIN_PASSWORD,
            "next": "/admin/",
        },
        allow_redirects=False,
        timeout=30,
    )
    assert signed_in.status_code == 302 and signed_in.headers["Location"] == "/admin/", (
        signed_in.status_code,
        signed_in.text[:1000],
    )
    return session


def authorize(session: requests.Session, base: str, slug: str) -> None:
    """Authorize in the admin: find the datasource in the list, click Authorize, consent at the
    provider (which redirects back at once), land on the callback."""
    listing = session.get(f"{base}/admin/datasources/datasource/", timeout=30)
    assert listing.status_code == 200, listing.text[:1000]
    assert slug in listing.text
    (pk,) = set(re.findall(r"/admin/datasources/datasource/(\d+)/change/", listing.text))
    start = session.get(
        f"{base}/admin/datasources/datasource/{pk}/authorize/", allow_redirects=False, timeout=30
    )
    assert start.status_code == 302, start.text[:1000]
    consent = session.get(start.headers["Location"], allow_redirects=False, timeout=30)
    assert consent.status_code == 302, consent.text[:500]
    callback = consent.headers["Location"]
    assert callback.startswith(f"{base}/api/v1/datasources/authorize?"), callback
    landed = session.get(callback, allow_redirects=False, timeout=30)
    assert landed.status_code == 302, landed.text[:1000]
    assert landed.headers["Location"].startswith(f"/admin/datasources/datasource/{pk}/")


def token_row(database: Path) -> tuple:
    """The datasource's token as stored (the access token encrypted), read straight from the
    project's SQLite file."""
    with sqlite3.connect(database, timeout=20) as connection:
        return connection.execute(
            "SELECT access_token, refresh_token, last_refreshed_at FROM datasources_token"
        ).fetchone()


def test_a_fresh_project_installs_the_wheel_by_following_the_install_page(tmp_path):
    broker = redis_url()
    steps = page_steps()
    wheel = build_wheel(tmp_path)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    directory = tmp_path / "project"
    directory.mkdir()
    project = Project(directory, venv, clean_env(venv))
    pip_install(project, command(steps, "pip"), wheel)
    project.run(["django-admin", "startproject", "config", "."])

    key = project.run(command(steps, "fernet-key")).stdout.strip()
    Fernet(key)  # a valid key, which the project's settings read from the environment
    queue = f"install-{uuid.uuid4().hex[:8]}"
    project.env.update(
        FERNET_KEYS=key,
        CELERY_BROKER_URL=broker,
        DATASOURCE_SECRET_CRM=SECRET,  # the import file's {"env": ...} secret
    )
    for step in steps:
        if step.action == "run":
            continue
        path = directory / step.target
        if step.action == "append":
            assert path.exists(), f"the page appends to {step.target}, which startproject made"
            path.write_text(path.read_text() + "\n\n" + step.body)
        else:
            path.write_text(step.body)
    settings = directory / "config" / "settings.py"
    settings.write_text(
        settings.read_text()
        + "\n\n# tests/test_install.py: a queue of this run's own; beat's first tick soon.\n"
        + f"CELERY_TASK_DEFAULT_QUEUE = {queue!r}\n"
        + 'DATASOURCES["SWEEP_INTERVAL"] = 2\n'
    )

    project.run(command(steps, "migrate"))
    superuser = ("--noinput", "--username", "admin", "--email", "admin@example.com")
    project.run(
        [*command(steps, "createsuperuser"), *superuser],
        env={"DJANGO_SUPERUSER_PASSWORD": ADMIN_PASSWORD},
    )
    checked = project.run(command(steps, "check"))
    assert "System check identified no issues" in checked.stdout, checked.stdout + checked.stderr

    with fake_provider() as provider:
        datasources_file = directory / "datasources.json"
        datasources_file.write_text(
            json.dumps(
                [
                    {
                        "name": "CRM",
                        "slug": "crm",
                        "base_url": f"{provider.url}/api/",
                        "grant_type": "authorization_code",
                        "authorization_url": f"{provider.url}/authorize",
                        "access_token_url": f"{provider.url}/token",
                        "client_id": CLIENT_ID,
                        "client_secret": {"env": "DATASOURCE_SECRET_CRM"},
                        "scopes": "read write",
                    }
                ]
            )
        )
        imported = project.run(["python", "manage.py", "import_datasources", "datasources.json"])
        assert "created crm" in imported.stdout, imported.stdout
        created = project.run(
            ["python", "manage.py", "create_api_key", "install-test", "--datasource", "crm"]
        )
        api_key = created.stdout.strip().splitlines()[-1]
        assert api_key.startswith("dsk_"), "create_api_key printed no key"

        asgi_port, wsgi_port = free_port(), free_port()
        try:
            uvicorn = project.start(with_port(command(steps, "uvicorn"), "--port", asgi_port), "uv")
            gunicorn = project.start(with_port(command(steps, "gunicorn"), "-b", wsgi_port), "gu")
            asgi, wsgi = f"http://127.0.0.1:{asgi_port}", f"http://127.0.0.1:{wsgi_port}"
            for server, base in ((uvicorn, asgi), (gunicorn, wsgi)):
                wait_until(
                    lambda server=server, base=base: project.alive(server) and login_page(base),
                    90,
                    f"the admin login page at {base}",
                )

            authorize(sign_in(asgi), asgi, "crm")
            (code_grant,) = provider.calls("authorization_code")
            assert code_grant.outcome == "issued"
            issued = code_grant.answer["access_token"]

            # The proxy, under ASGI (the page's wrapper: the fast lane) and under WSGI (the
            # view): the token the provider issued reaches the upstream, the key does not.
            for base in (asgi, wsgi):
                answer = HTTP.get(
                    f"{base}/api/v1/datasources/crm/proxy/me",
                    headers={"Authorization": f"Api-Key {api_key}"},
                    timeout=30,
                )
                assert answer.status_code == 200, answer.text[:1000]
                assert answer.json()["path"] == "me"
                upstream = provider.api()[-1]
                assert upstream.headers["Authorization"] == f"Bearer {issued}"
                assert api_key not in json.dumps(upstream.headers)
            assert len(provider.api()) == 2

            # refresh_tokens (cron's sweep) refreshes a token that is due: made so here by
            # moving its expiry into the past, the way time would.
            project.run(
                [
                    *("python", "manage.py", "shell", "-c"),
                    "from datetime import timedelta; from django.utils import timezone; "
                    "from datasources.models import Token; "
                    "past = timezone.now() - timedelta(seconds=1); "
                    "assert Token.objects.update(expires_at=past, refresh_due_at=past) == 1",
                ]
            )
            # From now on the provider issues 5-second tokens: the one refresh_tokens gets
            # comes due for the background within seconds, with no help.
            provider.profile = replace(provider.profile, lifetime=5)
            swept = project.run(["python", "manage.py", "refresh_tokens"])
            assert "1 refreshed" in swept.stdout, swept.stdout
            (first,) = provider.refresh_calls()
            assert first.outcome == "issued"
            assert first.refresh_token_sent == code_grant.answer["refresh_token"]
            after_cron = token_row(directory / "db.sqlite3")

            # The page's worker command, beat embedded, with the page's celery.py: the app's
            # beat schedule sweeps, a worker refreshes the token that came due.
            worker = project.start(command(steps, "worker"), "worker")
            refreshed = wait_until(
                lambda: (
                    project.alive(worker)
                    and [c for c in provider.refresh_calls()[1:] if c.outcome == "issued"]
                ),
                120,
                "a refresh by the Celery worker",
            )
            assert refreshed[0].refresh_token_sent == first.answer["refresh_token"]
            wait_until(
                lambda: token_row(directory / "db.sqlite3") != after_cron,
                30,
                "the worker's refresh in the token row",
            )
            now = token_row(directory / "db.sqlite3")
            assert now[0] != after_cron[0] and now[2] != after_cron[2]
        finally:
            project.stop()
            forget_queue(broker, queue)


def login_page(base: str) -> bool:
    try:
        return HTTP.get(f"{base}/admin/login/", timeout=5).status_code == 200
    except requests.ConnectionError:
        return False


def forget_queue(url: str, queue: str) -> None:
    """Remove the run's queue and its exchange's bindings from Redis."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    client.delete(queue, f"_kombu.binding.{queue}")
