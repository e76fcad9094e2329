"""panva's ``oidc-provider`` (npm) started by the suite as a real authorization server.

``tests/oidc/server.mjs`` runs it on 127.0.0.1 port 0 from a JSON configuration (clients,
features, TTLs, a JWT bearer grant, TLS for mTLS) and prints ``ISSUER <url>`` when it listens.
:func:`start_oidc_provider` starts one and polls for that line with a deadline; it yields an
:class:`OidcProvider` that reads the server's request log (``/_test/log``) so tests assert at
the server which grant and client-authentication method reached it.

A test module gets one through the ``op`` fixture (registered in tests/conftest.py) by
defining its configuration::

    @pytest.fixture(scope="module")
    def op_config():
        return {"clients": [...], "jwtBearer": {}}

The provider starts once for the module; ``op`` hands it to each test with its request log
cleared. A test that needs a provider of its own starts one with :func:`start_oidc_provider`.

Installed by ``make test`` (``npm ci --prefix tests/oidc``); a missing node or package is a skip
locally and a failure under CI.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qs, quote, urljoin, urlsplit

import pytest
import requests

HERE = Path(__file__).resolve().parent / "oidc"
SERVER = HERE / "server.mjs"
#: How long the provider may take to print its issuer (node start + key generation).
START_DEADLINE = 30.0
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
TEST_USER = "test-user"


@dataclass
class OidcProvider:
    issuer: str
    config: dict[str, Any]
    verify: str | bool = True  # CA bundle for an https (mTLS) provider

    @property
    def token_url(self) -> str:
        return f"{self.issuer}/token"

    @property
    def authorization_url(self) -> str:
        return f"{self.issuer}/auth"

    @property
    def par_url(self) -> str:
        return f"{self.issuer}/request"

    @property
    def revocation_url(self) -> str:
        return f"{self.issuer}/token/revocation"

    @property
    def userinfo_url(self) -> str:
        return f"{self.issuer}/me"

    @property
    def resource_url(self) -> str:
        """A resource server accepting any valid token (code, client credentials, JWT bearer)."""
        return f"{self.issuer}/_test/resource"

    def log(self) -> dict[str, Any]:
        """The server's request log: ``requests`` (one entry per token/PAR/revocation/
        introspection/userinfo/resource call), ``counters`` and ``last_client_auth``."""
        response = requests.get(f"{self.issuer}/_test/log", timeout=10, verify=self.verify)
        response.raise_for_status()
        return response.json()

    def requests(self, endpoint: str | None = None) -> list[dict[str, Any]]:
        entries = self.log()["requests"]
        return [e for e in entries if endpoint is None or e["endpoint"] == endpoint]

    def reset(self) -> None:
        requests.post(f"{self.issuer}/_test/reset", timeout=10, verify=self.verify)

    def introspect(
        self,
        access_token: str,
        *,
        client_id: str,
        secret: str | None = None,
        client_certificate: tuple[str, str] | None = None,
    ) -> dict[str, Any]:
        """The provider's RFC 7662 answer about ``access_token``, asked as ``client_id``
        authenticated by ``secret`` (client_secret_basic) or by ``client_certificate`` (the
        certificate and key PEMs: mutual TLS)."""
        with tempfile.TemporaryDirectory(prefix="oidc-client-") as tmp:
            cert = None
            if client_certificate:
                cert = (str(Path(tmp) / "client.crt"), str(Path(tmp) / "client.key"))
                for path, pem in zip(cert, client_certificate, strict=True):
                    Path(path).write_text(pem)
            response = requests.post(
                f"{self.issuer}/token/introspection",
                data={"token": access_token, **({} if secret else {"client_id": client_id})},
                auth=(client_id, secret) if secret else None,
                cert=cert,
                verify=self.verify,
                timeout=10,
            )
        response.raise_for_status()
        return response.json()

    def sign_in_as(self, sub: str) -> None:
        """The account the provider's automatic login signs in from now on."""
        response = requests.post(
            f"{self.issuer}/_test/account/{quote(sub, safe='')}", verify=self.verify, timeout=10
        )
        assert response.status_code == 204, response.text[:300]

    def consent(self, authorize_url: str, callback_prefix: str) -> str:
        """Play the browser: follow the provider's redirects (the test user logs in and consents
        automatically) until they reach ``callback_prefix``; return that callback URL."""
        session = requests.Session()
        url = authorize_url
        for _ in range(10):
            if url.startswith(callback_prefix):
                return url
            response = session.get(url, allow_redirects=False, timeout=10, verify=self.verify)
            location = response.headers.get("Location")
            if response.status_code not in (302, 303) or not location:
                raise AssertionError(
                    f"authorization stopped at {url}: {response.status_code} {response.text[:500]}"
                )
            url = urljoin(url, location)
        raise AssertionError("too many redirects at the provider")


