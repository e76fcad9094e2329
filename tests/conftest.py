from __future__ import annotations

import collections
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import pytest
from django.contrib.auth import get_user_model
from django.dispatch import Signal

from datasources.conf import app_settings
from datasources.models import Datasource

CALLBACK_PATH = "/api/v1/datasources/authorize"

# Shared fixtures: the browser tests' (page, expect, builder, playwright_api) and the
# oidc-provider's (op, op_server, op_config).
pytest_plugins = ["tests.browser", "tests.oidcprovider"]


# --- CI: a skip is a failure ---------------------------------------------------------------


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"Skipped under CI, which must run every test: {reason}"


def pytest_collection_modifyitems(config, items):
    """Deselect ``postgres_only`` tests on other databases: deselected, not skipped, because CI
    fails every skip and these tests have nothing to check on SQLite."""
    from django.db import connection

    if connection.vendor == "postgresql":
        return
    kept, deselected = [], []
    for item in items:
        (deselected if item.get_closest_marker("postgres_only") else kept).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept


@pytest.fixture(autouse=True)
def _fresh_app_settings():
    app_settings.reload()
    yield
    app_settings.reload()


@pytest.fixture(autouse=True)
def _fresh_upstream_health():
    """Nothing remembered about upstreams from an earlier test (ids are reused after a flush);
    with Redis, its records go too (the database's go with the flush)."""
    from datasources.calls import health

    health.reset()
    store = health.store()
    if isinstance(store, health.RedisStore):
        store.clear()
    yield
    health.reset()


@pytest.fixture(autouse=True)
def _no_pending_call_log():
    """Call-log rows and usage counts batched by one test are not written into the next one's
    database (nor, by the exit hooks, into none at the end of the run)."""
    from datasources.proxy import calllog, usage

    calllog.discard()
    yield
    calllog.discard()
    usage.discard()


@pytest.fixture
def fresh_proxy_cache():
    """No datasource or token the proxy cached in an earlier test, none left for the next
    (PROXY_CACHE_SECONDS)."""
    from datasources.proxy import cache as proxy_cache

    proxy_cache.forget()
    yield
    proxy_cache.forget()


@pytest.fixture
def fresh_dpop_nonces():
    """No DPoP nonce remembered from an earlier test: this process's memory cleared, and
    Django's cache, where other processes find them."""
    from django.core.cache import cache

    from datasources.security import dpop

    dpop.forget_nonces()
    cache.clear()


class DPoPProofs:
    """The DPoP proofs the app makes, recorded; :meth:`replay_last` makes the next one a copy
    of the last one (an attacker's replay, or a proof reused by mistake)."""

    def __init__(self, monkeypatch) -> None:
        from datasources.security import dpop

        self.made: list[str] = []
        self._replay: list[str] = []
        original = dpop.proof

        def proof(*args, **kwargs) -> str:
            if self._replay:
                return self._replay.pop()
            self.made.append(original(*args, **kwargs))
            return self.made[-1]

        monkeypatch.setattr(dpop, "proof", proof)

    def replay_last(self) -> None:
        self._replay.append(self.made[-1])


@pytest.fixture
def dpop_proofs(monkeypatch) -> DPoPProofs:
    return DPoPProofs(monkeypatch)


# --- authorization server (django-oauth-toolkit) -------------------------------------------


@dataclass
class AuthServer:
    base: str  # what our code uses for the token endpoint
    browser_base: str  # a different host for the authorize endpoint: separate cookie jar
    user: object
    password: str

    @property
    def token_url(self) -> str:
        return f"{self.base}/o/token/"

    @property
    def authorize_url(self) -> str:
        return f"{self.browser_base}/o/authorize/"

    @property
    def revoke_url(self) -> str:
        return f"{self.base}/o/revoke_token/"

    def app(
        self,
        client_id: str,
        *,
        grant: str = "authorization-code",
        secret: str | None = "s3cret-" + "x" * 20,
        skip_authorization: bool = True,
        redirect_uris: str = "",
        confidential: bool = True,
    ):
        from oauth2_provider.models import Application

        return Application.objects.create(
            name=client_id,
            client_id=client_id,
            client_secret=secret or "",
            client_type=Application.CLIENT_CONFIDENTIAL
            if confidential
            else Application.CLIENT_PUBLIC,
            authorization_grant_type=grant,
            redirect_uris=redirect_uris
            or " ".join(
                [
                    f"http://testserver{CALLBACK_PATH}",
                    f"{self.base}{CALLBACK_PATH}",
                    f"{self.browser_base}{CALLBACK_PATH}",
                ]
            ),
            skip_authorization=skip_authorization,
            user=self.user,
            algorithm="",
        )


