"""The README's production web servers as test subprocesses: its uvicorn command (ASGI, the
proxy's fast lane) and its gunicorn command (WSGI), parsed from README.md so a test breaks when
the recipe changes shape, with the project's own (production) settings. Shared by the
production-recipe test (tests/test_deploy.py, behind nginx) and the database-outage test
(tests/test_database_outage.py, called directly so each keep-alive connection stays on one
worker)."""

from __future__ import annotations

import re
import shlex
import socket
import sys
import time

import gunicorn
import requests

from .helpers import ROOT, subprocess_env

SERVERS = ("uvicorn", "gunicorn")


def readme_command(server: str) -> str:
    """The README's command for ``server``: uvicorn's is the ``web:`` line of the production
    layout, gunicorn's the WSGI alternative below it."""
    text = (ROOT / "README.md").read_text()
    if server == "uvicorn":
        found = [line.removeprefix("web:") for line in text.splitlines() if line.startswith("web:")]
    else:
        found = re.findall(r"`(gunicorn config\.wsgi [^`]*)`", text)
    assert len(found) == 1, f"README.md changed shape: {len(found)} {server} commands"
    return " ".join(found[0].split("#", 1)[0].split())


def server_argv(server: str, port: int, *, workers: int | None = None) -> list[str]:
    """The README's command, listening on ``port`` and run with this interpreter; ``workers``:
    that many worker processes instead of the README's (a test machine's cores are few)."""
    command = readme_command(server)
    address = {"uvicorn": "--host 127.0.0.1 --port 8000", "gunicorn": "-b 127.0.0.1:8000"}[server]
    assert command.count(address) == 1, f"README.md changed shape: {address!r} in {command!r}"
    local = {"uvicorn": f"--host 127.0.0.1 --port {port}", "gunicorn": f"-b 127.0.0.1:{port}"}
    command = command.replace(address, local[server])
    if workers is not None:
        pattern = {"uvicorn": r"--workers \d+", "gunicorn": r"-w \d+"}[server]
        assert len(re.findall(pattern, command)) == 1, f"README.md changed shape: {command!r}"
        option = {"uvicorn": "--workers", "gunicorn": "-w"}[server]
        command = re.sub(pattern, f"{option} {workers}", command)
    argv = shlex.split(command)
    assert argv[0] == server, argv
    if server == "gunicorn" and gunicorn.version_info >= (27,):
        # gunicorn 27's control socket is one path per user: not shared with others.
        argv.append("--no-control-socket")
    return [sys.executable, "-m", *argv]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, deadline: float, **kwargs) -> None:
    """Poll ``url`` until it answers 200; fail at ``deadline`` (``time.monotonic()``)."""
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=1, **kwargs).status_code == 200:
                return
        except requests.RequestException as err:
            last = err
        time.sleep(0.1)
    raise AssertionError(f"{url} did not come up: {last}")


def server_env(django_db_blocker, **extra: str) -> dict[str, str]:
    """The environment of a web server run with the project's own (production) settings,
    against the test process's database (``DATABASE_URL`` can be overridden in ``extra``)."""
    with django_db_blocker.unblock():
        return subprocess_env(
            **{
                "DJANGO_SETTINGS_MODULE": "config.settings",  # the project's own (production)
                "SECURE_PROXY_SSL_HEADER_ENABLED": "1",
                "DEBUG": "0",
                # Each request sent upstream is logged (test_deploy's LANE_LOGGER, VIEW_LOGGER):
                # which path served it.
                "LOG_LEVEL": "DEBUG",
                **extra,
            }
        )
