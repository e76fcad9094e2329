"""Authorization code flow against django-oauth-toolkit, a real authorization server."""

from datetime import timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
from django.test import Client
from django.utils import timezone

from datasources.models import AuthorizationRequest, Token, TokenEvent, TokenStatus
from datasources.signals import datasource_authorized

from .conftest import CALLBACK_PATH, authorize_via_provider, captured, make_datasource

pytestmark = pytest.mark.django_db(transaction=True)


def start(staff_client, datasource) -> str:
    response = staff_client.get(f"/admin/datasources/datasource/{datasource.pk}/authorize/")
    assert response.status_code == 302, response.content[:300]
    return response["Location"]


@pytest.mark.parametrize("method", ["basic", "body"])
def test_full_flow_stores_token_for_each_client_authentication(auth_server, staff_client, method):
    auth_server.app(f"client-{method}")
    datasource = make_datasource(
        auth_server, client_id=f"client-{method}", client_authentication=method
    )
    with captured(datasource_authorized) as received:
        provider_url = start(staff_client, datasource)
        query = parse_qs(urlsplit(provider_url).query)
        assert query["response_type"] == ["code"]
        assert query["code_challenge_method"] == ["S256"]
        assert query["scope"] == ["read write"]
        assert query["redirect_uri"] == [f"http://testserver{CALLBACK_PATH}"]
        params = authorize_via_provider(auth_server, provider_url)
        response = staff_client.get(CALLBACK_PATH, params, follow=True)
    assert response.redirect_chain[-1][0] == datasource.get_admin_url()
    assert "is authorized and active" in response.content.decode()
    token = Token.objects.get(datasource=datasource)
    assert token.status == TokenStatus.ACTIVE
    assert token.access_token and token.refresh_token
    assert token.scope == "read write"
    assert 3500 < (token.expires_at - timezone.now()).total_seconds() <= 3600
    assert TokenEvent.objects.filter(datasource=datasource, kind="authorized").count() == 1
    assert received and received[0]["datasource"] == datasource
    # The token really works at the provider's protected resource.
    import requests

    echo = requests.get(
        f"{auth_server.base}/upstream/me",
        headers={"Authorization": f"Bearer {token.access_token}"},
        timeout=10,
    )
    assert echo.json()["user"] == "resource-owner"


def test_pkce_is_enforced_by_the_server_and_verifier_is_single_use(auth_server, staff_client):
    auth_server.app("client-basic")
    datasource = make_datasource(auth_server)
    params = authorize_via_provider(auth_server, start(staff_client, datasource))
    pending = AuthorizationRequest.objects.get()
    assert pending.code_verifier  # stored encrypted until used
    staff_client.get(CALLBACK_PATH, params)
    pending.refresh_from_db()
    assert pending.used_at is not None
    assert pending.code_verifier is None


def test_forged_state_is_rejected_and_changes_nothing(auth_server, staff_client):
    auth_server.app("client-basic")
    datasource = make_datasource(auth_server)
    params = authorize_via_provider(auth_server, start(staff_client, datasource))
    response = staff_client.get(CALLBACK_PATH, {**params, "state": "forged"})
    assert response.status_code == 400
    assert "unknown state" in response.content.decode()
    assert Token.objects.get(datasource=datasource).status == TokenStatus.NOT_AUTHORIZED


def test_missing_state_is_rejected(staff_client):
    response = staff_client.get(CALLBACK_PATH, {"code": "abc"})
    assert response.status_code == 400
    assert "no state" in response.content.decode()


def test_replayed_callback_is_rejected(auth_server, staff_client):
    auth_server.app("client-basic")
    datasource = make_datasource(auth_server)
    params = authorize_via_provider(auth_server, start(staff_client, datasource))
    assert staff_client.get(CALLBACK_PATH, params).status_code == 302
    first = Token.objects.get(datasource=datasource).access_token
    replay = staff_client.get(CALLBACK_PATH, params)
    assert replay.status_code == 400
    assert "already used" in replay.content.decode()
    assert Token.objects.get(datasource=datasource).access_token == first


def test_expired_state_is_rejected(auth_server, staff_client):
    auth_server.app("client-basic")
    datasource = make_datasource(auth_server)
    params = authorize_via_provider(auth_server, start(staff_client, datasource))
    AuthorizationRequest.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    response = staff_client.get(CALLBACK_PATH, params)
    assert response.status_code == 400
    assert "expired" in response.content.decode()
    assert Token.objects.get(datasource=datasource).status == TokenStatus.NOT_AUTHORIZED


def test_state_from_another_session_is_rejected(auth_server, staff_client, django_user_model):
    auth_server.app("client-basic")
    datasource = make_datasource(auth_server)
    params = authorize_via_provider(auth_server, start(staff_client, datasource))
    attacker = Client()
    attacker.force_login(staff_client.user)  # same user, different browser session
    response = attacker.get(CALLBACK_PATH, params)
    assert response.status_code == 400
    assert "different browser session" in response.content.decode()
    assert Token.objects.get(datasource=datasource).status == TokenStatus.NOT_AUTHORIZED
    # The legitimate session can still finish: the attempt did not burn the state.
    assert staff_client.get(CALLBACK_PATH, params).status_code == 302


def test_issuer_mismatch_is_rejected(auth_server, staff_client):
    auth_server.app("client-basic")
    datasource = make_datasource(auth_server, issuer="https://issuer.example.com")
    params = authorize_via_provider(auth_server, start(staff_client, datasource))
    response = staff_client.get(CALLBACK_PATH, {**params, "iss": "https://evil.example.com"})
    assert response.status_code == 400
    assert "unexpected issuer" in response.content.decode()
    assert Token.objects.get(datasource=datasource).status == TokenStatus.NOT_AUTHORIZED


