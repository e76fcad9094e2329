"""A PostgreSQL server of a test's own, to restart, stop and cut while the app runs against it.

The suite's shared PostgreSQL (``DATABASE_URL``) belongs to every test and to other runs on the
machine; a test that restarts its database server needs one nobody else uses. This module
starts one with Debian's server binaries (``/usr/lib/postgresql/<newest>/bin``: ``initdb``,
``pg_ctl``), in a directory of its own, on a free loopback TCP port, with trust authentication
and its unix socket in that directory (never /var/run/postgresql, which the system server
owns)::

    cluster = PgCluster().start()
    cluster.create_database("app")
    env["DATABASE_URL"] = cluster.url("app")
    cluster.restart()                      # pg_ctl restart -m fast
    with cluster.stopped(6) as outage:     # down for 6 s, then started again
        ...                                # outage.back_at: when it answered again
    cluster.kill_backends("app")           # every session of "app" ends, as in a failover
    cluster.close()

PostgreSQL refuses to run as root (initdb and postgres both). When this process is root, the
server runs as the ``postgres`` system user (``runuser``), and its directory is owned by that
user; the directory is then made in the system's temporary directory (world-traversable), not
under a pytest ``tmp_path``, whose parents are private to root. The short path also keeps the
socket's path under the 107-byte limit of unix sockets.

Every wait polls with a deadline: the server is "up" when a ``SELECT 1`` answers, "down" when
``pg_ctl status`` says so; nothing sleeps for a guessed time.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

#: Where Debian installs the server binaries, one directory per major version.
DEBIAN_ROOT = Path("/usr/lib/postgresql")
#: The superuser initdb creates (trust authentication: no password).
SUPERUSER = "postgres"
#: The system user the server runs as when this process is root.
SYSTEM_USER = "postgres"
#: Longest a start, stop or restart may take before the test fails (a loaded CI machine).
DEADLINE = 60.0


class PgClusterError(RuntimeError):
    """A PostgreSQL command failed; the message carries its output and the server log's end."""


def server_bin() -> Path:
    """The newest installed server version's bin directory (``PG_BIN`` overrides it).

    Found rather than hard-coded: Debian 12 ships 15, 13 ships 17, and a developer may have
    several."""
    override = os.environ.get("PG_BIN")
    if override:
        return Path(override)
    versions = []
    if DEBIAN_ROOT.is_dir():
        for entry in DEBIAN_ROOT.iterdir():
            if (entry / "bin" / "initdb").exists() and re.fullmatch(r"\d+(\.\d+)?", entry.name):
                versions.append((float(entry.name), entry / "bin"))
    if not versions:
        raise PgClusterError(
            f"no PostgreSQL server under {DEBIAN_ROOT} (apt-get install postgresql; "
            "`make test` does it as root)"
        )
    return max(versions)[1]


def available() -> bool:
    """Whether a cluster can be started here (the server binaries are installed)."""
    try:
        server_bin()
    except PgClusterError:
        return False
    return True


def free_port() -> int:
    """A loopback TCP port nobody listens on now (:meth:`PgCluster.start` retries if another
    process takes it before the server binds it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Outage:
    """What :meth:`PgCluster.stopped` measured, on ``time.monotonic()``'s clock."""

    stopped_at: float = 0.0  # pg_ctl stop returned: the server is down
    starting_at: float = 0.0  # pg_ctl start was called
    back_at: float = 0.0  # a SELECT 1 answered again: the database is back


