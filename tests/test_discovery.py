"""OIDC / RFC 8414 discovery against django-oauth-toolkit, and provider presets."""

import json

import pytest
import requests
from django.core.exceptions import ValidationError

from datasources.admin import presets
from datasources.authserver import oauth
from datasources.models import Datasource

pytestmark = pytest.mark.django_db(transaction=True)


def test_discovery_reads_dot_openid_configuration(auth_server):
    metadata = oauth.discover(f"{auth_server.base}/o")
    assert metadata.issuer == f"{auth_server.base}/o"
    assert metadata.authorization_endpoint == f"{auth_server.base}/o/authorize/"
    assert metadata.token_endpoint == f"{auth_server.base}/o/token/"
    assert metadata.pkce_s256 is True
    assert metadata.returns_iss is False  # DOT does not implement RFC 9207


def test_issuer_mismatch_is_refused(auth_server, settings):
    settings.OAUTH2_PROVIDER = {
        **settings.OAUTH2_PROVIDER,
        "OIDC_ISS_ENDPOINT": "https://impostor.example.com",
    }
    with pytest.raises(oauth.DiscoveryError, match=r"impostor\.example\.com"):
        oauth.discover(f"{auth_server.base}/o")


def test_unknown_issuer_tries_both_well_known_locations(auth_server):
    with pytest.raises(oauth.DiscoveryError) as err:
        oauth.discover(f"{auth_server.base}/nothing-here")
    assert ".well-known/openid-configuration" in str(err.value)
    assert ".well-known/oauth-authorization-server/nothing-here" in str(err.value)


def test_unreachable_and_non_json_metadata(fake_token_endpoint):
    fake_token_endpoint.queue(requests.ConnectionError("refused"))
    with pytest.raises(oauth.DiscoveryError, match="unreachable"):
        oauth.discover("https://issuer.example.com")
    fake_token_endpoint.queue((200, "<html>hi</html>", {"Content-Type": "text/html"}))
    with pytest.raises(oauth.DiscoveryError, match="not answer with a JSON object"):
        oauth.discover("https://issuer.example.com")


def test_admin_form_fills_endpoints_from_discovery(auth_server, staff_client):
    issuer = f"{auth_server.base}/o"
    response = staff_client.post(
        "/admin/datasources/datasource/add/",
        {
            "name": "Discovered",
            "slug": "discovered",
            "base_url": f"{auth_server.base}/upstream/",
            "grant_type": "authorization_code",
            "token_sharing": "shared",
            "issuer": issuer,
            "discover": "on",
            "client_id": "cid",
            "client_secret": "s",
            "scope_separator": " ",
            "client_authentication": "basic",
            "token_placement": "header",
            "header_prefix": "Bearer",
            "query_param_name": "access_token",
            "custom_auth_params": "{}",
        },
        follow=True,
    )
    assert "Endpoints filled from" in response.content.decode()
    created = Datasource.objects.get(slug="discovered")
    assert created.authorization_url == f"{auth_server.base}/o/authorize/"
    assert created.access_token_url == f"{auth_server.base}/o/token/"
    assert created.use_pkce is True
    assert created.issuer_returns_iss is False


def test_admin_form_reports_discovery_errors(auth_server, staff_client):
    response = staff_client.post(
        "/admin/datasources/datasource/add/",
        {
            "name": "Broken",
            "slug": "broken",
            "base_url": "https://api.example.com/",
            "grant_type": "authorization_code",
            "token_sharing": "shared",
            "issuer": f"{auth_server.base}/missing",
            "discover": "on",
            "client_id": "cid",
            "scope_separator": " ",
            "client_authentication": "basic",
            "token_placement": "header",
            "custom_auth_params": "{}",
        },
    )
    assert response.status_code == 200
    assert "No metadata found" in response.content.decode()
    assert not Datasource.objects.filter(slug="broken").exists()


# --- presets ----------------------------------------------------------------------------------


def test_catalogue_covers_the_common_providers():
    assert {
        "google",
        "microsoft",
        "github",
        "salesforce",
        "slack",
        "hubspot",
        "zoho",
        "auth0",
        "okta",
    } <= set(presets.all_presets())


@pytest.mark.parametrize("key", sorted(presets.all_presets()))
def test_every_preset_is_a_valid_datasource_once_placeholders_are_filled(key):
    initial = presets.initial_for(key)
    fields = {
        k: v.replace("{tenant}", "acme").replace("{instance}", "acme") if isinstance(v, str) else v
        for k, v in initial.items()
    }
    if isinstance(fields.get("custom_auth_params"), str):
        fields["custom_auth_params"] = json.loads(fields["custom_auth_params"])
    datasource = Datasource(name=key, slug=key, client_id="cid", client_secret="s", **fields)
    datasource.full_clean()
    preset = presets.all_presets()[key]
    if not preset["sends_expires_in"]:
        assert datasource.token_lifetime, "a provider without expires_in needs a lifetime"


def test_placeholders_must_be_replaced():
    fields = presets.initial_for("okta")
    with pytest.raises(ValidationError):
        Datasource(
            name="o", slug="o", client_id="c", **{**fields, "custom_auth_params": {}}
        ).full_clean()


def test_choosing_a_preset_prefills_the_add_form(staff_client):
    html = staff_client.get("/admin/datasources/datasource/add/?preset=google").content.decode()
    assert "https://accounts.google.com/o/oauth2/v2/auth" in html
    assert "access_type" in html and "offline" in html
    assert "Google returns a refresh token only with access_type=offline" in html
    listing = staff_client.get("/admin/datasources/datasource/add/").content.decode()
    assert "?preset=slack" in listing


def test_slack_scopes_are_sent_comma_separated():
    fields = presets.initial_for("slack")
    datasource = Datasource(
        name="s", slug="s", client_id="c", scopes="chat:write channels:read", **fields
    )
    url = oauth.build_authorization_url(
        datasource, state="x", redirect_uri="https://a/cb", code_challenge=None
    )
    assert "scope=chat%3Awrite%2Cchannels%3Aread" in url
