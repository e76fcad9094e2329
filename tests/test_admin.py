"""The admin is the builder's UI: write-only secret, status, callback URL, warnings."""

import re

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


# --- issue 13: the builder's admin ------------------------------------------------------------


def test_static_files_are_served_with_debug_off(client, settings):
    """WhiteNoise serves the admin's CSS without collectstatic or a web server in front."""
    assert not settings.DEBUG
    response = client.get("/static/admin/css/base.css")
    assert response.status_code == 200
    assert b"".join(response.streaming_content).startswith(b"/*")
    assert client.get("/static/datasources/datasource_form.js").status_code == 200


def test_root_url_redirects_to_the_admin(client):
    response = client.get("/")
    assert response.status_code == 302 and response["Location"] == "/admin/"


def test_secure_cookie_check_warns_only_when_it_will_bite(settings):
    from datasources.checks import check_secure_cookies

    settings.DEBUG = False
    settings.SESSION_COOKIE_SECURE = settings.CSRF_COOKIE_SECURE = True
    settings.SECURE_PROXY_SSL_HEADER = None
    [warning] = check_secure_cookies()
    assert warning.id == "datasources.W010" and "CSRF cookie not set" in warning.msg
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    assert check_secure_cookies() == []
    settings.SECURE_PROXY_SSL_HEADER = None
    settings.DEBUG = True
    assert check_secure_cookies() == []


def test_data_dir_comes_from_the_env_file_and_importing_settings_creates_nothing(tmp_path):
    import subprocess
    import sys

    from .helpers import ROOT

    data_dir = tmp_path / "data-from-env-file"
    env_file = tmp_path / ".env"
    env_file.write_text(f"DATA_DIR={data_dir}\nSECRET_KEY=x\nFERNET_KEYS=x\n")
    env = {
        "PATH": "/usr/bin:/bin",
        "ENV_FILE": str(env_file),
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "PYTHONPATH": str(ROOT),
    }
    code = "from django.conf import settings; print(settings.DATA_DIR, settings.DATABASES['default']['NAME'])"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == [str(data_dir), str(data_dir / "db.sqlite3")]
    assert not data_dir.exists()  # the entry points create it, not the import
    subprocess.run(
        [sys.executable, "manage.py", "check"], env=env, cwd=ROOT, capture_output=True, check=True
    )
    assert (data_dir / "broker" / "in").is_dir() and (data_dir / "static").is_dir()


def test_ensure_admin_asks_for_an_email(django_user_model):
    from io import StringIO

    from django.core.management import call_command

    out = StringIO()
    call_command("ensure_admin", stdout=out)
    assert "has no email address" in out.getvalue()
    django_user_model.objects.all().delete()
    out = StringIO()
    call_command("ensure_admin", "--email", "me@example.com", stdout=out)
    assert "has no email address" not in out.getvalue()
    assert django_user_model.objects.get().email == "me@example.com"


def test_preset_json_is_an_object_in_the_form(staff_client):
    html = staff_client.get("/admin/datasources/datasource/add/?preset=google").content.decode()
    assert "&quot;access_type&quot;: &quot;offline&quot;" in html
    assert "\\&quot;" not in html  # not a JSON string holding JSON


def test_placeholders_are_refused_by_name_and_the_typed_secret_is_kept(staff_client):
    template = Datasource(
        name="Okta",
        slug="okta",
        base_url="https://{tenant}.okta.com/api/v1/",
        grant_type="authorization_code",
        authorization_url="https://{tenant}.okta.com/oauth2/default/v1/authorize",
        access_token_url="https://acme.okta.com/oauth2/default/v1/token",
        client_id="cid",
        scopes="",
        client_authentication="basic",
        token_placement="header",
        header_prefix="Bearer",
        query_param_name="access_token",
    )
    add = reverse("admin:datasources_datasource_add")
    response = staff_client.post(add, form_data(template, client_secret="typed-secret-1"))
    html = response.content.decode()
    assert response.status_code == 200
    assert html.count("Replace the placeholder {tenant}") == 2
    assert "Enter a valid URL" not in html
    assert "needs an authorization URL" not in html
    assert "typed-secret-1" not in html and "kept for this form" in html
    hold = re.search(r'name="secret_hold" value="([^"]+)"', html).group(1)
    session_blob = str(dict(staff_client.session))
    assert "typed-secret-1" not in session_blob  # held encrypted
    fixed = form_data(
        template,
        base_url="https://acme.okta.com/api/v1/",
        authorization_url="https://acme.okta.com/oauth2/default/v1/authorize",
        secret_hold=hold,
    )
    assert staff_client.post(add, fixed).status_code == 302
    assert Datasource.objects.get(slug="okta").client_secret == "typed-secret-1"
    assert (
        "datasources_typed_secrets" not in staff_client.session
        or not staff_client.session["datasources_typed_secrets"]
    )