@pytest.fixture
def auth_server(live_server) -> AuthServer:
    User = get_user_model()
    password = "provider-pass-123"
    user = User.objects.create_user("resource-owner", password=password)
    base = live_server.url
    port = urlsplit(base).port
    host = urlsplit(base).hostname
    other = "127.0.0.1" if host == "localhost" else "localhost"
    return AuthServer(
        base=base, browser_base=f"http://{other}:{port}", user=user, password=password
    )


@contextmanager
def captured(signal: Signal) -> Iterator[list[dict]]:
    """The keyword arguments of every ``signal`` sent inside the block.

    Disconnects only its own receiver: the app's receivers (the owner email on
    ``reauthorization_required``) stay connected for the tests that follow.
    """
    received: list[dict] = []

    def receiver(**kwargs) -> None:
        received.append(kwargs)

    signal.connect(receiver, weak=False)
    try:
        yield received
    finally:
        signal.disconnect(receiver)


SECRET = "s3cret-" + "x" * 20


def make_datasource(auth_server: AuthServer | None = None, **fields) -> Datasource:
    base = auth_server.base if auth_server else "https://api.example.com"
    defaults = dict(
        name="Example API",
        slug="example",
        base_url=f"{base}/upstream/",
        grant_type="authorization_code",
        authorization_url=auth_server.authorize_url if auth_server else f"{base}/authorize",
        access_token_url=auth_server.token_url if auth_server else f"{base}/token",
        client_id="client-basic",
        client_secret=SECRET,
        scopes="read write",
        client_authentication="basic",
    )
    defaults.update(fields)
    datasource = Datasource(**defaults)
    datasource.full_clean()
    datasource.save()
    return datasource


@pytest.fixture
def staff_client(client, django_user_model):
    admin = django_user_model.objects.create_superuser("admin", "admin@example.com", "admin-pass")
    client.force_login(admin)
    client.user = admin
    return client


def authorize_via_provider(auth_server: AuthServer, provider_url: str) -> dict[str, str]:
    """Play the resource owner at django-oauth-toolkit in its own session; return the callback
    query parameters (code, state, ...)."""
    from django.test import Client

    browser = Client()
    browser.force_login(auth_server.user)
    parts = urlsplit(provider_url)
    response = browser.get(parts.path, dict(parse_qs(parts.query)) and _flat(parts.query))
    assert response.status_code == 302, response.content[:500]
    location = urlsplit(response["Location"])
    assert location.path == CALLBACK_PATH, response["Location"]
    return _flat(location.query)


def _flat(query: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(query, keep_blank_values=True).items()}


@pytest.fixture
def authorize(auth_server, staff_client):
    """Run the real authorization-code flow for a datasource; returns its Token."""

    def run(datasource: Datasource):
        from datasources.models import Token

        start = staff_client.get(f"/admin/datasources/datasource/{datasource.pk}/authorize/")
        params = authorize_via_provider(auth_server, start["Location"])
        response = staff_client.get(CALLBACK_PATH, params)
        assert response.status_code == 302
        token = Token.objects.get(datasource=datasource)
        assert token.status == "active", token.last_error
        return token

    return run


