"""Issue 31 (first part): API key permissions and the management JSON API.

* Every answer of the API, success or error, is validated against the OpenAPI document the
  server itself serves at /api/v1/openapi.json, by openapi-core (not by hand-written checks).
* Permissions: ``proxy`` (the default), ``manage``, ``token``. A key used beyond
  its permission gets ``403 {"error": "forbidden"}`` and nothing changes; a key without
  ``proxy`` is refused by the proxy on both serving paths and nothing reaches the upstream.
* Scope: a key sees and uses only its datasources.
* Secrets: no answer carries a client secret or a refresh token; the access token only to a
  ``token`` key, with ``Cache-Control: no-store``, and each read is a ``token_read`` event.
"""

from __future__ import annotations

import io
import json

import pytest
from django.core.management import call_command
from django.test import Client

from datasources.models import ApiKey, Datasource, Token, TokenEvent
from datasources.proxy.apikeys import create_api_key

from .conftest import SECRET, make_datasource
from .test_retries import flaky_datasource

pytestmark = pytest.mark.django_db(transaction=True)

REFRESH_TOKEN = "refresh-token-that-must-never-leave"


def key_with(*permissions: str, datasources=None, user=None) -> str:
    _, key = create_api_key("app", permissions=permissions, datasources=datasources, user=user)
    return key


def body(response) -> dict:
    return json.loads(response.content)


def authorized(datasource) -> Token:
    Token.objects.filter(datasource=datasource, user=None).update(refresh_token=REFRESH_TOKEN)
    return Token.objects.get(datasource=datasource, user=None)


def test_a_manage_key_lists_and_reads_datasources_without_secrets(api, flaky):
    datasource = flaky_datasource(flaky)
    token = authorized(datasource)
    key = key_with("manage")

    listed = api("get", "/api/v1/datasources", key)
    assert listed.status_code == 200
    [item] = body(listed)["items"]
    assert item["slug"] == "flaky" and item["token"]["status"] == "active"
    assert item["upstream"] == {"state": "pass", "consecutive_failures": 0}
    assert body(listed)["next_cursor"] is None

    one = api("get", "/api/v1/datasources/flaky", key)
    assert one.status_code == 200 and body(one) == item
    for response in (listed, one):
        text = response.content.decode()
        assert token.access_token not in text
        assert REFRESH_TOKEN not in text and SECRET not in text


def test_pages_follow_the_cursor(api):
    for slug in ("alpha", "bravo", "charlie"):
        make_datasource(slug=slug, name=slug)
    key = key_with("manage")
    first = body(api("get", "/api/v1/datasources?limit=2", key))
    assert [item["slug"] for item in first["items"]] == ["alpha", "bravo"]
    second = body(api("get", f"/api/v1/datasources?limit=2&cursor={first['next_cursor']}", key))
    assert [item["slug"] for item in second["items"]] == ["charlie"]
    assert second["next_cursor"] is None
    invalid = api("get", "/api/v1/datasources?limit=0", key)
    assert invalid.status_code == 400 and body(invalid)["error"] == "invalid_request"


def test_a_key_sees_only_its_datasources(api):
    mine = make_datasource(slug="mine", name="Mine")
    make_datasource(slug="theirs", name="Theirs")
    key = key_with("manage", "token", datasources=[mine])
    assert [i["slug"] for i in body(api("get", "/api/v1/datasources", key))["items"]] == ["mine"]
    for method, path in (
        ("get", "/api/v1/datasources/theirs"),
        ("post", "/api/v1/datasources/theirs/token"),
    ):
        refused = api(method, path, key)
        assert refused.status_code == 403 and body(refused)["error"] == "forbidden"
    missing = api("get", "/api/v1/datasources/nothing-here", key)
    assert missing.status_code == 404 and body(missing)["error"] == "not_found"