def test_another_sessions_hold_reference_is_useless(staff_client, client, django_user_model):
    datasource = make_datasource()
    response = staff_client.post(
        change_url(datasource), form_data(datasource, client_secret="s-1", base_url="bad")
    )
    hold = re.search(r'name="secret_hold" value="([^"]+)"', response.content.decode()).group(1)
    other = django_user_model.objects.create_superuser("other", "o@example.com", "x")
    client.force_login(other)
    client.post(change_url(datasource), form_data(datasource, secret_hold=hold, name="Other"))
    datasource.refresh_from_db()
    assert datasource.client_secret == SECRET  # nothing held in that session


def test_sorting_by_token_columns_lists_each_datasource_once(staff_client, django_user_model):
    per_user = make_datasource(slug="per-user", token_sharing="per_user")
    make_datasource(slug="shared", name="Shared")
    for name in ("a", "b", "c"):
        user = django_user_model.objects.create_user(name)
        Token.objects.create(datasource=per_user, user=user, status="active")
    url = reverse("admin:datasources_datasource_changelist")
    for column in range(1, 9):
        for order in (str(column), f"-{column}"):
            response = staff_client.get(url, {"o": order})
            assert response.status_code == 200
            assert [ds.slug for ds in response.context["cl"].result_list].count("per-user") == 1
    assert staff_client.get(url, {"status": "active"}).context["cl"].result_count == 0
    assert staff_client.get(url, {"status": "per_user"}).context["cl"].result_count == 1


def test_bulk_refresh_enqueues_tasks_and_reports(staff_client, monkeypatch):
    from datasources import tasks

    datasource = make_datasource()
    Token.objects.filter(datasource=datasource).update(status="active", access_token="a")
    sent = []
    monkeypatch.setattr(
        tasks.refresh_now, "apply_async", lambda args, **kw: sent.append(args), raising=False
    )
    response = staff_client.post(
        reverse("admin:datasources_datasource_changelist"),
        {"action": "refresh_selected", "_selected_action": [datasource.pk]},
        follow=True,
    )
    assert sent == [(datasource.token.pk,)]
    assert "Queued 1 token refresh" in response.content.decode()


def test_bulk_refresh_with_the_broker_down_says_so(staff_client, monkeypatch):
    from kombu.exceptions import OperationalError

    from datasources import tasks

    datasource = make_datasource()
    Token.objects.filter(datasource=datasource).update(status="active", access_token="a")

    def refused(*args, **kwargs):
        raise OperationalError("[Errno 111] Connection refused")

    monkeypatch.setattr(tasks.refresh_now, "apply_async", refused, raising=False)
    response = staff_client.post(
        reverse("admin:datasources_datasource_changelist"),
        {"action": "refresh_selected", "_selected_action": [datasource.pk]},
        follow=True,
    )
    assert response.status_code == 200
    assert "task queue is unreachable" in response.content.decode()


def test_revocation_payload_is_encrypted(staff_client):
    from datasources.admin.jobs import revocation_payload

    datasource = make_datasource(revocation_url="https://api.example.com/revoke")
    Token.objects.filter(datasource=datasource).update(
        access_token="plain-access-token", refresh_token="plain-refresh-token", status="active"
    )
    payload = revocation_payload(datasource)
    for secret in ("plain-access-token", "plain-refresh-token", SECRET):
        assert secret not in payload


def test_usage_buckets_from_snapshots():
    from datetime import timedelta

    from django.utils import timezone

    from datasources.admin.dashboard import hourly
    from datasources.models import DatasourceUsage, UsageSample

    now = timezone.now().replace(minute=30)
    datasource = make_datasource()
    points = [(25, 5, 0, 50), (3, 10, 0, 100), (2, 40, 2, 700), (1, 30, 1, 300)]
    samples = [
        UsageSample(
            datasource=datasource,
            taken_at=now - timedelta(hours=h),
            calls=c,
            errors=e,
            total_duration_ms=d,
        )
        for h, c, e, d in points
    ]
    live = DatasourceUsage(datasource=datasource, calls=34, errors=1, total_duration_ms=380)
    usage = hourly(samples, live, now)
    assert [b.calls for b in usage.buckets[-4:]] == [5, 30, 30, 4]  # 30: counters were reset
    assert usage.calls == 69 and usage.errors == 3
    assert usage.buckets[-3].average_ms == 600 / 30


