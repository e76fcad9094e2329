"""The admin is the builder's UI: write-only secret, status, callback URL, warnings."""

import pytest
from django.urls import reverse

from datasources.models import Datasource, Token, TokenEvent

from .conftest import SECRET, make_datasource

pytestmark = pytest.mark.django_db


def form_data(datasource: Datasource, **overrides) -> dict:
    data = {
        "name": datasource.name,
        "slug": datasource.slug,
        "base_url": datasource.base_url,
        "grant_type": datasource.grant_type,
        "authorization_url": datasource.authorization_url,
        "access_token_url": datasource.access_token_url,
        "client_id": datasource.client_id,
        "client_secret": "",
        "scopes": datasource.scopes,
        "client_authentication": datasource.client_authentication,
        "use_pkce": "on",
        "token_placement": datasource.token_placement,
        "header_prefix": datasource.header_prefix,
        "query_param_name": datasource.query_param_name,
        "custom_auth_params": "{}",
        "audience": "",
        "resource": "",
        "revocation_url": "",
        "issuer": "",
        "token_lifetime": "",
        "expiry_status_codes": "401",
        "token_sharing": "shared",
        "scope_separator": " ",
        "issuer_returns_iss": "on",
        "owner": "",
    }
    data.update(overrides)
    return data


def change_url(datasource: Datasource) -> str:
    return reverse("admin:datasources_datasource_change", args=[datasource.pk])


def test_change_page_never_contains_the_secret(staff_client):
    datasource = make_datasource()
    Token.objects.filter(datasource=datasource).update(
        access_token="visible-access-token", refresh_token="visible-refresh-token", status="active"
    )
    for url in (
        change_url(datasource),
        reverse("admin:datasources_datasource_changelist"),
        reverse("admin:datasources_token_change", args=[datasource.token.pk]),
        reverse("admin:datasources_token_changelist"),
    ):
        html = staff_client.get(url).content.decode()
        assert SECRET not in html
        assert "visible-access-token" not in html
        assert "visible-refresh-token" not in html
    html = staff_client.get(change_url(datasource)).content.decode()
    assert "A secret is stored" in html
    assert "http://testserver/api/v1/datasources/authorize" in html


def test_blank_secret_keeps_the_stored_one(staff_client):
    datasource = make_datasource()
    response = staff_client.post(change_url(datasource), form_data(datasource, name="Renamed"))
    assert response.status_code == 302, response.content.decode()[:2000]
    datasource.refresh_from_db()
    assert datasource.name == "Renamed"
    assert datasource.client_secret == SECRET


def test_new_secret_replaces_and_clear_removes(staff_client):
    datasource = make_datasource()
    staff_client.post(change_url(datasource), form_data(datasource, client_secret="new-secret-1"))
    datasource.refresh_from_db()
    assert datasource.client_secret == "new-secret-1"
    staff_client.post(change_url(datasource), form_data(datasource, clear_client_secret="on"))
    datasource.refresh_from_db()
    assert datasource.client_secret is None


def test_form_error_does_not_echo_a_typed_secret(staff_client):
    datasource = make_datasource()
    response = staff_client.post(
        change_url(datasource),
        form_data(datasource, client_secret="typed-secret-value", base_url="not-a-url"),
    )
    assert response.status_code == 200
    assert "typed-secret-value" not in response.content.decode()
    datasource.refresh_from_db()
    assert datasource.client_secret == SECRET


def test_add_datasource_through_admin_with_comma_scopes(staff_client):
    template = Datasource(
        name="New",
        slug="new",
        base_url="https://api.example.com/",
        grant_type="authorization_code",
        authorization_url="https://example.com/authorize",
        access_token_url="https://example.com/token",
        client_id="cid",
        scopes="a,b",
        client_authentication="body",
        token_placement="header",
        header_prefix="Bearer",
        query_param_name="access_token",
    )
    response = staff_client.post(
        reverse("admin:datasources_datasource_add"),
        form_data(
            template, client_secret="brand-new-secret", custom_auth_params='{"prompt": "consent"}'
        ),
    )
    assert response.status_code == 302, response.content.decode()[:3000]
    created = Datasource.objects.get(slug="new")
    assert created.scopes == "a b"
    assert created.client_secret == "brand-new-secret"
    assert created.custom_auth_params == {"prompt": "consent"}


def test_query_placement_shows_a_warning(staff_client):
    datasource = make_datasource()
    response = staff_client.post(
        change_url(datasource), form_data(datasource, token_placement="query"), follow=True
    )
    assert "RFC 9700" in response.content.decode()


def test_reserved_custom_params_are_rejected(staff_client):
    datasource = make_datasource()
    response = staff_client.post(
        change_url(datasource), form_data(datasource, custom_auth_params='{"redirect_uri": "x"}')
    )
    assert response.status_code == 200
    assert "cannot be overridden" in response.content.decode()


def test_status_and_recent_events_are_shown(staff_client):
    datasource = make_datasource()
    Token.objects.filter(datasource=datasource).update(status="needs_reauthorization")
    TokenEvent.objects.create(
        datasource=datasource, kind="reauthorization_required", detail="invalid_grant: revoked"
    )
    html = staff_client.get(change_url(datasource)).content.decode()
    assert "Needs re-authorization" in html
    assert "Re-authorize" in html
    assert "invalid_grant: revoked" in html


def test_use_datasource_permission_exists():
    from django.contrib.auth.models import Permission

    assert Permission.objects.filter(codename="use_datasource").exists()


def test_public_base_url_setting_builds_the_callback(staff_client, settings):
    settings.DATASOURCES = {"PUBLIC_BASE_URL": "https://ds.example.com/"}
    datasource = make_datasource()
    html = staff_client.get(change_url(datasource)).content.decode()
    assert "https://ds.example.com/api/v1/datasources/authorize" in html


def test_change_page_shows_a_configuration_error_and_a_missing_refresh_token(staff_client):
    from datetime import timedelta

    from django.utils import timezone

    datasource = make_datasource()
    Token.objects.filter(datasource=datasource).update(
        access_token="a",
        refresh_token=None,
        status="active",
        expires_at=timezone.now() + timedelta(minutes=30),
        failure_kind="configuration",
        last_error="Configuration error: invalid_scope: unknown scope write",
    )
    page = staff_client.get(change_url(datasource)).content.decode()
    assert "datasource-banner-configuration" in page
    assert "invalid_scope: unknown scope write" in page
    assert "Renewing the token fails because of the settings" in page
    assert "Correct “Scope(s)”" in page  # what to do, in plain words
    assert "datasource-banner-no-refresh-token" in page
    assert "stops working at" in page and "access_type=offline" in page


def test_expiry_status_codes_are_validated(staff_client):
    datasource = make_datasource()
    response = staff_client.post(
        change_url(datasource), form_data(datasource, expiry_status_codes="401, teapot")
    )
    assert response.status_code == 200
    assert "not an HTTP error status" in response.content.decode()
    response = staff_client.post(
        change_url(datasource), form_data(datasource, expiry_status_codes="403 401")
    )
    assert response.status_code == 302
    datasource.refresh_from_db()
    assert datasource.expiry_status_codes == "401,403"
    assert datasource.expiry_statuses == {401, 403}