class FakeTokenEndpoint:
    """Replays canned failure shapes through the real oauth module (HTTP faked at the adapter)."""

    def __init__(self) -> None:
        self.responses: list = []
        self.calls: list = []

    def queue(self, *items) -> None:
        self.responses.extend(items)

    def send(self, request, **kwargs):
        import requests
        from requests.models import Response

        self.calls.append(request)
        item = self.responses.pop(0)
        if isinstance(item, Exception):
            raise item
        status, body, headers = item
        response = Response()
        response.status_code = status
        response._content = body.encode() if isinstance(body, str) else body
        response.headers = requests.structures.CaseInsensitiveDict(headers or {})
        response.url = request.url
        response.request = request
        return response


@pytest.fixture
def fake_token_endpoint(monkeypatch):
    import requests

    from datasources.authserver import oauth

    fake = FakeTokenEndpoint()

    class Adapter(requests.adapters.BaseAdapter):
        def send(self, request, **kwargs):
            return fake.send(request, **kwargs)

        def close(self):
            pass

    session = requests.Session()
    session.mount("https://", Adapter())
    session.mount("http://", Adapter())
    monkeypatch.setattr(oauth, "http_session", lambda: session)
    return fake


# --- local fake upstreams -------------------------------------------------------------------


@pytest.fixture
def spy():
    """The spy upstream API (tests/spy.py): records exactly what reached it."""
    from .spy import SpyUpstream

    upstream = SpyUpstream().start()
    yield upstream
    upstream.stop()


@pytest.fixture
def flaky():
    """The scripted flaky upstream API with its token endpoint (tests/flaky.py)."""
    from .flaky import FlakyUpstream

    upstream = FlakyUpstream().start()
    yield upstream
    upstream.stop()


# --- serving paths ------------------------------------------------------------------------


@pytest.fixture(params=["wsgi", "asgi"])
def serving(request, monkeypatch) -> Iterator[str]:
    """The proxy served by Django's WSGI handler, then by the ASGI application (tests/serving.py:
    the fast lane, and the thread-pool path for what it hands over): a module that uses this
    fixture proves both behave the same. On the ASGI path the lane's counters are checked after
    the test: no call may have been handed over because the lane was switched off, and
    SERVING_COUNTS (printed at the end of the run) shows how many calls the lane served."""
    if request.param != "asgi":
        yield request.param
        return
    from .serving import LANE, serve_proxy_through_asgi

    serve_proxy_through_asgi(monkeypatch)
    served, handed_over = LANE.served, dict(LANE.handed_over)
    yield request.param
    SERVING_COUNTS["served"] += LANE.served - served
    for reason, count in LANE.handed_over.items():
        SERVING_COUNTS[str(reason)] += count - handed_over.get(reason, 0)
    assert LANE.handed_over.get("middleware", 0) == handed_over.get("middleware", 0)


#: Calls the fast lane served, and handed over by reason, over the whole run.
SERVING_COUNTS: collections.Counter = collections.Counter()


def pytest_terminal_summary(terminalreporter) -> None:
    if SERVING_COUNTS:
        counts = ", ".join(f"{name} {count}" for name, count in sorted(SERVING_COUNTS.items()))
        terminalreporter.write_line(f"proxy calls on the ASGI path: {counts}")


# --- the management JSON API ------------------------------------------------------------------


@pytest.fixture
def openapi():
    """The document as the server serves it (so a test fails if the served one is wrong)."""
    import json

    from django.test import Client
    from openapi_core import OpenAPI

    response = Client().get("/api/v1/openapi.json")
    assert response.status_code == 200
    document = json.loads(response.content)
    assert document["openapi"].startswith("3.1")
    return OpenAPI.from_dict(document)  # also validates the document itself


@pytest.fixture
def api(openapi):
    """Call the API with a key; every answer is checked against the served document."""

    from django.test import Client
    from openapi_core.contrib.django import DjangoOpenAPIRequest, DjangoOpenAPIResponse

    def call(method: str, path: str, key: str | None = None, **kwargs):
        headers = {"HTTP_AUTHORIZATION": f"Api-Key {key}"} if key else {}
        response = getattr(Client(**headers), method)(path, **kwargs)
        openapi.validate_response(
            DjangoOpenAPIRequest(response.wsgi_request), DjangoOpenAPIResponse(response)
        )
        return response

    return call