@pytest.mark.parametrize(
    "permission, method, path",
    [
        ("manage", "get", "/api/v1/datasources"),
        ("manage", "get", "/api/v1/datasources/flaky"),
        ("token", "post", "/api/v1/datasources/flaky/token"),
    ],
)
def test_a_key_without_the_permission_is_refused_and_nothing_changes(
    api, flaky, permission, method, path
):
    flaky_datasource(flaky)
    others = {"proxy", "manage", "token"} - {permission}
    key = key_with(*others)
    events = TokenEvent.objects.count()
    refused = api(method, path, key)
    assert refused.status_code == 403
    assert body(refused) == {
        "error": "forbidden",
        "detail": f"This API key lacks the {permission!r} permission.",
        "permission": permission,
    }
    assert TokenEvent.objects.count() == events
    assert flaky.token_calls == 0


@pytest.mark.parametrize("credential", ["none", "wrong", "revoked"])
def test_no_valid_key_is_401(api, credential):
    key = key_with("manage")
    if credential == "revoked":
        from django.utils import timezone

        ApiKey.objects.update(revoked_at=timezone.now())
    sent = {"none": None, "wrong": key[:-4] + "AAAA", "revoked": key}[credential]
    refused = api("get", "/api/v1/datasources", sent)
    assert refused.status_code == 401 and body(refused)["error"] == "unauthorized"
    assert refused["WWW-Authenticate"].startswith("Api-Key")


def test_a_token_key_reads_a_fresh_access_token_and_the_read_is_recorded(api, flaky):
    datasource = flaky_datasource(flaky)
    token = authorized(datasource)
    key = key_with("token")
    answer = api("post", "/api/v1/datasources/flaky/token", key)
    assert answer.status_code == 200
    assert answer["Cache-Control"] == "no-store"
    assert body(answer)["access_token"] == token.access_token
    assert body(answer)["token_type"] == "Bearer"
    assert REFRESH_TOKEN not in answer.content.decode()
    [event] = TokenEvent.objects.filter(datasource=datasource, kind="token_read")
    assert "app" in event.detail and token.access_token not in event.detail


def test_a_token_key_gets_a_refreshed_token_when_the_stored_one_expired(api, flaky):
    from datetime import timedelta

    from django.utils import timezone

    datasource = flaky_datasource(flaky)
    Token.objects.filter(datasource=datasource).update(
        expires_at=timezone.now() - timedelta(seconds=5)
    )
    answer = api("post", "/api/v1/datasources/flaky/token", key_with("token"))
    assert answer.status_code == 200
    assert flaky.token_calls == 1  # client credentials: a new token from the token endpoint
    stored = Token.objects.get(datasource=datasource, user=None)
    assert body(answer)["access_token"] == stored.access_token


def test_token_answers_say_what_to_do(api, flaky):
    make_datasource(slug="never")  # authorization code, never authorized
    key = key_with("token")
    refused = api("post", "/api/v1/datasources/never/token", key)
    assert refused.status_code == 409 and body(refused)["error"] == "not_authorized"


@pytest.mark.usefixtures("serving", "fresh_proxy_cache")
def test_the_proxy_refuses_a_key_without_the_proxy_permission(flaky):
    flaky_datasource(flaky)
    key = key_with("manage", "token")
    refused = Client(HTTP_AUTHORIZATION=f"Api-Key {key}").get(
        "/api/v1/datasources/flaky/proxy/items/1"
    )
    assert refused.status_code == 403
    assert body(refused)["error"] == "forbidden" and "proxy" in body(refused)["detail"]
    assert flaky.count("/api/items/1") == 0


def test_create_api_key_grants_what_it_is_told(flaky):
    flaky_datasource(flaky)
    out, err = io.StringIO(), io.StringIO()
    call_command(
        "create_api_key",
        "ops",
        "--all-datasources",
        "--permission",
        "manage",
        "--permission",
        "token",
        stdout=out,
        stderr=err,
    )
    api_key = ApiKey.objects.get(name="ops")
    assert api_key.permissions == {"manage", "token"}
    assert "manage, token" in err.getvalue()
    call_command("create_api_key", "default", "--all-datasources", stdout=out, stderr=err)
    assert ApiKey.objects.get(name="default").permissions == {"proxy"}


CLIENT_CREDENTIALS = {
    "name": "Billing",
    "base_url": "https://billing.example.com/api/",
    "grant_type": "client_credentials",
    "access_token_url": "https://billing.example.com/oauth/token",
    "client_id": "billing-client",
    "client_secret": "billing-secret-value-never-shown",
}


