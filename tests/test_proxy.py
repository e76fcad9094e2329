"""The proxy end to end: our view -> django-oauth-toolkit-protected upstream (live server).

Every test runs twice: with the test settings (no caches, counters written at once) and with
the production defaults (API keys and tokens cached for PROXY_CACHE_SECONDS, counters batched),
so the cached paths are exercised too.
"""

import json
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.test import Client
from django.utils import timezone
from oauth2_provider.models import AccessToken, RefreshToken

from datasources.calls import transport
from datasources.conf import DEFAULTS
from datasources.models import DatasourceUsage, Token
from datasources.proxy import cache as proxy_cache
from datasources.proxy import usage
from datasources.proxy.apikeys import create_api_key

from .conftest import SECRET, make_datasource
from .helpers import body_of

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("serving")]

PRODUCTION = {
    "PROXY_CACHE_SECONDS": DEFAULTS["PROXY_CACHE_SECONDS"],
    "USAGE_FLUSH_INTERVAL": DEFAULTS["USAGE_FLUSH_INTERVAL"],
    "HEALTH_CACHE_SECONDS": DEFAULTS["HEALTH_CACHE_SECONDS"],
    "CALL_LOG_FLUSH_INTERVAL": DEFAULTS["CALL_LOG_FLUSH_INTERVAL"],
}


@pytest.fixture(autouse=True, params=["test-settings", "production-defaults"])
def proxy_settings(request, settings):
    """Caches and batching as configured; nothing remembered from an earlier test."""
    if request.param == "production-defaults":
        assert PRODUCTION["PROXY_CACHE_SECONDS"] > 0 and PRODUCTION["USAGE_FLUSH_INTERVAL"] > 0
        settings.DATASOURCES = {**settings.DATASOURCES, **PRODUCTION}
    proxy_cache.forget()
    usage.discard()
    yield request.param
    proxy_cache.forget()


def changed_elsewhere() -> None:
    """A change made with a queryset .update() stands for another process's change: this
    process sees it once its cache entries expire (PROXY_CACHE_SECONDS); skip that wait."""
    proxy_cache.forget()


@pytest.fixture
def ready(auth_server, authorize):
    auth_server.app("client-basic")

    def build(**fields):
        datasource = make_datasource(auth_server, **fields)
        authorize(datasource)
        _, key = create_api_key("app")
        client = Client(HTTP_AUTHORIZATION=f"Api-Key {key}")
        return datasource, client, key

    return build


def url(datasource, path: str = "") -> str:
    return f"/api/v1/datasources/{datasource.slug}/proxy/{path}"


def echo(response) -> dict:
    assert response.status_code == 200, body_of(response)[:500]
    return json.loads(body_of(response))


@pytest.mark.parametrize("method", ["get", "post", "put", "patch", "delete"])
def test_methods_query_and_body_are_forwarded(ready, method):
    datasource, client, key = ready()
    client.cookies["sessionid"] = "caller-cookie"
    response = client.generic(
        method.upper(),
        url(datasource, "things/42?") + "q=1&tag=a&tag=b",
        data=json.dumps({"hello": "world"}),
        content_type="application/json",
        HTTP_X_CUSTOM="kept",
        HTTP_X_API_KEY="should-not-leak",
    )
    seen = echo(response)
    assert seen["method"] == method.upper()
    assert seen["path"] == "things/42"
    assert seen["query"] == {"q": "1", "tag": "b"}
    assert seen["body"] == '{"hello": "world"}'
    assert seen["content_type"] == "application/json"
    assert seen["headers"]["X-Custom"] == "kept"
    assert seen["headers"]["Authorization"].startswith("Bearer ")
    assert key not in json.dumps(seen)
    assert "X-Api-Key" not in seen["headers"]
    assert seen["cookies"] == {} and "Cookie" not in seen["headers"]
    assert seen["user"] == "resource-owner"


def test_query_placement(ready):
    datasource, client, _ = ready(token_placement="query")
    seen = echo(client.get(url(datasource, "me"), {"access_token": "caller-supplied", "x": "1"}))
    assert seen["token_in_query"] is True
    assert seen["query"] == {"x": "1"}
    assert "Authorization" not in seen["headers"]


def test_large_response_streams(ready):
    datasource, client, _ = ready()
    response = client.get(url(datasource, "big/5000000"))
    assert response.status_code == 200
    assert response.streaming
    assert response["Content-Length"] == "5000000"
    assert sum(len(chunk) for chunk in response.streaming_content) == 5_000_000


def test_refreshes_once_on_401_and_retries(ready):
    datasource, client, _ = ready()
    Token.objects.filter(datasource=datasource).update(
        last_refreshed_at=timezone.now() - timedelta(minutes=5)
    )
    AccessToken.objects.update(expires=timezone.now() - timedelta(seconds=1))
    echo(client.post(url(datasource, "me"), {"a": "1"}))
    assert Token.objects.get(datasource=datasource).refresh_count == 1


