"""Per-user tokens, health and metrics endpoints, and the re-authorization email."""

import json
from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission
from django.core import mail
from django.test import Client
from django.utils import timezone

from datasources import tokens
from datasources.exceptions import NotAuthorized
from datasources.models import DatasourceUsage, Token, TokenStatus
from datasources.proxy.apikeys import create_api_key

from .conftest import CALLBACK_PATH, authorize_via_provider, make_datasource


def user_with_permission(django_user_model, username: str):
    user = django_user_model.objects.create_user(username, password="pw-" + username)
    user.user_permissions.add(Permission.objects.get(codename="use_datasource"))
    return user


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("serving")
def test_per_user_tokens_end_to_end(auth_server, django_user_model):
    auth_server.app("client-basic")
    datasource = make_datasource(auth_server, token_sharing="per_user")
    alice = user_with_permission(django_user_model, "alice")
    bob = user_with_permission(django_user_model, "bob")

    # Alice authorizes for herself through the non-admin connect URL.
    browser = Client()
    browser.force_login(alice)
    start = browser.get(f"/api/v1/datasources/{datasource.slug}/connect")
    assert start.status_code == 302
    params = authorize_via_provider(auth_server, start["Location"])
    result = browser.get(CALLBACK_PATH, params)
    assert result.status_code == 200
    assert "is authorized and active" in result.content.decode()
    alice_token = Token.objects.get(datasource=datasource, user=alice)
    assert alice_token.status == TokenStatus.ACTIVE
    assert Token.objects.get(datasource=datasource, user=None).status == "not_authorized"

    # The proxy uses the calling user's token: Alice's session works...
    seen = json.loads(browser.get(f"/api/v1/datasources/{datasource.slug}/proxy/me").content)
    assert seen["user"] == "resource-owner"
    # ... an API key acting for Alice works too ...
    _, alice_key = create_api_key("alice-app", user=alice)
    response = Client(HTTP_AUTHORIZATION=f"Api-Key {alice_key}").get(
        f"/api/v1/datasources/{datasource.slug}/proxy/me"
    )
    assert response.status_code == 200
    # ... Bob has none: 409 with the URL where he can connect.
    bob_client = Client()
    bob_client.force_login(bob)
    response = bob_client.get(f"/api/v1/datasources/{datasource.slug}/proxy/me")
    assert response.status_code == 409
    assert response.json()["authorize_url"].endswith(
        f"/api/v1/datasources/{datasource.slug}/connect"
    )
    # A key that acts for nobody cannot use a per-user datasource.
    _, anonymous_key = create_api_key("nobody")
    response = Client(HTTP_AUTHORIZATION=f"Api-Key {anonymous_key}").get(
        f"/api/v1/datasources/{datasource.slug}/proxy/me"
    )
    assert response.status_code == 409
    assert response.json()["error"] == "user_required"

    # A key restricted to other datasources is refused before anything per-user is said.
    other = make_datasource(slug="other", name="Other")
    _, restricted = create_api_key("restricted", datasources=[other])
    response = Client(HTTP_AUTHORIZATION=f"Api-Key {restricted}").get(
        f"/api/v1/datasources/{datasource.slug}/proxy/me"
    )
    assert response.status_code == 403

    # Python API: per user, and refresh works per user.
    Token.objects.filter(pk=alice_token.pk).update(expires_at=timezone.now())
    assert datasource.get_access_token(user=alice) != alice_token.access_token
    with pytest.raises(NotAuthorized):
        datasource.get_access_token(user=bob)
    with pytest.raises(NotAuthorized):
        datasource.get_access_token()


@pytest.mark.django_db
def test_per_user_needs_authorization_code_grant():
    from django.core.exceptions import ValidationError

    with pytest.raises(ValidationError) as err:
        make_datasource(
            grant_type="client_credentials", authorization_url="", token_sharing="per_user"
        )
    assert "token_sharing" in err.value.message_dict


@pytest.mark.django_db
def test_connect_refuses_shared_datasources_and_users_without_permission(client, django_user_model):
    shared = make_datasource()
    per_user = make_datasource(slug="mine", name="Mine", token_sharing="per_user")
    user = django_user_model.objects.create_user("carol", password="x")
    client.force_login(user)
    assert client.get(f"/api/v1/datasources/{shared.slug}/connect").status_code == 404
    assert client.get(f"/api/v1/datasources/{per_user.slug}/connect").status_code == 403