def test_put_creates_then_updates_a_datasource_with_the_imports_validation(api):
    key = key_with("manage")
    created = api(
        "put",
        "/api/v1/datasources/billing",
        key,
        data=CLIENT_CREDENTIALS,
        content_type="application/json",
    )
    assert created.status_code == 201, created.content
    assert body(created)["slug"] == "billing" and body(created)["name"] == "Billing"
    assert "billing-secret-value-never-shown" not in created.content.decode()
    stored = Datasource.objects.get(slug="billing")
    assert stored.client_secret == "billing-secret-value-never-shown"  # written, encrypted

    renamed = api(
        "put",
        "/api/v1/datasources/billing",
        key,
        data={"name": "Billing v2"},
        content_type="application/json",
    )
    assert renamed.status_code == 200 and body(renamed)["name"] == "Billing v2"
    stored.refresh_from_db()
    assert stored.client_id == "billing-client"  # fields left out keep their values
    assert stored.client_secret == "billing-secret-value-never-shown"


@pytest.mark.parametrize(
    "entry, problem",
    [
        ({**CLIENT_CREDENTIALS, "client_secret": {"env": "DATASOURCE_SECRET_X"}}, "client_secret"),
        ({**CLIENT_CREDENTIALS, "base_url": "ftp://billing.example.com/"}, "base_url"),
        ({**CLIENT_CREDENTIALS, "slug": "other"}, "slug"),
        ({**CLIENT_CREDENTIALS, "no_such_field": 1}, "no_such_field"),
    ],
    ids=["env-secret", "bad-url", "other-slug", "unknown-field"],
)
def test_put_refuses_what_the_import_refuses_and_writes_nothing(api, entry, problem):
    key = key_with("manage")
    refused = api(
        "put", "/api/v1/datasources/billing", key, data=entry, content_type="application/json"
    )
    assert refused.status_code == 400, refused.content
    assert body(refused)["error"] == "invalid_request"
    assert problem in refused.content.decode()
    assert not Datasource.objects.filter(slug__in=["billing", "other"]).exists()


def test_put_stays_within_the_keys_scope(api):
    mine = make_datasource(slug="mine", name="Mine")
    theirs = make_datasource(slug="theirs", name="Theirs")
    key = key_with("manage", datasources=[mine])
    for slug in ("theirs", "new-one"):
        refused = api(
            "put",
            f"/api/v1/datasources/{slug}",
            key,
            data={"name": "Taken"},
            content_type="application/json",
        )
        assert refused.status_code == 403 and body(refused)["error"] == "forbidden"
    theirs.refresh_from_db()
    assert theirs.name == "Theirs" and not Datasource.objects.filter(slug="new-one").exists()
    updated = api(
        "put",
        "/api/v1/datasources/mine",
        key,
        data={"name": "Mine, renamed"},
        content_type="application/json",
    )
    assert updated.status_code == 200 and body(updated)["name"] == "Mine, renamed"


# --- end users (issue 31) -------------------------------------------------------------------


def end_user(datasource, name: str, **fields) -> Token:
    from datetime import timedelta

    from django.utils import timezone

    now = timezone.now()
    values = dict(
        access_token=f"access-of-{name}",
        refresh_token=f"refresh-of-{name}",
        token_type="Bearer",
        status="active",
        expires_at=now + timedelta(hours=1),
        obtained_at=now,
        last_refreshed_at=now,
    )
    values.update(fields)
    return Token.objects.create(datasource=datasource, end_user=name, **values)


def app_datasource(slug: str = "app", **fields) -> Datasource:
    """An authorization-code datasource (end users connect those) with a shared token; its
    token endpoint is the fake_token_endpoint fixture's."""
    datasource = make_datasource(slug=slug, name=slug, **fields)
    Token.objects.shared().filter(datasource=datasource).update(
        access_token="shared-access", refresh_token=REFRESH_TOKEN, status="active"
    )
    return datasource


def form(request) -> dict[str, str]:
    from urllib.parse import parse_qsl

    return dict(parse_qsl(request.body or ""))