class PgCluster:
    """One PostgreSQL server in its own directory, for one test (or one module).

    ``directory``: where to make the cluster's directory (default: the system's temporary
    directory). As root it is used only if the ``postgres`` user can reach it, else the
    system's temporary directory is (see the module's docstring). ``settings``: extra
    ``postgresql.conf`` lines (name -> value) on top of :attr:`SETTINGS`.
    """

    #: Fast and small: a test server holds nothing worth an fsync; enough connections for
    #: gunicorn's threads, uvicorn's workers, a Celery worker and the test itself.
    SETTINGS = {
        "listen_addresses": "'127.0.0.1'",
        "max_connections": "200",
        "shared_buffers": "32MB",
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "logging_collector": "off",
        "log_min_messages": "warning",
        "log_line_prefix": "'%m [%p] %d '",
    }

    def __init__(
        self, directory: Path | str | None = None, *, settings: dict[str, str] | None = None
    ) -> None:
        self.bin = server_bin()
        self.as_system_user = os.geteuid() == 0
        parent = Path(directory) if directory is not None else None
        if parent is not None and self.as_system_user and not self._reachable(parent):
            parent = None
        if parent is not None:
            parent.mkdir(parents=True, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(prefix="pgcluster-", dir=parent))
        self.data = self.root / "data"
        self.socket_dir = self.root / "sock"
        self.log = self.root / "server.log"
        self.port = 0
        self.settings = {**self.SETTINGS, **(settings or {})}
        self._initialized = False
        if self.as_system_user:
            shutil.chown(self.root, SYSTEM_USER, SYSTEM_USER)

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> PgCluster:
        """initdb (the first time), then start the server and wait until it answers."""
        if not self._initialized:
            self._initdb()
        for attempt in range(3):
            try:
                self._pg_ctl("start", "-l", str(self.log))
                break
            except PgClusterError:
                # Another process took the port between free_port() and the server's bind.
                if attempt == 2 or "could not bind" not in self.log_text():
                    raise
                self._set_port(free_port())
        self.wait_ready()
        return self

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m <mode>`` (smart, fast or immediate); returns once it is down."""
        self._pg_ctl("stop", "-m", mode)

    def restart(self, mode: str = "fast") -> float:
        """``pg_ctl restart -m <mode>``: every session ends, the server comes back. Returns the
        ``time.monotonic()`` at which it answers a ``SELECT 1`` again."""
        self._pg_ctl("restart", "-m", mode, "-l", str(self.log))
        return self.wait_ready()

    @contextlib.contextmanager
    def stopped(self, seconds: float, mode: str = "fast") -> Iterator[Outage]:
        """The server down for (at least) ``seconds``: stopped on entry; on exit, once
        ``seconds`` have passed since it went down (the outage's length is the point, not a
        guess at a condition), started again and waited for. The yielded :class:`Outage` is
        filled in as it goes: ``back_at`` is set when the block has ended."""
        outage = Outage()
        self.stop(mode)
        outage.stopped_at = time.monotonic()
        try:
            yield outage
        finally:
            left = outage.stopped_at + seconds - time.monotonic()
            if left > 0:
                time.sleep(left)
            outage.starting_at = time.monotonic()
            self._pg_ctl("start", "-l", str(self.log))
            outage.back_at = self.wait_ready()

    def close(self) -> None:
        """Stop the server (immediately: nothing in it is kept) and remove its directory."""
        if self._initialized and self.running():
            with contextlib.suppress(PgClusterError):
                self._pg_ctl("stop", "-m", "immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PgCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- state -------------------------------------------------------------------------------

    def running(self) -> bool:
        """``pg_ctl status``: a postmaster runs on the data directory."""
        result = self._run([str(self.bin / "pg_ctl"), "status", "-D", str(self.data)])
        return result.returncode == 0

    def answers(self, dbname: str = "postgres") -> bool:
        """A ``SELECT 1`` on ``dbname`` answers now."""
        try:
            with self.connect(dbname, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return True
        except Exception:  # any failure means "not yet"
            return False

    def wait_ready(self, timeout: float = DEADLINE, dbname: str = "postgres") -> float:
        """Poll until a ``SELECT 1`` answers; returns the ``time.monotonic()`` when it did."""
        deadline = time.monotonic() + timeout
        while not self.answers(dbname):
            if time.monotonic() > deadline:
                raise PgClusterError(
                    f"PostgreSQL did not answer within {timeout:.0f} s\n{self.log_tail()}"
                )
            time.sleep(0.02)
        return time.monotonic()

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # --- databases and sessions --------------------------------------------------------------

    def url(self, dbname: str) -> str:
        """A ``DATABASE_URL`` for ``dbname`` over TCP, as the superuser (trust: no password)."""
        return f"postgres://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def connect(self, dbname: str = "postgres", **kwargs):
        """A psycopg connection (autocommit) to ``dbname``."""
        import psycopg

        kwargs.setdefault("connect_timeout", 5)
        return psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user=SUPERUSER,
            dbname=dbname,
            autocommit=True,
            **kwargs,
        )

    def create_database(self, name: str) -> str:
        """Create database ``name``; returns its :meth:`url`."""
        from psycopg import sql

        with self.connect() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop database ``name``, ending its sessions first (PostgreSQL 13+: WITH FORCE)."""
        from psycopg import sql

        with self.connect() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    def sessions(self, dbname: str) -> list[tuple[int, str]]:
        """The sessions connected to ``dbname``: (pid, application_name)."""
        with self.connect() as conn:
            rows = conn.execute(
                "SELECT pid, application_name FROM pg_stat_activity WHERE datname = %s",
                [dbname],
            ).fetchall()
        return [(pid, name) for pid, name in rows]

    def kill_backends(self, dbname: str) -> int:
        """``pg_terminate_backend`` every session of ``dbname`` (this helper's own connection is
        to another database): what a failover does to its clients. Returns how many ended."""
        with self.connect() as conn:
            rows = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                [dbname],
            ).fetchall()
        return sum(1 for (ended,) in rows if ended)

    # --- internals ---------------------------------------------------------------------------

    def _initdb(self) -> None:
        self._run_checked(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-U",
                SUPERUSER,
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ]
        )
        self._as_system_user_mkdir(self.socket_dir)
        conf = self.data / "postgresql.conf"
        lines = [f"{name} = {value}" for name, value in self.settings.items()]
        lines.append(f"unix_socket_directories = '{self.socket_dir}'")
        with conf.open("a") as handle:
            handle.write("\n# tests/pgcluster.py\n" + "\n".join(lines) + "\n")
        self._initialized = True
        self._set_port(free_port())

    def _set_port(self, port: int) -> None:
        """The port, in postgresql.conf (read again by every start and restart)."""
        conf = self.data / "postgresql.conf"
        text = re.sub(r"(?m)^port = \d+ # pgcluster\n", "", conf.read_text())
        conf.write_text(text + f"port = {port} # pgcluster\n")
        self.port = port

    def _as_system_user_mkdir(self, path: Path) -> None:
        path.mkdir(exist_ok=True)
        if self.as_system_user:
            shutil.chown(path, SYSTEM_USER, SYSTEM_USER)

    def _pg_ctl(self, action: str, *args: str) -> None:
        self._run_checked(
            [
                str(self.bin / "pg_ctl"),
                action,
                "-D",
                str(self.data),
                "-w",
                "-t",
                str(int(DEADLINE)),
                *args,
            ]
        )

    def _command(self, argv: list[str]) -> list[str]:
        if self.as_system_user:
            return ["runuser", "-u", SYSTEM_USER, "--", *argv]
        return argv

    def _run(self, argv: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(
            self._command(argv),
            cwd="/",  # the system user may not be able to enter this process's cwd
            capture_output=True,
            text=True,
            timeout=DEADLINE + 30,
            check=False,
        )

    def _run_checked(self, argv: list[str]) -> None:
        result = self._run(argv)
        if result.returncode != 0:
            raise PgClusterError(
                f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
                f"\n--- server log ---\n{self.log_tail()}"
            )

    def _reachable(self, path: Path) -> bool:
        """The system user can create files in ``path`` (or its nearest existing parent)."""
        while not path.exists():
            path = path.parent
        probe = self._run(["test", "-w", str(path), "-a", "-x", str(path)])
        return probe.returncode == 0
