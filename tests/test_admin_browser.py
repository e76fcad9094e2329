"""Every button and link on the datasource pages, clicked in a real browser (Playwright driving
Debian's chromium), each with its outcome asserted: a token issued or revoked at the
authorization server (django-oauth-toolkit, counted through its ``app_authorized`` signal and
its token tables), a message shown, a record changed. Screenshots of each page go to
``artifacts/`` for review."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.utils import timezone

from datasources.models import ApiKey, Datasource, Token, TokenStatus, UsageSample

from . import browser
from .browser import ARTIFACTS, BUILDER_PASSWORD
from .conftest import CALLBACK_PATH, SECRET, make_datasource

PASSWORD = BUILDER_PASSWORD

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def token_calls():
    """Access tokens issued by the authorization server's token endpoint (success only)."""
    from oauth2_provider.signals import app_authorized

    issued: list = []

    def receiver(sender, request, token, **kwargs):
        issued.append(token.application.client_id)

    app_authorized.connect(receiver, weak=False)
    yield issued
    app_authorized.disconnect(receiver)


@pytest.fixture
def eager_celery():
    """Tasks the admin enqueues run at once, in the live server's thread."""
    from config.celery import app

    before = app.conf.task_always_eager
    app.conf.task_always_eager = True
    yield app
    app.conf.task_always_eager = before


def log_in(page, base: str) -> None:
    page.goto(f"{base}/admin/login/")
    page.fill("#id_username", "builder")
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    page.wait_for_url(f"{base}/admin/")


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000


def grant_at_provider(page, auth_server, *, signed_in: bool, consent: bool = True) -> None:
    """Play the resource owner at the provider (another host: its own cookies)."""
    if not signed_in:
        page.wait_for_selector("#provider-login")
        page.fill("#id_username", "resource-owner")
        page.fill("#id_password", auth_server.password)
        page.click("#provider-login button[type=submit]")
    if consent:  # apps made with skip_authorization ask nothing
        page.wait_for_selector("input[name=allow]")
        page.click("input[name=allow]")


def message(page, expect, text: str) -> None:
    expect(page.locator("ul.messagelist")).to_contain_text(text)


def access_tokens_at_provider() -> int:
    from oauth2_provider.models import AccessToken

    return AccessToken.objects.count()


# --- the authorization-code datasource: every button on its page ------------------------------


