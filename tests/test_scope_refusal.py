"""An API that answers ``WWW-Authenticate: Bearer error="insufficient_scope"``: the answer is
passed on without a refresh, and the datasource's page says which scope is missing — on both
serving paths, and through the Python client."""

from __future__ import annotations

import pytest
from django.test import Client
from django.urls import reverse

from datasources.calls import scopes
from datasources.models import Token, TokenEvent
from datasources.proxy.apikeys import create_api_key

from .helpers import ACCESS_TOKEN, connected
from .spy import Answer

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("serving")]

SCOPE_REFUSED = [
    ("Content-Type", "application/json"),
    ("WWW-Authenticate", 'Bearer realm="api", error="insufficient_scope", scope="Mail.Read"'),
]


@pytest.fixture(autouse=True)
def _fresh_memo():
    scopes.forget()
    yield
    scopes.forget()


def refusals(datasource) -> list[str]:
    return list(
        TokenEvent.objects.filter(
            datasource=datasource, kind=TokenEvent.Kind.SCOPE_REFUSED
        ).values_list("detail", flat=True)
    )


def test_insufficient_scope_is_passed_on_unrefreshed_and_recorded_once(spy):
    datasource = connected(spy)
    spy.answers["/api/mail"] = Answer(403, SCOPE_REFUSED, b'{"error": "forbidden"}')
    _, key = create_api_key("app", datasources=[datasource])
    client = Client(HTTP_AUTHORIZATION=f"Api-Key {key}")

    for _ in range(3):
        answer = client.get(f"/api/v1/datasources/{datasource.slug}/proxy/mail")
        assert answer.status_code == 403
        body = b"".join(answer.streaming_content) if answer.streaming else answer.content
        assert body == b'{"error": "forbidden"}'

    # Each call reached the API once with the same token: no refresh, no retry.
    assert [seen.header("Authorization") for seen in spy.seen] == [f"Bearer {ACCESS_TOKEN}"] * 3
    token = Token.objects.get(datasource=datasource, user=None)
    assert token.refresh_count == 0
    assert token.access_token == ACCESS_TOKEN
    # One event per datasource and scope, not one per call, naming the scope.
    assert refusals(datasource) == [
        "The API refused a call for lack of scope (HTTP 403; scope needed: Mail.Read)."
    ]


def test_the_datasource_page_says_which_scope_is_missing(spy, admin_client):
    datasource = connected(spy)
    spy.answers["/api/mail"] = Answer(403, SCOPE_REFUSED, b"{}")
    page = reverse("admin:datasources_datasource_change", args=[datasource.pk])
    assert "datasource-banner-scope-refused" not in admin_client.get(page).content.decode()

    with datasource.session() as api:  # the Python client learns the same way
        assert api.get("mail").status_code == 403

    html = admin_client.get(page).content.decode()
    assert "datasource-banner-scope-refused" in html
    assert "lacks the scope Mail.Read" in html
    assert "A refresh cannot add a scope" in html


def test_other_answers_record_nothing(spy):
    datasource = connected(spy)
    spy.answers["/api/denied"] = Answer(
        403, [("WWW-Authenticate", 'Bearer error="invalid_request"')], b"{}"
    )
    spy.answers["/api/plain"] = Answer(403, [("Content-Type", "text/plain")], b"no")
    with datasource.session() as api:
        assert api.get("denied").status_code == 403
        assert api.get("plain").status_code == 403
    assert refusals(datasource) == []


@pytest.mark.parametrize(
    ("status", "header", "scope"),
    [
        (403, 'Bearer error="insufficient_scope", scope="repo"', "repo"),
        (401, 'Bearer error="insufficient_scope"', ""),
        (403, 'Bearer error="invalid_token"', None),
        (200, 'Bearer error="insufficient_scope"', None),  # only refusals count
        (403, None, None),
    ],
)
def test_refused_scope(status, header, scope):
    headers = {} if header is None else {"WWW-Authenticate": header}
    assert scopes.refused_scope(status, headers.get) == scope
