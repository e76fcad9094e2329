"""Issue 30: while the database is away, a call the process already knows is still served.

Every query fails with ``OperationalError`` (as during a PostgreSQL restart; here through
``connection.execute_wrapper`` on the thread that serves the call's database work, on both
serving paths: the ``serving`` fixture). Then:

* a caller whose API key and token were read within PROXY_CACHE_SECONDS + PROXY_STALE_IF_ERROR
  is served from the process caches (the upstream sees the call, with the cached token);
* an API key this process never saw gets ``503 database_unavailable`` with ``Retry-After``;
* past PROXY_STALE_IF_ERROR the known caller gets the 503 too (a key revoked meanwhile stops
  working within that bound);
* a token due for renewal still serves (the refresh is put off, the token endpoint is not
  asked), an expired one never reaches the upstream;
* /metrics counts the lookups served stale.

The real-process version (a PostgreSQL of its own restarted under load, uvicorn and gunicorn) is
tests/test_database_outage.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import pytest
from django.db import OperationalError, connection
from django.test import Client
from django.utils import timezone

from datasources.models import Token
from datasources.ops import counters
from datasources.proxy import apikeys, cache, usage
from datasources.proxy.apikeys import create_api_key

from .test_retries import flaky_datasource

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("serving", "fresh_proxy_cache"),
]

PATH = "/api/v1/datasources/flaky/proxy/items/1"


@pytest.fixture(autouse=True)
def written_after():
    """What the proxy held while the database was away is written once it is back (as the
    next flush would), not left for the interpreter's exit."""
    yield
    usage.write_held("test teardown")


@contextmanager
def database_away() -> Iterator[list[str]]:
    """Every query of this thread fails as a restarting PostgreSQL makes it fail."""
    refused: list[str] = []

    def refuse(execute, sql, params, many, context):
        refused.append(sql)
        raise OperationalError("terminating connection due to administrator command")

    with connection.execute_wrapper(refuse):
        yield refused


def stale(settings, *, cache_seconds: float = 0.2, bound: float = 60.0) -> None:
    settings.DATASOURCES = {
        **settings.DATASOURCES,
        "PROXY_CACHE_SECONDS": cache_seconds,
        "PROXY_STALE_IF_ERROR": bound,
    }


def until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def past_their_time(key: str, slug: str = "flaky") -> None:
    """Wait (polling) until the key's and the token's entries are past PROXY_CACHE_SECONDS."""
    digest = apikeys.hash_key(key)
    until(
        lambda: cache.keys.get(digest) is None and cache.tokens.get((slug, None)) is None,
        5,
        "the cache entries to go stale",
    )


def assert_database_unavailable(response) -> None:
    assert response.status_code == 503, response.content
    assert json.loads(response.content)["error"] == "database_unavailable"
    assert response["Retry-After"] == "2"


def test_a_known_caller_is_served_and_an_unknown_one_gets_503(flaky, settings, staff_client):
    stale(settings)
    flaky_datasource(flaky)
    _, known_key = create_api_key("known-app")
    _, unknown_key = create_api_key("unknown-app")
    known = Client(HTTP_AUTHORIZATION=f"Api-Key {known_key}")
    unknown = Client(HTTP_AUTHORIZATION=f"Api-Key {unknown_key}")
    assert known.get(PATH).status_code == 200  # the process reads key, datasource, token
    past_their_time(known_key)
    served_stale = counters.value(counters.STALE_SERVED)

    with database_away() as refused:
        answer = known.get(PATH)
        assert answer.status_code == 200, answer.content
        assert_database_unavailable(unknown.get(PATH))
    assert refused  # the database was asked, and refused
    hits = [hit for hit in flaky.hits if hit.target.startswith("/api/items/1")]
    assert len(hits) == 2  # the warm-up and the stale-served call; not the unknown caller
    stored = Token.objects.get(datasource__slug="flaky", user=None).access_token
    assert hits[-1].headers["Authorization"] == f"Bearer {stored}"
    assert counters.value(counters.STALE_SERVED) >= served_stale + 2  # the key and the token

    text = staff_client.get("/metrics").content.decode()
    line = next(x for x in text.splitlines() if x.startswith("datasources_proxy_stale_served"))
    assert int(line.split()[-1]) == counters.value(counters.STALE_SERVED)


def test_stale_entries_serve_no_longer_than_the_bound(flaky, settings):
    stale(settings, bound=0.5)
    flaky_datasource(flaky)
    _, key = create_api_key("app")
    app = Client(HTTP_AUTHORIZATION=f"Api-Key {key}")
    assert app.get(PATH).status_code == 200
    past_their_time(key)

    served = []
    with database_away():
        assert app.get(PATH).status_code == 200  # within the bound
        # Past it, the process no longer vouches for the key (it may have been revoked).

        def refused():
            response = app.get(PATH)
            if response.status_code == 200:
                served.append(response)
                return None
            return response

        answer = until(refused, 5, "the stale entries to run out")
    assert_database_unavailable(answer)
    assert flaky.count("/api/items/1") == 2 + len(served)  # the 503 never went upstream


def test_no_stale_serving_when_it_is_off(flaky, settings):
    stale(settings, bound=0)
    flaky_datasource(flaky)
    _, key = create_api_key("app")
    app = Client(HTTP_AUTHORIZATION=f"Api-Key {key}")
    assert app.get(PATH).status_code == 200
    past_their_time(key)
    with database_away():
        assert_database_unavailable(app.get(PATH))
    assert flaky.count("/api/items/1") == 1


@pytest.mark.parametrize("expires_in", [3, -1], ids=["due-for-renewal", "expired"])
def test_a_token_serves_until_its_own_expiry_never_past_it(flaky, settings, expires_in):
    """Within the request leeway (30 s) the token is due for renewal: the refresh cannot be
    stored, so it is put off and the token serves. Past its expiry it is never sent."""
    stale(settings)
    datasource = flaky_datasource(flaky)
    _, key = create_api_key("app")
    app = Client(HTTP_AUTHORIZATION=f"Api-Key {key}")
    assert app.get(PATH).status_code == 200
    token_calls = flaky.token_calls
    # Time passes for the token the process holds (the cached instance, as the process knows
    # it): it now expires in ``expires_in`` seconds.
    held = cache.tokens.get(("flaky", None)) or cache.tokens._data[("flaky", None)][1]
    held.expires_at = timezone.now() + timedelta(seconds=expires_in)
    held.expiry_known = True
    assert held.datasource == datasource

    with database_away():
        answer = app.get(PATH)
    if expires_in > 0:
        assert answer.status_code == 200, answer.content
        assert flaky.count("/api/items/1") == 2
    else:
        assert_database_unavailable(answer)
        assert flaky.count("/api/items/1") == 1  # the expired token never went upstream
    assert flaky.token_calls == token_calls  # no refresh while nothing could store it