def test_change_page_buttons_and_links(
    auth_server, page, expect, builder, token_calls, eager_celery
):
    auth_server.app("client-browser", skip_authorization=False)
    base = auth_server.base
    log_in(page, base)

    # "View site" lands on the admin (the root URL redirects there), not on a 404.
    page.click("#user-tools a[href='/']")
    page.wait_for_url(f"{base}/admin/")

    # Add page: no status section, no "clear secret" box; Save and authorize.
    page.click("a[href='/admin/datasources/datasource/add/']")
    expect(page.locator("fieldset", has_text="Token status")).to_have_count(0)
    expect(page.locator("#id_clear_client_secret")).to_have_count(0)
    page.fill("#id_name", "Provider API")
    page.fill("#id_base_url", f"{base}/upstream/")
    page.fill("#id_authorization_url", auth_server.authorize_url)
    page.fill("#id_access_token_url", auth_server.token_url)
    page.fill("#id_client_id", "client-browser")
    page.fill("#id_client_secret", SECRET)
    page.fill("#id_scopes", "read, write")
    shot(page, "datasource-add")
    page.click("input[name=_authorize]")
    grant_at_provider(page, auth_server, signed_in=False)
    message(page, expect, "is authorized and active")
    expect(page.locator(".datasource-banner-healthy")).to_be_visible()
    assert token_calls == ["client-browser"]  # the code exchange
    datasource = Datasource.objects.get(slug="provider-api")
    token = datasource.token
    assert token.status == TokenStatus.ACTIVE and token.refresh_token
    assert page.inner_text(".datasource-callback-url") == f"{base}{CALLBACK_PATH}"
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.click(".datasource-redirect-uri button.datasource-copy")
    expect(page.locator(".datasource-redirect-uri button.datasource-copy")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == f"{base}{CALLBACK_PATH}"
    assert SECRET not in page.content() and token.access_token not in page.content()
    shot(page, "datasource-active")

    # Refresh now: a second token from the token endpoint, and a message.
    before = token.last_refreshed_at
    page.click("button.datasource-refresh")
    message(page, expect, "Refreshed 1 datasource.")
    assert token_calls == ["client-browser", "client-browser"]
    token.refresh_from_db()
    assert token.last_refreshed_at and token.last_refreshed_at != before

    # Test (object tools): a real call to the upstream through the proxy's code.
    page.click("a.datasource-test")
    shot(page, "datasource-test-form")
    page.fill("#id_path", "me?limit=1")
    page.click("input.datasource-run-test")
    expect(page.locator(".datasource-test-status")).to_contain_text("200")
    preview = page.inner_text(".datasource-test-body")
    assert '"path": "me"' in preview and '"limit": "1"' in preview
    assert "Bearer [redacted]" in preview and token.access_token not in page.content()
    message(page, expect, "Test call: 200 OK")
    shot(page, "datasource-test-result")
    page.click("a.datasource-back")
    page.wait_for_url(f"{base}/admin/datasources/datasource/{datasource.pk}/change/")

    # The bottom "Test a call" button leads to the same page; a path that would leave the
    # base URL is refused before anything is sent.
    page.click("a.datasource-test-link")
    page.fill("#id_path", "../admin/")
    page.click("input.datasource-run-test")
    expect(page.locator(".datasource-test-error")).to_contain_text("proxy would refuse")
    page.click(".breadcrumbs a:has-text('Provider API')")

    # Disconnect asks first; "No" changes nothing.
    page.click("a.datasource-disconnect")
    expect(page.locator(".datasource-disconnect-confirmation")).to_contain_text("no revocation URL")
    shot(page, "datasource-disconnect-confirmation")
    page.click("a.datasource-cancel")
    expect(page.locator(".datasource-banner-healthy")).to_be_visible()
    token.refresh_from_db()
    assert token.status == TokenStatus.ACTIVE

    # "Yes" forgets the tokens and says so.
    page.click("a.datasource-disconnect")
    page.click("input.datasource-confirm-disconnect")
    message(page, expect, "was disconnected")
    token.refresh_from_db()
    assert token.status == TokenStatus.NOT_AUTHORIZED and token.access_token is None
    expect(page.locator(".datasource-banner-not-authorized")).to_be_visible()
    shot(page, "datasource-not-authorized")

    # The banner's Authorize button runs the flow again (the provider remembers the sign-in).
    page.click("a.datasource-banner-authorize")
    grant_at_provider(page, auth_server, signed_in=True)
    message(page, expect, "is authorized and active")
    assert len(token_calls) == 3

    # "Authorize again" in the object tools does too.
    page.click("a.datasource-authorize")
    grant_at_provider(page, auth_server, signed_in=True)
    message(page, expect, "is authorized and active")
    assert len(token_calls) == 4

    # History lists the add.
    page.click("a.historylink")
    expect(page.locator("#change-history")).to_contain_text("Added")
    page.go_back()

    # Save (plain) keeps the secret and returns to the list with a message.
    page.fill("#id_name", "Provider API (renamed)")
    page.click("input[name=_save]")
    message(page, expect, "was changed successfully")
    datasource.refresh_from_db()
    assert datasource.name == "Provider API (renamed)" and datasource.client_secret == SECRET


def test_disconnect_and_delete_revoke_at_the_provider(
    auth_server, page, expect, builder, token_calls, eager_celery, authorize
):
    auth_server.app("client-basic")
    datasource = make_datasource(auth_server, revocation_url=auth_server.revoke_url)
    authorize(datasource)
    assert access_tokens_at_provider() == 1
    base = auth_server.base
    log_in(page, base)
    page.goto(f"{base}{datasource.get_admin_url()}")
    page.click("a.datasource-disconnect")
    expect(page.locator(".datasource-disconnect-confirmation")).to_contain_text(
        "revoked at the provider"
    )
    page.click("input.datasource-confirm-disconnect")
    message(page, expect, "its tokens revoked at the provider")
    assert access_tokens_at_provider() == 0  # revoked there, not just forgotten here

    # Delete: the revocation runs as a task after the commit (here: eagerly).
    authorize(datasource)
    assert access_tokens_at_provider() == 1
    page.goto(f"{base}{datasource.get_admin_url()}")
    page.click("a.deletelink")
    page.click("input[type=submit]")  # Django's "Yes, I'm sure"
    message(page, expect, "tokens are being revoked at the provider")
    assert not Datasource.objects.filter(pk=datasource.pk).exists()
    assert access_tokens_at_provider() == 0


# --- the form follows the builder's choices ---------------------------------------------------


def test_form_shows_only_the_fields_that_apply(auth_server, page, expect, builder):
    base = auth_server.base
    log_in(page, base)
    page.goto(f"{base}/admin/datasources/datasource/add/")
    code_only = [".field-authorization_url", ".field-token_sharing"]
    for selector in code_only:
        expect(page.locator(selector)).to_be_visible()
    expect(page.locator(".datasource-redirect-uri")).to_be_visible()
    expect(page.locator("input[name=_authorize]")).to_be_visible()
    expect(page.locator(".field-query_param_name")).to_be_hidden()
    expect(page.locator(".field-header_prefix")).to_be_visible()

    page.select_option("#id_grant_type", "client_credentials")
    for selector in [*code_only, ".field-custom_auth_params"]:
        expect(page.locator(selector)).to_be_hidden()
    expect(page.locator(".datasource-redirect-uri")).to_be_hidden()
    expect(page.locator("input[name=_authorize]")).to_be_hidden()
    # Discovery fills the token endpoint for every grant (Okta and Entra service apps).
    expect(page.locator(".field-issuer")).to_be_visible()
    expect(page.locator(".field-discover")).to_be_visible()
    shot(page, "datasource-add-client-credentials")

    page.select_option("#id_token_placement", "query")
    expect(page.locator(".field-query_param_name")).to_be_visible()
    expect(page.locator(".field-header_prefix")).to_be_hidden()

    page.select_option("#id_grant_type", "authorization_code")
    for selector in code_only:
        expect(page.locator(selector)).to_be_visible()

    # Signing-key rows follow the client authentication and the grant type.
    key_rows = [".field-private_key", ".field-generate_private_key", ".field-private_key_id"]
    for selector in [*key_rows, ".field-assertion_audience", ".field-service_account_key"]:
        expect(page.locator(selector)).to_be_hidden()
    page.select_option("#id_client_authentication", "private_key_jwt")
    for selector in [*key_rows, ".field-assertion_audience"]:
        expect(page.locator(selector)).to_be_visible()
    expect(page.locator(".field-service_account_key")).to_be_hidden()
    page.select_option("#id_client_authentication", "basic")
    page.select_option("#id_grant_type", "jwt_bearer")
    for selector in [*key_rows, ".field-service_account_key", ".field-assertion_subject"]:
        expect(page.locator(selector)).to_be_visible()
    for selector in code_only:
        expect(page.locator(selector)).to_be_hidden()
    shot(page, "datasource-add-jwt-bearer")


def test_the_page_works_without_javascript(auth_server, playwright_api, builder, monkeypatch):
    """Every field stays visible and saving works with scripts off."""
    base = auth_server.base
    with browser.chromium_page(playwright_api, monkeypatch, java_script_enabled=False) as page:
        log_in(page, base)
        page.goto(f"{base}/admin/datasources/datasource/add/")
        page.select_option("#id_grant_type", "client_credentials")
        assert page.is_visible(".field-authorization_url")
        page.fill("#id_name", "No script")
        page.fill("#id_slug", "no-script")
        page.fill("#id_base_url", "https://api.example.com/")
        page.fill("#id_access_token_url", "https://auth.example.com/token")
        page.fill("#id_client_id", "cid")
        page.click("input[name=_continue]")
        page.wait_for_selector("ul.errorlist")  # the secret is required for this grant
        assert Datasource.objects.count() == 0


# --- presets ----------------------------------------------------------------------------------


PLACEHOLDER = re.compile(r"\{[A-Za-z_][\w.-]*\}")


def test_every_preset_saves_through_the_form(auth_server, page, expect, builder):
    from datasources.admin import presets

    base = auth_server.base
    log_in(page, base)

    # A placeholder left in is refused by name, and the typed secret is kept (not shown).
    page.goto(f"{base}/admin/datasources/datasource/add/")
    page.click("a.datasource-preset:has-text('Microsoft')")
    expect(page.locator(".datasource-preset-notes")).to_contain_text("{tenant}")
    page.fill("#id_name", "Graph")
    page.fill("#id_client_id", "graph-client")
    page.fill("#id_client_secret", "graph-secret-value")
    page.click("input[name=_continue]")
    expect(page.locator(".field-authorization_url .errorlist")).to_contain_text(
        "Replace the placeholder {tenant}"
    )
    expect(page.locator(".field-client_secret")).to_contain_text("kept for this form")
    assert "graph-secret-value" not in page.content()
    shot(page, "datasource-preset-placeholder-error")
    for field in ("#id_authorization_url", "#id_access_token_url", "#id_issuer"):
        page.fill(field, page.input_value(field).replace("{tenant}", "contoso"))
    page.click("input[name=_continue]")
    message(page, expect, "was added successfully")
    graph = Datasource.objects.get(slug="graph")
    assert graph.client_secret == "graph-secret-value"  # kept across the error, never shown
    assert "contoso" in graph.authorization_url and "{" not in graph.access_token_url

    for key, preset in presets.all_presets().items():
        if key == "microsoft":
            continue
        page.goto(f"{base}/admin/datasources/datasource/add/")
        page.click(f"a.datasource-preset[href='?preset={key}']")
        page.wait_for_url(f"**/add/?preset={key}")
        page.fill("#id_name", f"Preset {key}")
        page.fill("#id_client_id", f"{key}-client")
        page.fill("#id_client_secret", f"{key}-secret")
        needs_key = (
            preset.get("grant_type") == "jwt_bearer"
            or preset["client_authentication"] == "private_key_jwt"
        )
        if needs_key:  # the key rows are shown for these presets
            page.check("#id_generate_private_key")
        # Replace {tenant}/{instance} wherever the preset put one (some in folded sections).
        page.evaluate(
            """() => document.querySelectorAll("input[type=text], input[type=url], textarea")
                 .forEach(el => { el.value = el.value.replace(/\\{[A-Za-z_][\\w.-]*\\}/g, "acme"); })"""
        )
        page.click("input[name=_continue]")
        message(page, expect, "was added successfully")
        saved = Datasource.objects.get(slug=f"preset-{key}")
        assert saved.client_secret == f"{key}-secret"
        assert saved.authorization_url == PLACEHOLDER.sub(
            "acme", preset.get("authorization_url", "")
        )
        assert saved.grant_type == preset.get("grant_type", "authorization_code")
        assert bool(saved.private_key) == needs_key
        assert saved.access_token_url == PLACEHOLDER.sub("acme", preset["access_token_url"])
        assert saved.custom_auth_params == preset.get("custom_auth_params", {})
        assert saved.scope_separator == preset["scope_separator"]
        assert saved.client_authentication == preset["client_authentication"]
    assert Datasource.objects.count() == len(presets.all_presets())


# --- client credentials: a token right after saving, Test, Get a new token ------------------


def test_client_credentials_token_after_saving_and_test_call(
    auth_server, page, expect, builder, token_calls
):
    auth_server.app("client-cc", grant="client-credentials")
    base = auth_server.base
    log_in(page, base)
    page.goto(f"{base}/admin/datasources/datasource/add/")
    page.select_option("#id_grant_type", "client_credentials")
    page.fill("#id_name", "Machine API")
    page.fill("#id_base_url", f"{base}/upstream/")
    page.fill("#id_access_token_url", auth_server.token_url)
    page.fill("#id_client_id", "client-cc")
    page.fill("#id_client_secret", SECRET)
    page.fill("#id_scopes", "read")
    page.click("input[name=_continue]")
    message(page, expect, "got an access token")
    expect(page.locator(".datasource-status-active").first).to_be_visible()
    assert token_calls == ["client-cc"]
    datasource = Datasource.objects.get(slug="machine-api")
    assert datasource.token.status == TokenStatus.ACTIVE

    page.click("button.datasource-refresh")  # "Get a new token now"
    message(page, expect, "Refreshed 1 datasource.")
    assert token_calls == ["client-cc", "client-cc"]

    page.click("a.datasource-test")
    page.fill("#id_path", "things/1")
    page.click("input.datasource-run-test")
    expect(page.locator(".datasource-test-status")).to_contain_text("200")
    assert '"application": "client-cc"' in page.inner_text(".datasource-test-body")

    # A wrong secret is found in seconds: saving it fetches a token, which fails, in plain words.
    page.goto(f"{base}{datasource.get_admin_url()}")
    page.fill("#id_client_secret", "not-the-secret")
    page.click("input[name=_continue]")
    message(page, expect, "did not accept the client ID or client secret")
    shot(page, "datasource-client-credentials-wrong-secret")


# --- signing keys: "Generate key pair", registered at a real provider ---------------------------


def test_generate_key_pair_button_and_token_with_the_registered_key(
    auth_server, page, expect, builder
):
    import json

    from datasources.security import jose

    from .oidcprovider import start_oidc_provider

    datasource = make_datasource(
        auth_server,
        slug="okta-service",
        grant_type="client_credentials",
        authorization_url="",
        client_id="svc-generated",
        client_secret=None,
        client_authentication="private_key_jwt",
        private_key=jose.private_pem(jose.generate_private_key("ES256")),
        scopes="api",
    )
    old_key = datasource.private_key
    base = auth_server.base
    log_in(page, base)
    page.goto(f"{base}{datasource.get_admin_url()}")
    expect(page.locator("button.datasource-generate-key")).to_have_text(
        "Replace with a new key pair"
    )
    page.click("button.datasource-generate-key")
    message(page, expect, "key pair (key ID")
    datasource.refresh_from_db()
    assert datasource.private_key != old_key and datasource.signing_algorithm == "RS256"
    published = json.loads(page.inner_text(".datasource-public-jwk"))
    key = jose.load_private_key(datasource.private_key)
    assert published["keys"][0] == jose.public_jwk(key, kid=datasource.private_key_id, alg="RS256")
    expect(page.locator(".datasource-certificate")).to_contain_text("BEGIN CERTIFICATE")
    assert datasource.private_key.splitlines()[1] not in page.content()
    shot(page, "datasource-generated-key-pair")

    # Register the public key shown at the provider; the next token request is accepted.
    config = {
        "clients": [
            {
                "client_id": "svc-generated",
                "token_endpoint_auth_method": "private_key_jwt",
                "jwks": published,
                "grant_types": ["client_credentials"],
                "response_types": [],
                "redirect_uris": [],
                "scope": "api",
            }
        ]
    }
    with start_oidc_provider(config) as provider:
        Datasource.objects.filter(pk=datasource.pk).update(access_token_url=provider.token_url)
        page.click("button.datasource-refresh")  # "Get a new token now"
        message(page, expect, "Refreshed 1 datasource.")
        (call,) = provider.requests("token")
        assert (call["client_auth"], call["status"]) == ("private_key_jwt", 200)
    assert datasource.token.__class__.objects.get(pk=datasource.token.pk).status == "active"


# --- banners: each problem with the one action that fixes it ---------------------------------


def test_generate_key_pair_shows_only_where_a_signing_key_is_used(
    auth_server, page, expect, builder
):
    """The button makes a signing key: a datasource that authenticates with a secret or a TLS
    certificate does not use one, so it is not offered there."""
    datasource = make_datasource(auth_server, slug="basic-auth", client_authentication="basic")
    base = auth_server.base
    log_in(page, base)
    page.goto(f"{base}{datasource.get_admin_url()}")
    button = page.locator("button.datasource-generate-key")
    expect(button).to_be_hidden()
    page.select_option("#id_client_authentication", "private_key_jwt")
    expect(button).to_be_visible()
    page.select_option("#id_client_authentication", "tls_client_auth")
    expect(button).to_be_hidden()
    page.select_option("#id_client_authentication", "basic")
    page.select_option("#id_grant_type", "jwt_bearer")
    expect(button).to_be_visible()


def test_banners_offer_the_fixing_action(
    auth_server, page, expect, builder, token_calls, authorize
):
    auth_server.app("client-basic")
    datasource = make_datasource(auth_server)
    authorize(datasource)
    base = auth_server.base
    log_in(page, base)
    rows = Token.objects.filter(datasource=datasource, user=None)

    # Transient trouble: the top says so (not just "Active"), with the next attempt.
    rows.update(
        failure_kind="transient",
        failure_count=2,
        last_error="The authorization server answered HTTP 503.",
        next_attempt_at=timezone.now() + timedelta(minutes=2),
    )
    page.goto(f"{base}{datasource.get_admin_url()}")
    banner = page.locator(".datasource-banner-transient")
    expect(banner).to_contain_text("Next automatic attempt at")
    expect(banner).to_contain_text("having trouble right now")
    expect(page.locator(".datasource-status-line")).to_contain_text("renewal failing")
    shot(page, "datasource-transient")
    calls = len(token_calls)
    banner.locator("button.datasource-banner-refresh").click()
    message(page, expect, "Refreshed 1 datasource.")
    assert len(token_calls) == calls + 1
    expect(page.locator(".datasource-banner-transient")).to_have_count(0)

    # Needs re-authorization: red, explained, with Re-authorize leading to the provider.
    rows.update(
        status=TokenStatus.NEEDS_REAUTHORIZATION,
        last_error="invalid_grant: grant request is invalid",
    )
    page.goto(f"{base}{datasource.get_admin_url()}")
    banner = page.locator(".datasource-banner-reauthorization")
    expect(banner).to_contain_text("no longer accepts the stored authorization")
    shot(page, "datasource-needs-reauthorization")
    banner.locator("a.datasource-banner-reauthorize").click()
    grant_at_provider(page, auth_server, signed_in=False, consent=False)
    message(page, expect, "is authorized and active")
    assert rows.get().status == TokenStatus.ACTIVE

    # No refresh token: when it stops working, how to get one, and Re-authorize.
    rows.update(refresh_token=None, expires_at=timezone.now() + timedelta(minutes=30))
    page.goto(f"{base}{datasource.get_admin_url()}")
    banner = page.locator(".datasource-banner-no-refresh-token")
    expect(banner).to_contain_text("stops working at")
    expect(banner.locator("a.datasource-banner-reauthorize")).to_be_visible()
    shot(page, "datasource-no-refresh-token")


def test_a_scope_refusal_banner_names_the_scope_and_reauthorize_clears_it(
    auth_server, page, expect, builder, authorize
):
    """The API refused a call for lack of scope (WWW-Authenticate insufficient_scope): the page
    names the scope, and its Re-authorize button leads to the provider and back to a page
    without the banner (the new grant is newer than the refusal)."""
    from datasources.calls import scopes

    auth_server.app("client-basic")
    datasource = make_datasource(auth_server)
    authorize(datasource)
    base = auth_server.base
    log_in(page, base)
    scopes.forget()
    challenge = {"WWW-Authenticate": 'Bearer error="insufficient_scope", scope="Mail.Read"'}
    scopes.learn(datasource, 403, challenge.get)

    page.goto(f"{base}{datasource.get_admin_url()}")
    banner = page.locator(".datasource-banner-scope-refused")
    expect(banner).to_contain_text("lacks the scope Mail.Read")
    expect(banner).to_contain_text("A refresh cannot add a scope")
    shot(page, "datasource-scope-refused")
    banner.locator("a.datasource-banner-reauthorize").click()
    grant_at_provider(page, auth_server, signed_in=False, consent=False)
    message(page, expect, "is authorized and active")
    expect(page.locator(".datasource-banner-healthy")).to_be_visible()  # the datasource page
    expect(page.locator(".datasource-banner-scope-refused")).to_have_count(0)
    scopes.forget()


def test_per_user_page_shows_the_users_not_a_shared_token(
    auth_server, page, expect, builder, django_user_model
):
    datasource = make_datasource(auth_server, token_sharing="per_user")
    for name in ("ann", "bob"):
        user = django_user_model.objects.create_user(name, password="x")
        Token.objects.create(datasource=datasource, user=user, status=TokenStatus.ACTIVE)
    base = auth_server.base
    log_in(page, base)
    page.goto(f"{base}{datasource.get_admin_url()}")
    expect(page.locator(".datasource-banner-per-user")).to_contain_text("2 users connected")
    expect(page.locator("a.datasource-authorize")).to_have_count(0)  # no shared "Authorize"
    page.click("a.datasource-connect")  # the admin connects their own account
    page.wait_for_url(re.compile(r".*/o/authorize/.*"))


# --- the list: health at a glance, sorting, bulk actions -------------------------------------


def test_list_shows_health_sorts_without_duplicates_and_bulk_actions_run(
    auth_server, page, expect, builder, token_calls, eager_celery, authorize, django_user_model
):
    auth_server.app("client-basic")
    shared = make_datasource(auth_server, name="Shared", slug="shared")
    authorize(shared)
    per_user = make_datasource(
        auth_server, name="Per user", slug="per-user", token_sharing="per_user"
    )
    for name in ("u1", "u2", "u3"):
        user = django_user_model.objects.create_user(name, password="x")
        Token.objects.create(datasource=per_user, user=user, status=TokenStatus.ACTIVE)
    now = timezone.now()
    for hours, calls, errors in ((3, 0, 0), (2, 40, 1), (1, 100, 5)):
        UsageSample.objects.create(
            datasource=shared,
            taken_at=now - timedelta(hours=hours),
            calls=calls,
            errors=errors,
            total_duration_ms=calls * 20,
        )
    base = auth_server.base
    log_in(page, base)
    page.click("a[href='/admin/datasources/datasource/']")
    rows = page.locator("#result_list tbody tr")
    expect(rows).to_have_count(2)
    shared_row = rows.filter(has_text="Shared")
    expect(shared_row.locator(".datasource-status-active")).to_be_visible()
    expect(shared_row.locator(".datasource-usage-summary")).to_contain_text(
        "100 calls, 5 errors, 20 ms average"
    )
    assert shared_row.locator("svg.usage-chart g.usage-hour").count() == 24
    shot(page, "datasource-list")

    # Sorting by status, expiry or last refresh lists each datasource once.
    for column in ("status", "expires", "last_refreshed"):
        page.click(f"th.column-{column} a")
        expect(rows).to_have_count(2)
    page.click("#changelist-filter a:has-text('Active')")
    expect(rows).to_have_count(1)
    page.click("#changelist-filter a:has-text('Per user') >> nth=-1")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("Per user")

    # Bulk refresh: queued as tasks (run eagerly here), reported at once.
    page.goto(f"{base}/admin/datasources/datasource/")
    calls = len(token_calls)
    page.check(f"input.action-select[value='{shared.pk}']")
    page.select_option("select[name=action]", "refresh_selected")
    page.click("button[name=index]")
    message(page, expect, "Queued 1 token refresh")
    assert len(token_calls) == calls + 1

    # Bulk disconnect asks first.
    page.check(f"input.action-select[value='{shared.pk}']")
    page.select_option("select[name=action]", "disconnect_selected")
    page.click("button[name=index]")
    expect(page.locator(".datasource-disconnect-confirmation")).to_contain_text("Shared")
    page.click("input.datasource-confirm-disconnect")
    message(page, expect, "Disconnected 1 datasource.")
    assert Token.objects.get(datasource=shared, user=None).status == TokenStatus.NOT_AUTHORIZED

    # The name links to the change page.
    page.click("#result_list a:has-text('Per user')")
    page.wait_for_url(f"{base}{per_user.get_admin_url()}")


# --- API keys: shown once, after a redirect, with a copy button and an example call ---------


def test_api_key_is_shown_once_with_copy_and_curl(auth_server, page, expect, builder, authorize):
    import requests

    auth_server.app("client-basic")
    datasource = make_datasource(auth_server)
    authorize(datasource)
    base = auth_server.base
    log_in(page, base)
    page.goto(f"{base}/admin/datasources/apikey/add/")
    page.fill("#id_name", "my-app")
    page.select_option("#id_datasources_from", str(datasource.pk))
    page.click("#id_datasources_add")
    expect(page.locator("#id_may_proxy")).to_be_checked()  # the default permission
    page.check("#id_may_manage")  # and the management API
    page.click("input[name=_save]")
    page.wait_for_url(re.compile(r".*/apikey/\d+/created/$"))
    key = page.inner_text("code.new-api-key")
    assert key.startswith("dsk_")
    curl = page.inner_text("pre.datasource-curl")
    assert key in curl and f"/api/v1/datasources/{datasource.slug}/proxy/" in curl
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.click("button.datasource-copy-key")
    expect(page.locator("button.datasource-copy-key")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == key
    page.click("button.datasource-copy-curl")
    assert page.evaluate("navigator.clipboard.readText()") == curl
    shot(page, "api-key-created")
    api_key = ApiKey.objects.get(name="my-app")
    assert not api_key.all_datasources  # least privilege kept
    answer = requests.get(
        f"{base}/api/v1/datasources/{datasource.slug}/proxy/me",
        headers={"Authorization": f"Api-Key {key}"},
        timeout=10,
    )
    assert answer.status_code == 200
    # The page shows a curl for each permission; the management one works as shown.
    manage = page.inner_text("pre.datasource-curl-more")
    assert key in manage and manage.endswith(f"{base}/api/v1/datasources")
    listed = requests.get(manage.split()[-1], headers={"Authorization": f"Api-Key {key}"})
    assert [item["slug"] for item in listed.json()["items"]] == [datasource.slug]
    assert api_key.permissions == {"proxy", "manage"}
    page.reload()  # the key is gone; nothing new was created
    expect(page.locator(".datasource-key-gone")).to_be_visible()
    assert key not in page.content()
    assert ApiKey.objects.count() == 1
    page.click("a.datasource-back-to-keys")
    page.wait_for_url(f"{base}/admin/datasources/apikey/")