def test_a_401_storm_causes_one_refresh_per_cooldown(ready, settings):
    """An upstream that always answers 401 (wrong base path, missing scope) gets its answer
    passed on; a rejection refreshes only when no rejection caused a refresh within the
    cooldown."""
    datasource, client, _ = ready()
    Token.objects.filter(datasource=datasource).update(
        last_refreshed_at=timezone.now() - timedelta(minutes=5)
    )
    statuses = [client.get(url(datasource, "always-401")).status_code for _ in range(30)]
    assert statuses == [401] * 30
    assert Token.objects.get(datasource=datasource).refresh_count == 1
    assert RefreshToken.objects.count() == 2  # the authorization and the one refresh
    # The token still works where the API accepts it.
    echo(client.get(url(datasource, "me")))


def test_expiry_statuses_are_configurable(ready):
    """An API that says "expired" with 403: 401 is then passed on untouched."""
    datasource, client, _ = ready(expiry_status_codes="403")
    Token.objects.filter(datasource=datasource).update(
        last_refreshed_at=timezone.now() - timedelta(minutes=5)
    )
    AccessToken.objects.update(expires=timezone.now() - timedelta(seconds=1))
    assert client.get(url(datasource, "me")).status_code == 401
    assert Token.objects.get(datasource=datasource).refresh_count == 0


def test_expired_token_is_refreshed_before_the_call(ready):
    datasource, client, _ = ready()
    Token.objects.filter(datasource=datasource).update(expires_at=timezone.now())
    echo(client.get(url(datasource, "me")))
    assert Token.objects.get(datasource=datasource).refresh_count == 1


SSRF_PATHS = [
    "a%3F/../../o/token/",
    "a%3f/..%2f..%2fo/token/",
    "..;/o/token/",
    "a/..;/..;/o/token/",
    "%2e%2e;/o/token/",
    "a%23/../../o/token/",
    "../o/token/",
    "a/../../o/token/",
    "%2e%2e/o/token/",
    "a/%2E%2E/%2e%2e/o/",
    "%252e%252e/o/token/",
    "..%5co/token/",
    "a\\b",
    "/evil.example.com/x",
    "%2F%2Fevil.example.com/x",
    "user@evil.example.com/x",
    "http://evil.example.com/x",
    "https:%2F%2Fevil.example.com",
    "./x",
]


@pytest.mark.parametrize("path", SSRF_PATHS)
def test_paths_that_leave_base_url_are_rejected_without_upstream_call(ready, monkeypatch, path):
    datasource, client, _ = ready()
    calls = []
    monkeypatch.setattr(transport, "send", lambda *a, **k: calls.append(a))
    response = client.get(url(datasource) + path)
    assert response.status_code == 400, path
    assert response.json()["error"] == "invalid_path"
    assert calls == []


def test_authentication_failures(ready, django_user_model):
    datasource, client, _key = ready()
    assert Client().get(url(datasource, "me")).status_code == 401
    bad = Client(HTTP_AUTHORIZATION="Api-Key dsk_00000000_nope")
    assert bad.get(url(datasource, "me")).status_code == 401
    assert client.get("/api/v1/datasources/unknown/proxy/me").status_code == 404
    other = make_datasource(slug="other", name="Other")
    _, restricted = create_api_key("restricted", datasources=[other])
    response = Client(HTTP_AUTHORIZATION=f"Api-Key {restricted}").get(url(datasource, "me"))
    assert response.status_code == 403

    from datasources.models import ApiKey

    ApiKey.objects.filter(name="app").update(revoked_at=timezone.now())
    changed_elsewhere()
    assert client.get(url(datasource, "me")).status_code == 401


def test_session_user_needs_permission_and_csrf(ready, django_user_model):
    from django.contrib.auth.models import Permission

    datasource, _, _ = ready()
    user = django_user_model.objects.create_user("app-user", password="x")
    session = Client(enforce_csrf_checks=True)
    session.force_login(user)
    assert session.get(url(datasource, "me")).status_code == 403
    user.user_permissions.add(Permission.objects.get(codename="use_datasource"))
    echo(session.get(url(datasource, "me")))
    assert session.post(url(datasource, "me"), {"a": "1"}).json()["error"] == "csrf_failed"


def test_needs_reauthorization_is_409_with_authorize_url(ready):
    datasource, client, _ = ready()
    Token.objects.filter(datasource=datasource).update(status="needs_reauthorization")
    response = client.get(url(datasource, "me"))
    assert response.status_code == 409
    payload = response.json()
    assert payload["datasource"] == datasource.slug
    assert payload["authorize_url"].endswith(
        f"/admin/datasources/datasource/{datasource.pk}/authorize/"
    )