FRESH = (
    200,
    json.dumps({"access_token": "fresh-access", "expires_in": 3600}),
    {"Content-Type": "application/json"},
)


def rows() -> list:
    return list(
        Token.objects.order_by("pk").values_list(
            "pk", "end_user", "access_token", "refresh_token", "status", "refresh_count"
        )
    )


def test_a_token_key_reads_an_end_users_token_never_the_shared_one(api):
    datasource = app_datasource()
    end_user(datasource, "u-1")
    key = key_with("token")
    answer = api(
        "post",
        "/api/v1/datasources/app/token",
        key,
        data={"end_user": "u-1"},
        content_type="application/json",
    )
    assert answer.status_code == 200, answer.content
    assert body(answer)["access_token"] == "access-of-u-1"
    assert answer["Cache-Control"] == "no-store"
    event = TokenEvent.objects.filter(kind="token_read").get()
    assert "end user u-1" in event.detail and "access-of" not in event.detail

    before = rows(), TokenEvent.objects.count()
    missing = api(
        "post",
        "/api/v1/datasources/app/token",
        key,
        data={"end_user": "u-2"},
        content_type="application/json",
    )
    assert missing.status_code == 409
    assert body(missing)["error"] == "not_connected" and body(missing)["end_user"] == "u-2"
    assert REFRESH_TOKEN not in missing.content.decode()
    invalid = api(
        "post",
        "/api/v1/datasources/app/token",
        key,
        data={"end_user": " u-1"},
        content_type="application/json",
    )
    assert invalid.status_code == 400 and body(invalid)["error"] == "invalid_end_user"
    for wrong in ('{"end_user": 7}', '{"end_user": "u-1", "user": 1}', "not json"):
        refused = api(
            "post",
            "/api/v1/datasources/app/token",
            key,
            data=wrong,
            content_type="application/json",
        )
        assert refused.status_code == 400 and body(refused)["error"] == "invalid_request"
    assert (rows(), TokenEvent.objects.count()) == before
    # Without a body: the shared token, as before.
    shared = api("post", "/api/v1/datasources/app/token", key)
    assert shared.status_code == 200 and body(shared)["access_token"] == "shared-access"


def test_connections_are_listed_by_end_user_with_cursor_and_filters(api):
    datasource = app_datasource()
    for name in ("carol", "alice", "bob", "dave"):
        end_user(datasource, name)
    Token.objects.filter(end_user="bob").update(
        status="needs_reauthorization", last_error="invalid_grant"
    )
    other = make_datasource(slug="other", name="Other")
    end_user(other, "alice")
    key = key_with("manage")
    url = "/api/v1/datasources/app/connections"

    first = body(api("get", f"{url}?limit=2", key))
    assert [item["end_user"] for item in first["items"]] == ["alice", "bob"]
    assert set(first["items"][0]) == {
        "end_user",
        "status",
        "expires_at",
        "last_refreshed_at",
        "last_error",
        "connected_at",
        "identity",
    }
    assert first["next_cursor"] == "bob"
    second = body(api("get", f"{url}?limit=2&cursor=bob", key))
    assert [item["end_user"] for item in second["items"]] == ["carol", "dave"]
    assert second["next_cursor"] is None
    failing = body(api("get", f"{url}?status=needs_reauthorization", key))
    assert [(i["end_user"], i["last_error"]) for i in failing["items"]] == [
        ("bob", "invalid_grant")
    ]
    one = body(api("get", f"{url}?end_user=carol", key))
    assert [item["end_user"] for item in one["items"]] == ["carol"]
    for listed in (first, second, failing, one):
        text = json.dumps(listed)
        assert "access-of" not in text and "refresh-of" not in text and REFRESH_TOKEN not in text

    bad = api("get", f"{url}?status=weird", key)
    assert bad.status_code == 400 and body(bad)["error"] == "invalid_request"
    refused = api("get", url, key_with("token"))
    assert refused.status_code == 403 and body(refused)["permission"] == "manage"
    scoped = api("get", url, key_with("manage", datasources=[other]))
    assert scoped.status_code == 403