def test_matching_issuer_is_accepted(auth_server, staff_client):
    auth_server.app("client-basic")
    datasource = make_datasource(auth_server, issuer="https://issuer.example.com")
    params = authorize_via_provider(auth_server, start(staff_client, datasource))
    response = staff_client.get(CALLBACK_PATH, {**params, "iss": "https://issuer.example.com"})
    assert response.status_code == 302
    assert Token.objects.get(datasource=datasource).status == TokenStatus.ACTIVE


@pytest.mark.parametrize(("returns_iss", "expected"), [(True, 400), (False, 302)])
def test_missing_iss_depends_on_whether_the_server_returns_it(
    auth_server, staff_client, returns_iss, expected
):
    auth_server.app("client-basic")
    datasource = make_datasource(
        auth_server, issuer="https://issuer.example.com", issuer_returns_iss=returns_iss
    )
    params = authorize_via_provider(auth_server, start(staff_client, datasource))
    assert "iss" not in params  # django-oauth-toolkit does not send RFC 9207 iss
    assert staff_client.get(CALLBACK_PATH, params).status_code == expected


def test_provider_error_is_explained_and_token_untouched(auth_server, staff_client):
    auth_server.app("client-basic")
    datasource = make_datasource(auth_server)
    Token.objects.filter(datasource=datasource).update(
        access_token="kept", refresh_token="kept-rt", status="active"
    )
    provider_url = start(staff_client, datasource)
    state = parse_qs(urlsplit(provider_url).query)["state"][0]
    response = staff_client.get(
        CALLBACK_PATH,
        {"error": "access_denied", "error_description": "The user said no", "state": state},
        follow=True,
    )
    html = response.content.decode()
    assert "Access was denied at the provider" in html
    assert "The user said no" in html
    token = Token.objects.get(datasource=datasource)
    assert (token.access_token, token.refresh_token) == ("kept", "kept-rt")


def test_token_endpoint_down_is_a_clear_message(auth_server, staff_client):
    auth_server.app("client-basic")
    datasource = make_datasource(auth_server)
    params = authorize_via_provider(auth_server, start(staff_client, datasource))
    datasource.access_token_url = "http://127.0.0.1:9/o/token/"  # discard port: refused
    datasource.save()
    response = staff_client.get(CALLBACK_PATH, params, follow=True)
    html = response.content.decode()
    assert "Authorization failed" in html
    assert "127.0.0.1" in html
    assert params["code"] not in html
    assert Token.objects.get(datasource=datasource).status == TokenStatus.NOT_AUTHORIZED


def test_wrong_client_secret_is_reported_without_body(auth_server, staff_client):
    auth_server.app("client-basic")
    datasource = make_datasource(auth_server, client_secret="wrong-secret-value")
    params = authorize_via_provider(auth_server, start(staff_client, datasource))
    html = staff_client.get(CALLBACK_PATH, params, follow=True).content.decode()
    assert "invalid_client" in html
    assert "wrong-secret-value" not in html


def test_custom_params_audience_and_resource_reach_the_authorize_url(auth_server, staff_client):
    datasource = make_datasource(
        auth_server,
        custom_auth_params={"access_type": "offline", "prompt": "consent"},
        audience="https://api.example.com",
        resource="https://api.example.com/v1",
        use_pkce=False,
    )
    query = parse_qs(urlsplit(start(staff_client, datasource)).query)
    assert query["access_type"] == ["offline"]
    assert query["prompt"] == ["consent"]
    assert query["audience"] == ["https://api.example.com"]
    assert query["resource"] == ["https://api.example.com/v1"]
    assert "code_challenge" not in query
    assert len(query["state"][0]) >= 32


def test_start_requires_change_permission(auth_server, client, django_user_model):
    datasource = make_datasource(auth_server)
    viewer = django_user_model.objects.create_user("viewer", password="x", is_staff=True)
    client.force_login(viewer)
    response = client.get(f"/admin/datasources/datasource/{datasource.pk}/authorize/")
    assert response.status_code == 403
    assert not AuthorizationRequest.objects.exists()


def test_pending_requests_are_bounded_per_session(auth_server, staff_client, settings):
    settings.DATASOURCES = {**settings.DATASOURCES, "MAX_PENDING_AUTHORIZATIONS": 3}
    datasource = make_datasource(auth_server)
    for _ in range(6):
        start(staff_client, datasource)
    assert AuthorizationRequest.objects.filter(used_at__isnull=True).count() == 3


def test_disconnect_revokes_at_the_provider_and_forgets_tokens(auth_server, staff_client):
    import requests

    auth_server.app("client-basic")
    datasource = make_datasource(auth_server, revocation_url=auth_server.revoke_url)
    params = authorize_via_provider(auth_server, start(staff_client, datasource))
    staff_client.get(CALLBACK_PATH, params)
    token = Token.objects.get(datasource=datasource)
    access = token.access_token
    response = staff_client.post(
        f"/admin/datasources/datasource/{datasource.pk}/disconnect/", follow=True
    )
    assert "was disconnected and its tokens revoked at the provider" in response.content.decode()
    token.refresh_from_db()
    assert token.status == TokenStatus.NOT_AUTHORIZED
    assert token.access_token is None and token.refresh_token is None
    echo = requests.get(
        f"{auth_server.base}/upstream/me", headers={"Authorization": f"Bearer {access}"}, timeout=10
    )
    assert echo.status_code == 401  # revoked at the provider
    assert TokenEvent.objects.filter(datasource=datasource, kind="revoked").exists()
