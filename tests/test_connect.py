"""Issue 31: connect links for end users of an application.

An application (an API key with the ``connect`` permission) creates a connect session for one
end user (``POST /api/v1/connect/sessions``, validated against the served OpenAPI document);
the person opens the link (a page on our origin with one Connect button), consents at the
provider (the local fake of tests/fakeprovider.py, driven over real HTTP), and lands back on
the application's return URL with ``connect=success`` and the session id, never a code or a
token. The end user's token is stored as theirs; the shared token is untouched.

Refusals, each asserting that nothing changed in the database: a reused link, an expired link,
a link finished in another browser, a forged link (a plain page: no return URL can be trusted),
access denied at the provider, a return URL not allowed, a key without the permission, a key
not allowed for the datasource.
"""

from __future__ import annotations

import json
from datetime import timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
from django.test import Client
from django.utils import timezone

from datasources.models import AuthorizationRequest, ConnectSession, Token, TokenEvent
from datasources.proxy.apikeys import create_api_key

from .conftest import CALLBACK_PATH
from .fakeprovider import FakeProvider, _flat, browser, fake_provider, provider_datasource

pytestmark = pytest.mark.django_db(transaction=True)

__all__ = ["fake_provider"]

APP = "https://app.example.com"
RETURN_URL = f"{APP}/settings/integrations?tab=crm"


@pytest.fixture
def provider(fake_provider) -> FakeProvider:
    return fake_provider("rfc")


@pytest.fixture
def datasource(provider):
    return provider_datasource(provider, allowed_return_urls=f"{APP}/settings/")


@pytest.fixture
def connect_key(datasource) -> str:
    _, key = create_api_key("my-saas", datasources=[datasource], permissions=["connect"])
    return key


def new_session(api, key: str, datasource, end_user: str = "u-1", **fields) -> dict:
    payload = {
        "datasource": datasource.slug,
        "end_user": end_user,
        "return_url": RETURN_URL,
        **fields,
    }
    response = api(
        "post", "/api/v1/connect/sessions", key, data=payload, content_type="application/json"
    )
    assert response.status_code == 201, response.content
    return json.loads(response.content)


def press_connect(person: Client, link: str):
    """Open the link, press Connect: the redirect to the provider."""
    path = urlsplit(link).path
    page = person.get(path)
    assert page.status_code == 200, page.content[:500]
    pressed = person.post(path)
    assert pressed.status_code == 302, pressed.content[:500]
    return pressed


def consent(pressed) -> dict[str, str]:
    """The provider's consent: the callback's query (code and state)."""
    at_provider = browser().get(pressed["Location"], allow_redirects=False, timeout=10)
    assert at_provider.status_code == 302, at_provider.text[:500]
    location = urlsplit(at_provider.headers["Location"])
    assert location.path == CALLBACK_PATH
    return _flat(location.query)


def back_at_app(response) -> dict[str, list[str]]:
    """The query the application's return URL received (after checking where it points)."""
    assert response.status_code == 302, response.content[:500]
    location = response["Location"]
    assert location.startswith(f"{APP}/settings/integrations?"), location
    return parse_qs(urlsplit(location).query)


def connect_as(api, key, datasource, end_user: str, **fields) -> tuple[dict, dict]:
    session = new_session(api, key, datasource, end_user, **fields)
    person = Client()
    returned = person.get(CALLBACK_PATH, consent(press_connect(person, session["connect_url"])))
    return session, back_at_app(returned)


def end_user_token(datasource, end_user: str) -> Token:
    return Token.objects.get(datasource=datasource, end_user=end_user)


def test_an_end_user_connects_through_the_link(api, provider, datasource, connect_key):
    session = new_session(api, connect_key, datasource, "u-1", display_name="Ada Lovelace")
    assert session["connect_url"].startswith("http://testserver/connect/")
    assert timezone.now() < timezone.datetime.fromisoformat(session["expires_at"])

    person = Client()
    path = urlsplit(session["connect_url"]).path
    page = person.get(path).content.decode()
    assert datasource.name in page and "Connecting as" in page and "Ada Lovelace" in page
    assert "<script" not in page and "http" not in page.split("<body>")[1].split("</main>")[0]
    query = consent(press_connect(person, session["connect_url"]))
    returned = person.get(CALLBACK_PATH, query)

    sent_back = back_at_app(returned)
    assert sent_back == {
        "tab": ["crm"],
        "connect": ["success"],
        "session": [session["session"]],
    }
    assert query["code"] not in returned["Location"]
    token = end_user_token(datasource, "u-1")
    issued = provider.issued_token(token.access_token)
    assert issued is not None and token.status == "active" and token.refresh_token
    assert token.user_id is None
    shared = Token.objects.shared().get(datasource=datasource)
    assert shared.access_token is None  # the shared token is untouched
    stored = ConnectSession.objects.get(public_id=session["session"])
    assert stored.outcome == "connected" and stored.finished_at is not None
    assert TokenEvent.objects.filter(kind="authorized", detail__startswith="End user u-1").exists()


def test_two_end_users_get_their_own_tokens(api, datasource, connect_key):
    connect_as(api, connect_key, datasource, "u-1")
    connect_as(api, connect_key, datasource, "u-2")
    first, second = end_user_token(datasource, "u-1"), end_user_token(datasource, "u-2")
    assert first.access_token and second.access_token
    assert first.access_token != second.access_token
    assert first.refresh_token != second.refresh_token


