"""One real-browser run of the whole builder journey (Playwright driving Debian's chromium)."""

import pytest

from datasources.models import Datasource, TokenStatus

from .browser import ARTIFACTS, chromium_page, playwright_api
from .conftest import CALLBACK_PATH

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def browser_page(monkeypatch):
    with chromium_page(playwright_api(), monkeypatch) as page:
        yield page


def test_builder_creates_authorizes_and_sees_active(auth_server, browser_page, django_user_model):
    django_user_model.objects.create_superuser("builder", "b@example.com", "builder-pass-1")
    auth_server.app("client-browser", skip_authorization=False)
    base = auth_server.base
    page = browser_page

    page.goto(f"{base}/admin/login/")
    page.fill("#id_username", "builder")
    page.fill("#id_password", "builder-pass-1")
    page.click("input[type=submit]")
    page.wait_for_url(f"{base}/admin/")

    page.goto(f"{base}/admin/datasources/datasource/add/")
    page.fill("#id_name", "Provider API")
    page.fill("#id_base_url", f"{base}/upstream/")
    page.select_option("#id_grant_type", "authorization_code")
    page.fill("#id_authorization_url", auth_server.authorize_url)
    page.fill("#id_access_token_url", auth_server.token_url)
    page.fill("#id_client_id", "client-browser")
    page.fill("#id_client_secret", "s3cret-" + "x" * 20)
    page.fill("#id_scopes", "read, write")
    page.click("input[name=_continue]")
    page.wait_for_selector(".datasource-callback-url")
    assert page.inner_text(".datasource-callback-url") == f"{base}{CALLBACK_PATH}"
    assert "s3cret-" not in page.content()

    page.click("a.datasource-authorize")
    # A different host: the provider has its own session, so the resource owner logs in there.
    page.wait_for_selector("#provider-login")
    page.fill("#id_username", "resource-owner")
    page.fill("#id_password", auth_server.password)
    page.click("#provider-login button[type=submit]")
    page.wait_for_selector("input[name=allow]")
    page.click("input[name=allow]")

    page.wait_for_selector(".datasource-status-active")
    assert "is authorized and active" in page.content()
    datasource = Datasource.objects.get(slug="provider-api")
    assert datasource.token.status == TokenStatus.ACTIVE
    assert datasource.token.refresh_token
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "authorized-datasource.png"), full_page=True)
    assert (ARTIFACTS / "authorized-datasource.png").stat().st_size > 10_000