def test_plain_explanations():
    from datasources.admin.explain import explain

    assert "Re-authorize" in explain("invalid_grant: grant request is invalid")
    assert "client ID or client secret" in explain("invalid_client: bad secret")
    assert "Scope(s)" in explain("Configuration error: invalid_scope: nope")
    assert "having trouble" in explain("The authorization server answered HTTP 503.")
    # OpenID Connect's "a person is needed" answers, and Entra's words for them
    mfa = "invalid_grant: AADSTS50076: you must use multi-factor authentication to access"
    assert "multi-factor" in explain(mfa)
    assert "multi-factor" in explain("interaction_required: AADSTS50079: enroll in MFA")
    assert "consent" in explain("invalid_grant: AADSTS65001: The user has not consented")
    assert "consent" in explain("consent_required")
    for code in ("interaction_required", "login_required", "account_selection_required"):
        assert "sign in again" in explain(f"{code}: the provider needs the user"), code
    assert explain("something new") == ""


@pytest.mark.django_db(transaction=True)  # the token is fetched once the save is committed
def test_client_credentials_token_is_fetched_on_save_with_a_message(
    staff_client, fake_token_endpoint
):
    fake_token_endpoint.queue(
        (200, '{"access_token": "cc-token", "token_type": "Bearer", "expires_in": 3600}', None)
    )
    template = Datasource(
        name="Machine",
        slug="machine",
        base_url="https://api.example.com/",
        grant_type="client_credentials",
        access_token_url="https://auth.example.com/token",
        client_id="cid",
        client_authentication="basic",
        token_placement="header",
        header_prefix="Bearer",
        query_param_name="access_token",
    )
    response = staff_client.post(
        reverse("admin:datasources_datasource_add"),
        form_data(template, client_secret="cc-secret"),
        follow=True,
    )
    assert "got an access token" in response.content.decode()
    assert len(fake_token_endpoint.calls) == 1
    assert Datasource.objects.get(slug="machine").token.status == "active"


def test_per_user_page_has_no_shared_authorize_button(staff_client):
    datasource = make_datasource(token_sharing="per_user")
    html = staff_client.get(change_url(datasource)).content.decode()
    assert "datasource-banner-per-user" in html
    assert "Authorize again" not in html and 'class="datasource-authorize"' not in html


def test_redirect_uri_warnings(staff_client, settings):
    from datetime import timedelta

    from django.utils import timezone

    from datasources.models import AuthorizationRequest

    datasource = make_datasource()
    AuthorizationRequest.objects.create(
        datasource=datasource,
        state_hash="x" * 64,
        session_binding_hash="y" * 64,
        redirect_uri="http://localhost:8000/api/v1/datasources/authorize",
        expires_at=timezone.now() + timedelta(minutes=5),
        used_at=timezone.now(),
    )
    html = staff_client.get(change_url(datasource)).content.decode()
    assert "The last authorization of this datasource used http://localhost:8000" in html
    settings.DATASOURCES = {"PUBLIC_BASE_URL": "https://ds.example.com"}
    html = staff_client.get(change_url(datasource)).content.decode()
    assert "open the admin at https://ds.example.com/admin/" in html


def test_refresh_and_disconnect_views_refuse_other_methods(staff_client):
    datasource = make_datasource()
    assert staff_client.get(f"{change_url(datasource)[:-7]}refresh/").status_code == 405
    confirm = staff_client.get(f"{change_url(datasource)[:-7]}disconnect/")
    assert confirm.status_code == 200 and "Yes, disconnect" in confirm.content.decode()


def test_usage_samples_are_taken_and_pruned():
    from datetime import timedelta

    from django.utils import timezone

    from datasources.models import DatasourceUsage, UsageSample
    from datasources.tasks import sample_usage

    datasource = make_datasource()
    DatasourceUsage.objects.create(datasource=datasource, calls=7, errors=1, total_duration_ms=70)
    old = UsageSample.objects.create(
        datasource=datasource, taken_at=timezone.now() - timedelta(days=3)
    )
    assert sample_usage() == 1
    sample = UsageSample.objects.get()
    assert sample.pk != old.pk and (sample.calls, sample.errors) == (7, 1)
