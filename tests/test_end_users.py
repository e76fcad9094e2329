"""Issue 31: end users of an application, after they connected (connect links are elsewhere).

* The proxy, on both serving paths: ``X-Datasource-End-User`` selects that end user's token and
  nothing else (never the shared token, never another end user's, also not through the process
  cache); the header never goes upstream nor to the token endpoint; a rejection refreshes the
  end user's token; the call log names the end user. Refusals (400, 403, 409) change nothing in
  the database and send nothing upstream.
* The Python client (``session(end_user=…)``, ``get_access_token(end_user=…)``).
* Webhook payloads of token events name the end user; the sweep refreshes end users' tokens.

Assertions are on what reached the spy upstream and the fake token endpoint, and on the rows.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from datasources import tokens
from datasources.calls import transport
from datasources.conf import DEFAULTS
from datasources.exceptions import NotConnected
from datasources.models import ProxyCall, Token, TokenEvent
from datasources.proxy import cache as proxy_cache
from datasources.proxy import calllog
from datasources.proxy.apikeys import create_api_key
from datasources.tasks import refresh

from .conftest import make_datasource
from .helpers import ACCESS_TOKEN, REFRESH_TOKEN, body_of
from .spy import Answer

HEADER = "X-Datasource-End-User"
A_TOKEN = "end-user-a-access-" + "a" * 24
B_TOKEN = "end-user-b-access-" + "b" * 24
A_REFRESH = "end-user-a-refresh-" + "r" * 24


@pytest.fixture(autouse=True)
def production_cache(settings):
    """The proxy caches tokens as in production, so one end user's cached token is there to be
    (wrongly) served to another."""
    settings.DATASOURCES = {
        **settings.DATASOURCES,
        "PROXY_CACHE_SECONDS": DEFAULTS["PROXY_CACHE_SECONDS"],
    }
    proxy_cache.forget()
    yield
    proxy_cache.forget()


def connected(spy, slug: str = "spied"):
    """An authorization-code datasource whose base URL is the spy's /api/, with a valid shared
    token (end users connect datasources a person authorizes)."""
    datasource = make_datasource(
        slug=slug,
        name="Spied API",
        base_url=f"{spy.base}/api/",
        authorization_url="https://auth.example.com/authorize",
        access_token_url="https://auth.example.com/token",
    )
    now = timezone.now()
    Token.objects.shared().filter(datasource=datasource).update(
        access_token=ACCESS_TOKEN,
        refresh_token=REFRESH_TOKEN,
        token_type="Bearer",
        status="active",
        expires_at=now + timedelta(hours=1),
        obtained_at=now,
        last_refreshed_at=now,
    )
    return datasource


def end_user_token(datasource, end_user: str, access_token: str, **fields) -> Token:
    now = timezone.now()
    values = dict(
        access_token=access_token,
        refresh_token=f"refresh-of-{end_user}",
        token_type="Bearer",
        status="active",
        expires_at=now + timedelta(hours=1),
        obtained_at=now,
        last_refreshed_at=now,
    )
    values.update(fields)
    return Token.objects.create(datasource=datasource, end_user=end_user, **values)


def key_client(**kwargs) -> Client:
    _, key = create_api_key("app", **kwargs)
    return Client(HTTP_AUTHORIZATION=f"Api-Key {key}")


def proxied(datasource, path: str = "me") -> str:
    return f"/api/v1/datasources/{datasource.slug}/proxy/{path}"


def as_end_user(end_user: str) -> dict[str, str]:
    return {"headers": {HEADER: end_user}}


def database_state() -> tuple:
    """Everything a refusal must leave as it was: the token rows, the events, the call log."""
    calllog.flush()
    rows = list(
        Token.objects.order_by("pk").values_list(
            "pk", "end_user", "access_token", "refresh_token", "status", "refresh_count"
        )
    )
    return rows, TokenEvent.objects.count(), ProxyCall.objects.count()


def bearer(seen) -> str:
    return seen.header("Authorization") or ""


def wait_for(predicate, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        time.sleep(0.01)


# --- the proxy, on both serving paths ------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.usefixtures("serving")
class TestProxy:
    def test_the_header_selects_the_end_users_token_and_is_not_forwarded(self, spy, serving):
        datasource = connected(spy)
        end_user_token(datasource, "u-a", A_TOKEN)
        client = key_client()
        from .serving import LANE

        served = LANE.served
        response = client.get(proxied(datasource), **as_end_user("u-a"))
        assert response.status_code == 200, body_of(response)
        [seen] = spy.seen
        assert bearer(seen) == f"Bearer {A_TOKEN}"
        assert HEADER.lower() not in seen.header_names
        if serving == "asgi":  # the fast lane served it itself, with the same decision
            assert LANE.served == served + 1

    def test_one_end_users_token_never_serves_another(self, spy):
        datasource = connected(spy)
        end_user_token(datasource, "u-a", A_TOKEN)
        end_user_token(datasource, "u-b", B_TOKEN)
        client = key_client()
        # In turn, twice: the second round is served from the process cache.
        for _ in range(2):
            for end_user in ("u-a", "u-b"):
                response = client.get(proxied(datasource), **as_end_user(end_user))
                assert response.status_code == 200
            # The shared token (no header) is its own too.
            assert client.get(proxied(datasource)).status_code == 200
        assert [bearer(seen) for seen in spy.seen] == [
            f"Bearer {A_TOKEN}",
            f"Bearer {B_TOKEN}",
            f"Bearer {ACCESS_TOKEN}",
        ] * 2

    def test_no_fallback_to_the_shared_token(self, spy):
        datasource = connected(spy)  # a valid shared token exists
        end_user_token(datasource, "u-b", B_TOKEN)
        client = key_client()
        client.get(proxied(datasource), **as_end_user("u-b"))  # u-b cached
        spy.seen.clear()
        before = database_state()
        for _ in range(2):
            response = client.get(proxied(datasource), **as_end_user("u-a"))
            assert response.status_code == 409
            body = json.loads(body_of(response))
            assert body["error"] == "not_connected" and body["end_user"] == "u-a"
            assert "u-a" in body["detail"]
        assert spy.seen == []
        assert database_state() == before
        assert not Token.objects.filter(end_user="u-a").exists()  # no row made for the id

    def test_a_disconnected_end_user_is_refused_at_once(self, spy):
        """Deleting the connection (the API's DELETE) empties this process's cache: the cached
        token does not serve on."""
        datasource = connected(spy)
        end_user_token(datasource, "u-a", A_TOKEN)
        client = key_client()
        assert client.get(proxied(datasource), **as_end_user("u-a")).status_code == 200
        _, manage = create_api_key("ops", permissions=("manage",))
        url = f"/api/v1/datasources/{datasource.slug}/connections/u-a"
        assert Client(HTTP_AUTHORIZATION=f"Api-Key {manage}").delete(url).status_code == 204
        response = client.get(proxied(datasource), **as_end_user("u-a"))
        assert response.status_code == 409
        assert json.loads(body_of(response))["error"] == "not_connected"
        assert len(spy.seen) == 1

    def test_a_dead_grant_says_the_end_user_must_connect_again(self, spy):
        datasource = connected(spy)
        end_user_token(datasource, "u-a", A_TOKEN, status="needs_reauthorization")
        before = database_state()
        response = key_client().get(proxied(datasource), **as_end_user("u-a"))
        assert response.status_code == 409
        body = json.loads(body_of(response))
        assert body["error"] == "reauthorization_required" and body["end_user"] == "u-a"
        assert "authorize_url" not in body  # the admin's authorization is not theirs
        assert spy.seen == []
        rows, events, _ = database_state()
        assert (rows, events) == before[:2]  # the token and its events as they were
        logged = ProxyCall.objects.get()  # the call is logged, naming the end user
        assert (logged.end_user, logged.error) == ("u-a", "reauthorization_required")

    def test_a_row_without_an_access_token_is_not_connected(self, spy):
        datasource = connected(spy)
        end_user_token(datasource, "u-a", None)
        before = database_state()
        response = key_client().get(proxied(datasource), **as_end_user("u-a"))
        assert response.status_code == 409
        assert json.loads(body_of(response))["error"] == "not_connected"
        assert spy.seen == [] and database_state() == before

    def test_a_key_not_allowed_for_the_datasource_is_refused(self, spy):
        datasource = connected(spy)
        end_user_token(datasource, "u-a", A_TOKEN)
        other = make_datasource(slug="other", name="Other")
        client = key_client(datasources=[other])
        before = database_state()
        for _ in range(2):  # also once the refusal could have been cached
            response = client.get(proxied(datasource), **as_end_user("u-a"))
            assert response.status_code == 403
            assert json.loads(body_of(response))["error"] == "forbidden"
        assert spy.seen == [] and database_state() == before

    def test_an_allowed_key_and_then_a_restricted_one(self, spy):
        """The end user's token cached for one key does not serve a key outside the scope."""
        datasource = connected(spy)
        end_user_token(datasource, "u-a", A_TOKEN)
        assert key_client().get(proxied(datasource), **as_end_user("u-a")).status_code == 200
        other = make_datasource(slug="other", name="Other")
        spy.seen.clear()
        refused = key_client(datasources=[other]).get(proxied(datasource), **as_end_user("u-a"))
        assert refused.status_code == 403 and spy.seen == []

    def test_a_key_without_the_proxy_permission_is_refused(self, spy):
        datasource = connected(spy)
        end_user_token(datasource, "u-a", A_TOKEN)
        before = database_state()
        client = key_client(permissions=("manage",))
        response = client.get(proxied(datasource), **as_end_user("u-a"))
        assert response.status_code == 403
        assert spy.seen == [] and database_state() == before

    @pytest.mark.parametrize("end_user", ["", " u-a", "u-a ", "x" * 256, "u\x7fa"])
    def test_an_invalid_id_is_refused(self, spy, end_user):
        datasource = connected(spy)
        end_user_token(datasource, "u-a", A_TOKEN)
        before = database_state()
        response = key_client().get(proxied(datasource), **as_end_user(end_user))
        assert response.status_code == 400
        assert json.loads(body_of(response))["error"] == "invalid_end_user"
        assert spy.seen == [] and database_state() == before

    def test_a_signed_in_session_may_not_act_for_an_end_user(self, spy, admin_client):
        datasource = connected(spy)
        end_user_token(datasource, "u-a", A_TOKEN)
        before = database_state()
        response = admin_client.get(proxied(datasource), **as_end_user("u-a"))
        assert response.status_code == 403
        assert spy.seen == [] and database_state() == before

    def test_an_unknown_datasource_is_404(self, spy):
        connected(spy)
        response = key_client().get("/api/v1/datasources/nope/proxy/me", **as_end_user("u-a"))
        assert response.status_code == 404 and spy.seen == []

    def test_a_rejection_refreshes_the_end_users_token(self, spy, fake_token_endpoint):
        datasource = connected(spy)
        old = timezone.now() - timedelta(minutes=10)  # old enough to blame for a 401
        end_user_token(datasource, "u-a", A_TOKEN, refresh_token=A_REFRESH, last_refreshed_at=old)
        shared_before = Token.objects.shared().get(datasource=datasource).access_token
        spy.answers["/api/me"] = Answer(status=401, body=b'{"error": "expired"}')
        fake_token_endpoint.queue(
            (
                200,
                json.dumps(
                    {"access_token": "fresh-for-a", "refresh_token": "r2", "expires_in": 3600}
                ),
                {"Content-Type": "application/json"},
            )
        )
        response = key_client().get(proxied(datasource), **as_end_user("u-a"))
        assert response.status_code == 401  # the upstream's answer to the retry, relayed
        assert [bearer(seen) for seen in spy.seen] == [f"Bearer {A_TOKEN}", "Bearer fresh-for-a"]
        [refresh] = fake_token_endpoint.calls
        assert HEADER.lower() not in {name.lower() for name in refresh.headers}
        assert A_REFRESH in (refresh.body or "")
        token = Token.objects.get(datasource=datasource, end_user="u-a")
        assert token.access_token == "fresh-for-a" and token.refresh_count == 1
        assert Token.objects.shared().get(datasource=datasource).access_token == shared_before

    def test_the_call_log_names_the_end_user(self, spy):
        datasource = connected(spy)
        end_user_token(datasource, "u-a", A_TOKEN)
        client = key_client()
        assert client.get(proxied(datasource), **as_end_user("u-a")).status_code == 200
        assert client.get(proxied(datasource)).status_code == 200

        def logged():
            calllog.flush()
            return list(ProxyCall.objects.order_by("id").values_list("end_user", flat=True))

        assert wait_for(lambda: len(logged()) == 2 and logged()) == ["u-a", ""]
        stored = repr(list(ProxyCall.objects.values()))
        assert A_TOKEN not in stored and "refresh-of-u-a" not in stored


@pytest.mark.django_db
def test_the_admins_call_log_shows_and_finds_the_end_user(spy, staff_client):
    datasource = connected(spy)
    end_user_token(datasource, "u-a", A_TOKEN)
    client = key_client()
    assert client.get(proxied(datasource, "as-a"), **as_end_user("u-a")).status_code == 200
    assert client.get(proxied(datasource, "with-the-shared-token")).status_code == 200
    calllog.flush()
    page = staff_client.get("/admin/datasources/proxycall/?q=u-a").content.decode()
    assert "for end user u-a" in page and "as-a" in page and "with-the-shared-token" not in page


def test_the_header_is_on_the_not_forwarded_list():
    assert HEADER.lower() in transport.NOT_FORWARDED


# --- the Python client ----------------------------------------------------------------------


@pytest.mark.django_db
def test_the_client_uses_the_end_users_token(spy):
    datasource = connected(spy)
    end_user_token(datasource, "u-a", A_TOKEN)
    with datasource.session(end_user="u-a") as api:
        assert api.get("me").status_code == 200
    with datasource.session() as api:
        assert api.get("me").status_code == 200
    assert [bearer(seen) for seen in spy.seen] == [f"Bearer {A_TOKEN}", f"Bearer {ACCESS_TOKEN}"]
    assert datasource.get_access_token(end_user="u-a") == A_TOKEN
    assert datasource.get_access_token() == ACCESS_TOKEN


@pytest.mark.django_db
def test_the_client_never_falls_back_to_the_shared_token(spy):
    datasource = connected(spy)
    before = database_state()
    with pytest.raises(NotConnected) as raised:
        datasource.get_access_token(end_user="u-a")
    assert raised.value.end_user == "u-a"
    with datasource.session(end_user="u-a") as api, pytest.raises(NotConnected):
        api.get("me")
    assert spy.seen == [] and database_state() == before
    with pytest.raises(ValueError, match="end user id"):
        datasource.session(end_user=" u-a")
    with datasource.session() as api, pytest.raises(ValueError, match="end_user="):
        api.get("me", headers={HEADER: "u-a"})  # not sent upstream with the shared token
    assert spy.seen == []


# --- the sweep --------------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_sweep_refreshes_a_due_end_user_token(spy, fake_token_endpoint):
    datasource = connected(spy)
    now = timezone.now()
    token = end_user_token(
        datasource,
        "u-a",
        A_TOKEN,
        refresh_token=A_REFRESH,
        expires_at=now + timedelta(minutes=1),
        last_refreshed_at=now - timedelta(hours=1),
        refresh_due_at=now - timedelta(seconds=1),
    )
    fake_token_endpoint.queue(
        (
            200,
            json.dumps({"access_token": "swept-for-a", "expires_in": 3600}),
            {"Content-Type": "application/json"},
        )
    )
    assert token.pk in tokens.due_token_ids()
    assert refresh.run(token.pk) == "refreshed"  # the sweep's task
    [call] = fake_token_endpoint.calls
    assert A_REFRESH in (call.body or "")
    token.refresh_from_db()
    assert token.access_token == "swept-for-a" and token.refresh_count == 1
    assert token.refresh_token == A_REFRESH  # none returned: the stored one is kept
    assert Token.objects.shared().get(datasource=datasource).access_token == ACCESS_TOKEN


# --- webhooks ---------------------------------------------------------------------------------


@pytest.mark.django_db
def test_token_events_name_the_end_user_and_no_secret(spy, fake_token_endpoint):
    from datasources.models import WebhookDelivery, WebhookEndpoint
    from datasources.webhooks import endpoints

    datasource = connected(spy)
    endpoint = WebhookEndpoint(
        name="hooks",
        url="https://hooks.example.com/in",
        event_types=["token.refresh_failed", "datasource.reauthorization_required"],
    )
    endpoints.assign_secret(endpoint)
    endpoint.full_clean()
    endpoint.save()
    token = end_user_token(
        datasource,
        "u-a",
        A_TOKEN,
        refresh_token=A_REFRESH,
        last_refreshed_at=timezone.now() - timedelta(hours=1),
    )
    fake_token_endpoint.queue(
        (400, json.dumps({"error": "invalid_grant"}), {"Content-Type": "application/json"})
    )
    assert tokens.refresh_token(token, force=True).outcome == "reauthorization"
    deliveries = list(WebhookDelivery.objects.order_by("id"))
    assert [d.event_type for d in deliveries] == [
        "token.refresh_failed",
        "datasource.reauthorization_required",
    ]
    for delivery in deliveries:
        assert delivery.payload["data"]["token"]["end_user"] == "u-a"
        text = json.dumps(delivery.payload)
        assert A_TOKEN not in text and A_REFRESH not in text
    # The shared token's events do not carry the field.
    shared = Token.objects.shared().get(datasource=datasource)
    fake_token_endpoint.queue(
        (400, json.dumps({"error": "invalid_grant"}), {"Content-Type": "application/json"})
    )
    Token.objects.filter(pk=shared.pk).update(last_refreshed_at=timezone.now() - timedelta(hours=1))
    shared.refresh_from_db()
    assert tokens.refresh_token(shared, force=True).outcome == "reauthorization"
    latest = WebhookDelivery.objects.order_by("-id").first()
    assert "end_user" not in latest.payload["data"]["token"]