def test_a_used_link_is_refused_and_nothing_changes(api, datasource, connect_key):
    session, _ = connect_as(api, connect_key, datasource, "u-1")
    before = end_user_token(datasource, "u-1")
    requests_before = AuthorizationRequest.objects.count()
    path = urlsplit(session["connect_url"]).path
    again = Client()
    for response in (again.get(path), again.post(path)):
        assert back_at_app(response) == {
            "tab": ["crm"],
            "connect": ["error"],
            "error": ["used"],
            "session": [session["session"]],
        }
    assert AuthorizationRequest.objects.count() == requests_before
    after = end_user_token(datasource, "u-1")
    assert (after.access_token, after.refresh_token) == (before.access_token, before.refresh_token)


def test_an_expired_link_is_refused(api, datasource, connect_key):
    session = new_session(api, connect_key, datasource)
    ConnectSession.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    path = urlsplit(session["connect_url"]).path
    person = Client()
    for response in (person.get(path), person.post(path)):
        assert back_at_app(response)["error"] == ["expired"]
    assert not AuthorizationRequest.objects.exists()
    assert not Token.objects.filter(end_user="u-1").exists()


def test_a_link_finished_in_another_browser_is_refused(api, datasource, connect_key):
    session = new_session(api, connect_key, datasource)
    first, second = Client(), Client()
    pressed = press_connect(first, session["connect_url"])
    path = urlsplit(session["connect_url"]).path
    # The second browser cannot open or press the claimed link...
    assert back_at_app(second.get(path))["error"] == ["used"]
    assert back_at_app(second.post(path))["error"] == ["used"]
    # ... nor finish the first browser's flow with its callback.
    query = consent(pressed)
    stolen = second.get(CALLBACK_PATH, query)
    assert stolen.status_code == 400
    assert b"different browser" in stolen.content
    assert not Token.objects.filter(end_user="u-1").exists()
    assert ConnectSession.objects.get().finished_at is None
    # The browser that pressed Connect still finishes.
    assert back_at_app(first.get(CALLBACK_PATH, query))["connect"] == ["success"]
    assert end_user_token(datasource, "u-1").access_token


def test_a_forged_link_is_a_plain_page(datasource):
    response = Client().get("/connect/not-a-real-secret")
    assert response.status_code == 404
    assert "Location" not in response
    assert b"does not work" in response.content
    assert not AuthorizationRequest.objects.exists()


def test_access_denied_at_the_provider_goes_back_with_the_error(api, datasource, connect_key):
    session = new_session(api, connect_key, datasource)
    person = Client()
    pressed = press_connect(person, session["connect_url"])
    state = parse_qs(urlsplit(pressed["Location"]).query)["state"][0]
    denied = person.get(CALLBACK_PATH, {"state": state, "error": "access_denied"})
    assert back_at_app(denied)["error"] == ["access_denied"]
    assert not Token.objects.filter(end_user="u-1").exists()
    assert ConnectSession.objects.get().outcome == "access_denied"


@pytest.mark.parametrize(
    "change, status, error",
    [
        ({"return_url": "https://evil.example/settings/"}, 400, "return_url_not_allowed"),
        ({"return_url": f"{APP}/settingsX"}, 400, "return_url_not_allowed"),
        (
            {"return_url": "https://app.example.com@evil.example/settings/"},
            400,
            "return_url_not_allowed",
        ),
        ({"end_user": " u-1"}, 400, "invalid_end_user"),
        ({"end_user": "x" * 256}, 400, "invalid_end_user"),
        ({"datasource": "nothing-here"}, 404, "not_found"),
    ],
    ids=["other-origin", "not-a-prefix-boundary", "userinfo-trick", "space", "too-long", "slug"],
)
def test_what_the_api_refuses(api, datasource, connect_key, change, status, error):
    payload = {"datasource": datasource.slug, "end_user": "u-1", "return_url": RETURN_URL, **change}
    refused = api(
        "post",
        "/api/v1/connect/sessions",
        connect_key,
        data=payload,
        content_type="application/json",
    )
    assert refused.status_code == status, refused.content
    assert json.loads(refused.content)["error"] == error
    assert not ConnectSession.objects.exists()


def test_a_key_without_the_permission_or_the_datasource_is_refused(api, provider, datasource):
    other = provider_datasource(
        provider, slug="other", name="Other", allowed_return_urls=f"{APP}/settings/"
    )
    _, proxy_only = create_api_key("app", datasources=[datasource])
    _, elsewhere = create_api_key("app", datasources=[other], permissions=["connect"])
    payload = {"datasource": datasource.slug, "end_user": "u-1", "return_url": RETURN_URL}
    for key in (proxy_only, elsewhere):
        refused = api(
            "post", "/api/v1/connect/sessions", key, data=payload, content_type="application/json"
        )
        assert refused.status_code == 403
        assert json.loads(refused.content)["error"] == "forbidden"
    assert not ConnectSession.objects.exists()


def test_nothing_is_allowed_until_return_urls_are_set(api, provider):
    bare = provider_datasource(provider, slug="bare", name="Bare")
    _, key = create_api_key("app", datasources=[bare], permissions=["connect"])
    payload = {"datasource": "bare", "end_user": "u-1", "return_url": RETURN_URL}
    refused = api(
        "post", "/api/v1/connect/sessions", key, data=payload, content_type="application/json"
    )
    assert refused.status_code == 400
    assert "none are set" in json.loads(refused.content)["detail"]
