"""Issue 30: an error of this server while serving a proxy call is never a plain 500 with a
traceback, on either serving path.

The database unavailable (a PostgreSQL restart: ``OperationalError`` from the API-key lookup or
from inside the call) is ``503 {"error": "database_unavailable"}`` with ``Retry-After``; any
other unexpected error is the view's JSON 500 (``internal_error``), logged once with the
datasource's slug and the path, with nothing of the error in the body. The ``serving`` fixture
runs each test through Django's WSGI handler and through the ASGI application (the fast lane
and, for what it hands over, the thread-pool path).
"""

from __future__ import annotations

import json
import logging

import pytest
from django.db import OperationalError
from django.test import Client

from datasources.calls import transport
from datasources.proxy import apikeys
from datasources.proxy.apikeys import create_api_key

from .test_retries import flaky_datasource

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("serving", "fresh_proxy_cache"),
]

#: A database URL with its password, as some database errors' messages carry it.
DSN = "postgres://user:db-secret@db/x"

ERRORS = {
    "database": (lambda: OperationalError(f"could not connect to {DSN}"), 503),
    "bug": (lambda: RuntimeError(f"unexpected state near {DSN}"), 500),
}
#: Where the error is raised: the API key's lookup (before the lane knows the call), or
#: while building the upstream request (inside the call, on whichever path serves it).
PLACES = {
    "api_key_lookup": (apikeys, "authenticate"),
    "in_the_call": (transport, "request_headers"),
}


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("error", ERRORS)
def test_an_error_of_ours_is_a_json_answer_logged_once(
    flaky, monkeypatch, caplog, serving, error, place
):
    datasource = flaky_datasource(flaky)
    _, key = create_api_key("failing-app")
    app = Client(HTTP_AUTHORIZATION=f"Api-Key {key}")
    make_error, expected_status = ERRORS[error]

    def failing(*args, **kwargs):
        raise make_error()

    monkeypatch.setattr(*PLACES[place], failing)
    caplog.set_level(logging.INFO)
    response = app.get(f"/api/v1/datasources/{datasource.slug}/proxy/items/1?q=1")

    assert response.status_code == expected_status
    assert response["Content-Type"] == "application/json"
    body = json.loads(response.content)
    if error == "database":
        assert body["error"] == "database_unavailable"
        assert response["Retry-After"] == "2"
    else:
        assert body["error"] == "internal_error"
    text = json.dumps(body)
    assert "Traceback" not in text and "db-secret" not in text and "unexpected" not in text

    logged = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(logged) == 1, [r.getMessage() for r in logged]
    record = logged[0]
    assert record.getMessage() == (
        f"Proxy call to {datasource.slug} failed"
        + (
            ": the database is unavailable (OperationalError)"
            if error == "database"
            else " (RuntimeError)"
        )
        + f": /api/v1/datasources/{datasource.slug}/proxy/items/1"
    )
    if error == "database":
        assert record.exc_info is None  # by name: its message can carry the database password
        assert "db-secret" not in caplog.text
    else:
        assert record.exc_info is not None and record.exc_info[0] is RuntimeError
    assert "Exception in ASGI application" not in caplog.text
    assert flaky.count("/api/items/1") == 0  # nothing was sent upstream