def callback_query(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


def _node() -> str:
    node = shutil.which("node")
    if not node:
        pytest.skip("node is not installed (the oidc-provider tests need Node.js 20+)")
    if not (HERE / "node_modules" / "oidc-provider").is_dir():
        pytest.skip(
            "oidc-provider is not installed: run `npm ci --prefix tests/oidc` (make test does)"
        )
    return node


@contextmanager
def start_oidc_provider(
    config: dict[str, Any], *, verify: str | bool | None = None
) -> Iterator[OidcProvider]:
    """Run ``server.mjs`` with ``config`` until the block ends.

    An https provider (``config["tls"]``) is verified against the CA file its configuration
    names (``tls.ca``): the suite's test CA issues its server certificate as well as the client
    certificates it accepts. ``verify`` says otherwise."""
    if verify is None:
        verify = config.get("tls", {}).get("ca") or True
    node = _node()
    with (
        tempfile.TemporaryDirectory(prefix="oidc-") as tmp,
        open(Path(tmp) / "stderr.log", "w+") as errors,  # a file: a full pipe would block node
    ):
        path = Path(tmp) / "config.json"
        path.write_text(json.dumps(config))
        process = subprocess.Popen(
            [node, str(SERVER), str(path)],
            cwd=HERE,
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
            env={**os.environ, "NODE_ENV": "test"},
        )
        lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        try:
            issuer = _wait_for_issuer(process, lines, errors)
            yield OidcProvider(issuer=issuer, config=config, verify=verify)
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stdout:
                process.stdout.close()


def _wait_for_issuer(
    process: subprocess.Popen[str], lines: queue.Queue[str | None], errors: IO[str]
) -> str:
    deadline = time.monotonic() + START_DEADLINE
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=remaining)
        except queue.Empty:
            break
        if line is None:  # stdout closed: the server exited
            errors.seek(0)
            raise RuntimeError(f"oidc-provider exited: {errors.read()[-2000:]}")
        if line.startswith("ISSUER "):
            return line.split(" ", 1)[1].strip()
    process.kill()
    raise RuntimeError(f"oidc-provider did not print its issuer within {START_DEADLINE}s")


# --- fixtures (a plugin registered in tests/conftest.py) -----------------------------------


@pytest.fixture(scope="module")
def op_config() -> dict[str, Any]:
    """The test module's provider configuration (server.mjs's JSON: clients, features, TTLs,
    ...). A module that uses ``op`` defines its own."""
    pytest.fail("a module that uses the op fixture defines op_config", pytrace=False)


@pytest.fixture(scope="module")
def op_server(op_config: dict[str, Any]) -> Iterator[OidcProvider]:
    """The module's provider, started for its first test that uses ``op``."""
    with start_oidc_provider(op_config) as provider:
        yield provider


@pytest.fixture
def op(op_server: OidcProvider) -> OidcProvider:
    """The module's provider with its request log cleared: a test asserts only its own calls."""
    op_server.reset()
    return op_server