def test_deleting_a_connection_revokes_then_forgets_it(api, fake_token_endpoint):
    datasource = app_datasource(revocation_url="https://api.example.com/revoke")
    fake_token_endpoint.queue((200, "", {}), (200, "", {}))
    end_user(datasource, "u-1")
    end_user(datasource, "u-2")
    key = key_with("manage")
    url = "/api/v1/datasources/app/connections/u-1"

    refused = api("delete", url, key_with("token"))
    assert refused.status_code == 403
    assert Token.objects.filter(end_user="u-1").exists()

    gone = api("delete", url, key)
    assert gone.status_code == 204
    assert not Token.objects.filter(end_user="u-1").exists()
    assert Token.objects.filter(end_user="u-2").exists()
    assert Token.objects.shared().filter(datasource=datasource).exists()
    revoked = fake_token_endpoint.calls
    assert all(r.url == "https://api.example.com/revoke" for r in revoked)
    assert [form(r)["token"] for r in revoked] == ["refresh-of-u-1", "access-of-u-1"]
    event = TokenEvent.objects.filter(kind="revoked").get()
    assert "u-1" in event.detail and "access-of" not in event.detail

    before = rows()
    again = api("delete", url, key)
    assert again.status_code == 404 and body(again)["error"] == "not_connected"
    assert body(again)["end_user"] == "u-1"
    assert rows() == before


def test_an_end_user_id_with_a_slash_is_addressed_in_the_path():
    datasource = app_datasource()
    end_user(datasource, "team/u-1")
    key = key_with("manage")
    client = Client(HTTP_AUTHORIZATION=f"Api-Key {key}")
    url = "/api/v1/datasources/app/connections/team%2Fu-1"
    assert client.delete(url).status_code == 204
    assert not Token.objects.filter(end_user="team/u-1").exists()


def test_refreshing_a_connection_now(api, fake_token_endpoint):
    datasource = app_datasource()
    token = end_user(datasource, "u-1")
    fake_token_endpoint.queue(FRESH)
    key = key_with("manage")
    url = "/api/v1/datasources/app/connections/u-1/refresh"
    answer = api("post", url, key)
    assert answer.status_code == 200, answer.content
    assert body(answer)["end_user"] == "u-1" and body(answer)["status"] == "active"
    assert "access-of" not in answer.content.decode()
    token.refresh_from_db()
    assert token.refresh_count == 1 and token.access_token == "fresh-access"
    [refresh] = fake_token_endpoint.calls
    assert form(refresh)["refresh_token"] == "refresh-of-u-1"
    shared = Token.objects.shared().get(datasource=datasource)
    assert shared.refresh_count == 0

    before = rows()
    missing = api("post", "/api/v1/datasources/app/connections/u-2/refresh", key)
    assert missing.status_code == 404 and body(missing)["error"] == "not_connected"
    refused = api("post", url, key_with("token"))
    assert refused.status_code == 403
    assert rows() == before


def test_every_bad_request_is_invalid_request_with_the_clients_field_names(api):
    """A body that is not JSON, a missing field, a bad parameter, an import rule: all
    ``400 invalid_request``, each problem naming the field as the client sent it."""
    make_datasource(slug="crm", name="CRM")
    key = key_with("manage", "connect")

    def problems(response) -> list[dict]:
        assert response.status_code == 400, response.content
        answer = body(response)
        assert answer["error"] == "invalid_request"
        return answer.get("problems", [])

    problems(
        api("put", "/api/v1/datasources/crm", key, data="not json", content_type="application/json")
    )
    problems(
        api("post", "/api/v1/connect/sessions", key, data="{bad", content_type="application/json")
    )
    missing = problems(
        api("post", "/api/v1/connect/sessions", key, data={}, content_type="application/json")
    )
    assert {p["field"] for p in missing} == {"datasource", "end_user", "return_url"}
    assert [p["field"] for p in problems(api("get", "/api/v1/datasources?limit=0", key))] == [
        "limit"
    ]
    url = problems(
        api(
            "put",
            "/api/v1/datasources/crm",
            key,
            data={"base_url": "notaurl"},
            content_type="application/json",
        )
    )
    assert url and {p["field"] for p in url} == {"base_url"}
    assert not any("entry 1" in p["message"] for p in url)