def test_token_endpoint_down_is_503_without_secrets(ready):
    datasource, client, _ = ready()
    token = Token.objects.get(datasource=datasource)
    Token.objects.filter(pk=token.pk).update(expires_at=timezone.now())
    datasource.access_token_url = "http://127.0.0.1:9/token"
    datasource.save()
    response = client.get(url(datasource, "me"))
    assert response.status_code == 503
    text = response.content.decode()
    for secret in (SECRET, token.access_token, token.refresh_token):
        assert secret not in text


def test_upstream_unreachable_is_502_and_timeout_is_504(ready, settings):
    datasource, client, _ = ready()
    settings.DATASOURCES = {**settings.DATASOURCES, "PROXY_READ_TIMEOUT": 0.5}
    assert client.get(url(datasource, "slow")).status_code == 504
    datasource.base_url = "http://127.0.0.1:9/"
    datasource.save()
    assert client.get(url(datasource, "me")).status_code == 502


def test_set_cookie_stripped_and_redirects_not_followed(ready):
    datasource, client, _ = ready()
    response = client.get(url(datasource, "set-cookie"))
    body_of(response)
    assert "Set-Cookie" not in response.headers
    redirect = client.get(url(datasource, "redirect"))
    assert redirect.status_code == 302
    assert redirect["Location"] == "/upstream/elsewhere"


def test_calls_are_counted(ready):
    datasource, client, _ = ready()
    for _ in range(3):
        body_of(client.get(url(datasource, "me")))
    body_of(client.get(url(datasource, "../x")))
    usage.flush()  # batched in production: written at most once per USAGE_FLUSH_INTERVAL
    counted = DatasourceUsage.objects.get(datasource=datasource)
    assert counted.calls == 4
    assert counted.last_status == 400


def test_create_api_key_command_prints_key_once(ready, capsys):
    datasource, _, _ = ready()
    call_command("create_api_key", "cli", "--datasource", datasource.slug)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("dsk_")
    echo(Client(HTTP_AUTHORIZATION=f"Api-Key {out[0]}").get(url(datasource, "me")))
    from datasources.models import ApiKey

    stored = ApiKey.objects.get(name="cli")
    assert out[0] not in (stored.key_hash, stored.prefix)
    assert not stored.all_datasources


def test_create_api_key_command_needs_an_explicit_scope(ready):
    """Least privilege: no silent "all datasources"."""
    from django.core.management.base import CommandError

    from datasources.models import ApiKey

    ready()
    with pytest.raises(CommandError):
        call_command("create_api_key", "no-scope")
    call_command("create_api_key", "everything", "--all-datasources")
    assert ApiKey.objects.get(name="everything").all_datasources


def test_admin_shows_new_key_once(staff_client):
    response = staff_client.post(
        "/admin/datasources/apikey/add/",
        {"name": "from-admin", "all_datasources": "on", "may_proxy": "on"},
    )
    from datasources.models import ApiKey

    stored = ApiKey.objects.get(name="from-admin")
    # Post/redirect/get: the key is shown by the page the POST redirects to, once.
    assert response.status_code == 302
    assert response["Location"] == f"/admin/datasources/apikey/{stored.pk}/created/"
    html = staff_client.get(response["Location"]).content.decode()
    assert "cannot be shown again" in html
    again = staff_client.get(response["Location"]).content.decode()
    assert "new-api-key" not in again and "was shown once" in again
    change = staff_client.get(f"/admin/datasources/apikey/{stored.pk}/change/").content.decode()
    key = html.split('class="new-api-key"')[1].split(">", 1)[1].split("<", 1)[0]
    assert key.startswith("dsk_") and key not in change


def test_query_placed_token_never_reaches_logs(ready, caplog):
    import logging

    caplog.set_level(logging.DEBUG)
    datasource, client, key = ready(token_placement="query")
    echo(client.get(url(datasource, "me"), {"x": "1"}))
    token = Token.objects.get(datasource=datasource)
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "/upstream/me?[redacted]" in text  # urllib3 logged the request line, redacted
    for secret in (token.access_token, token.refresh_token, key, SECRET):
        assert secret not in text


def test_chunked_request_body_is_refused_not_dropped(ready, monkeypatch):
    datasource, client, _ = ready()
    calls = []
    monkeypatch.setattr(transport, "send", lambda *a, **k: calls.append(a))
    response = client.post(
        url(datasource, "me"), b"data", content_type="text/plain", HTTP_TRANSFER_ENCODING="chunked"
    )
    assert response.status_code == 411
    assert calls == []


def test_hot_path_calls_are_served_by_the_fast_lane(ready, serving):
    """On the ASGI path an API-key call with a fresh token is served by the fast lane itself;
    the thread-pool path only gets what the lane hands over (a session caller here). On WSGI
    the same calls simply succeed."""
    from .serving import LANE

    datasource, client, _ = ready()
    served = LANE.served
    assert echo(client.get(url(datasource, "me"), {"q": "1"}))["query"] == {"q": "1"}
    assert echo(client.get(url(datasource, "me")))["method"] == "GET"
    assert LANE.served == served + (2 if serving == "asgi" else 0)