@pytest.mark.django_db
def test_healthz_reports_database_and_broker(client):
    response = client.get("/healthz")
    assert response.status_code == 200, response.content
    payload = response.json()
    assert payload["status"] == "ok"
    assert payload["database"] == "ok" and payload["broker"] == "ok"


@pytest.mark.django_db
def test_healthz_fails_when_the_broker_is_down(client, monkeypatch):
    from config.celery import app

    # Celery reads the broker URLs from the environment before its configuration.
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://127.0.0.1:9/0")
    monkeypatch.delenv("CELERY_BROKER_WRITE_URL", raising=False)
    original = app.conf.broker_transport
    # (the filesystem broker's transport class would override the URL's scheme)
    app.conf.broker_transport = None
    try:
        response = client.get("/healthz")
    finally:
        app.conf.broker_transport = original
    assert response.status_code == 503
    assert response.json()["broker"].startswith("error")


@pytest.mark.django_db
def test_metrics_in_prometheus_format(settings, staff_client):
    client = Client()
    datasource = make_datasource()
    Token.objects.filter(datasource=datasource).update(
        status="active", refresh_count=3, refresh_due_at=timezone.now()
    )
    DatasourceUsage.objects.create(
        datasource=datasource, calls=10, errors=2, total_duration_ms=1500, last_status=200
    )
    assert client.get("/metrics").status_code == 403
    settings.DATASOURCES = {**settings.DATASOURCES, "METRICS_TOKEN": "scrape-me"}
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 403
    text = client.get("/metrics", HTTP_AUTHORIZATION="Bearer scrape-me").content.decode()
    assert 'datasources_tokens{status="active"} 1' in text
    assert "datasources_refreshes_total 3" in text
    assert "datasources_tokens_due 1" in text  # the sweep's backlog
    assert 'datasources_proxy_calls_total{datasource="example"} 10' in text
    assert 'datasources_proxy_errors_total{datasource="example"} 2' in text
    assert 'datasources_proxy_duration_seconds_sum{datasource="example"} 1.500' in text
    assert "# TYPE datasources_proxy_calls_total counter" in text
    assert staff_client.get("/metrics").status_code == 200


@pytest.mark.django_db(transaction=True)
def test_owner_is_emailed_when_reauthorization_is_needed(
    fake_token_endpoint, django_user_model, settings
):
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    owner = django_user_model.objects.create_user("owner", "owner@example.com", "x")
    datasource = make_datasource(owner=owner)
    Token.objects.filter(datasource=datasource).update(
        access_token="a-token-value",
        refresh_token="r-token-value",
        status="active",
        expires_at=timezone.now() - timedelta(seconds=1),
    )
    fake_token_endpoint.queue(
        (400, '{"error": "invalid_grant"}', {"Content-Type": "application/json"})
    )
    assert tokens.refresh_token(datasource).outcome == "reauthorization"
    assert len(mail.outbox) == 1
    message = mail.outbox[0]
    assert message.to == ["owner@example.com"]
    assert "needs re-authorization" in message.subject
    assert "invalid_grant" in message.body
    assert f"/admin/datasources/datasource/{datasource.pk}/change/" in message.body
    assert "r-token-value" not in message.body and "a-token-value" not in message.body


@pytest.mark.django_db
def test_admin_sets_the_creator_as_owner(staff_client):
    from datasources.models import Datasource

    response = staff_client.post(
        "/admin/datasources/datasource/add/",
        {
            "name": "Owned",
            "slug": "owned",
            "base_url": "https://api.example.com/",
            "grant_type": "client_credentials",
            "token_sharing": "shared",
            "scope_separator": " ",
            "access_token_url": "https://example.com/token",
            "client_id": "cid",
            "client_secret": "a-secret",
            "client_authentication": "basic",
            "token_placement": "header",
            "header_prefix": "Bearer",
            "query_param_name": "access_token",
            "custom_auth_params": "{}",
        },
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    assert Datasource.objects.get(slug="owned").owner == staff_client.user
