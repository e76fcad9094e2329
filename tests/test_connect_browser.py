"""Issue 31, in a real Chromium against panva's oidc-provider: two end users of an application
connect their own accounts through connect links, and the proxy calls as each of them.

The application is played by a local server (the spy upstream) that the return URL points at.
Every page the end user sees is opened and clicked: the connect page (its Connect button), the
provider's login and consent (automatic in the harness), the way back to the application, a
link opened again (back with ``error=used``) and a link that is not one of ours (a plain page).
Screenshots of the connect page land in artifacts/.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from datasources.models import Datasource, Token
from datasources.proxy.apikeys import create_api_key

from .conftest import CALLBACK_PATH
from .test_admin_browser import log_in, message, shot

SECRET = "connect-browser-secret-0123456789-abcdef"

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


@pytest.fixture(scope="module")
def op_config(live_server):
    return {
        "clients": [
            {
                "client_id": "saas",
                "client_secret": SECRET,
                "redirect_uris": [f"{live_server.url}{CALLBACK_PATH}"],
                "grant_types": ["authorization_code", "refresh_token"],
                "response_types": ["code"],
                "scope": "openid offline_access api",
            }
        ],
    }


@pytest.fixture
def datasource(op, spy) -> Datasource:
    return Datasource.objects.create(
        name="Acme CRM",
        slug="acme",
        base_url=f"{op.issuer}/_test/resource/",
        authorization_url=op.authorization_url,
        access_token_url=op.token_url,
        issuer=op.issuer,
        client_id="saas",
        client_secret=SECRET,
        client_authentication="basic",
        scopes="openid offline_access",
        allowed_return_urls=f"{spy.base}/app/",
    )


def connect_link(base: str, key: str, end_user: str, return_url: str, name: str) -> dict:
    created = requests.post(
        f"{base}/api/v1/connect/sessions",
        headers={"Authorization": f"Api-Key {key}"},
        json={
            "datasource": "acme",
            "end_user": end_user,
            "return_url": return_url,
            "display_name": name,
        },
        timeout=10,
    )
    assert created.status_code == 201, created.text
    return created.json()


def test_two_end_users_connect_and_the_proxy_calls_as_each(
    live_server, op, spy, datasource, page, expect
):
    base = live_server.url
    _, key = create_api_key("acme-saas", datasources=[datasource], permissions=["connect", "proxy"])
    return_url = f"{spy.base}/app/settings?tab=integrations"
    sessions = {}
    for end_user, account, name in (("u-ada", "ada", "Ada"), ("u-bob", "bob", "Bob")):
        op.sign_in_as(account)
        session = connect_link(base, key, end_user, return_url, name)
        page.context.clear_cookies()  # another person, another browser session
        page.goto(session["connect_url"])
        expect(page.locator("h1.connect-datasource")).to_have_text("Acme CRM")
        expect(page.locator(".connect-end-user")).to_have_text(name)
        shot(page, f"connect-page-{end_user}")
        page.click("button.connect-button")
        page.wait_for_url(re.compile(re.escape(f"{spy.base}/app/settings") + r"\?.*"))
        back = parse_qs(urlsplit(page.url).query)
        assert back == {
            "tab": ["integrations"],
            "connect": ["success"],
            "session": [session["session"]],
        }
        assert "code" not in back and "access_token" not in page.url
        sessions[end_user] = session

    ada = Token.objects.get(datasource=datasource, end_user="u-ada")
    bob = Token.objects.get(datasource=datasource, end_user="u-bob")
    assert ada.identity == f"{op.issuer} ada" and bob.identity == f"{op.issuer} bob"
    assert ada.access_token != bob.access_token

    # The proxy calls as each end user: the resource server names whose token it got.
    for end_user, account in (("u-ada", "ada"), ("u-bob", "bob")):
        answer = requests.get(
            f"{base}/api/v1/datasources/acme/proxy/whoami",
            headers={"Authorization": f"Api-Key {key}", "X-Datasource-End-User": end_user},
            timeout=10,
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["sub"] == account

    # The link again: back to the application with error=used; nothing changes.
    page.goto(sessions["u-ada"]["connect_url"])
    page.wait_for_url(re.compile(re.escape(f"{spy.base}/app/settings") + r"\?.*"))
    assert parse_qs(urlsplit(page.url).query)["error"] == ["used"]
    assert Token.objects.get(pk=ada.pk).access_token == ada.access_token

    # A link that is not one of ours: a plain page, no redirect anywhere.
    page.goto(f"{base}/connect/forged-link-0123456789")
    expect(page.locator("h1")).to_have_text("This link does not work")
    assert page.url == f"{base}/connect/forged-link-0123456789"
    shot(page, "connect-link-refused")


def test_the_admin_lists_searches_and_disconnects_end_users(
    live_server, op, datasource, page, expect, builder
):
    """The datasource page links to its end users' connections; the list is searched by end
    user and filtered by status; Disconnect (with its confirmation) revokes at the provider and
    deletes that connection only."""
    base = live_server.url
    datasource.revocation_url = op.revocation_url
    datasource.save()
    for end_user, account, status in (
        ("u-ada", "ada", "active"),
        ("u-bob", "bob", "active"),
        ("u-cy", "cy", "needs_reauthorization"),
    ):
        Token.objects.create(
            datasource=datasource,
            end_user=end_user,
            identity=f"{op.issuer} {account}",
            access_token=f"access-{end_user}",
            refresh_token=f"refresh-{end_user}",
            status=status,
        )
    log_in(page, base)
    page.goto(f"{base}/admin/datasources/datasource/{datasource.pk}/change/")
    expect(page.locator(".field-end_user_connections")).to_contain_text("3 end users connected")
    page.click("a.datasource-connections-link")
    expect(page.locator("#result_list tbody tr")).to_have_count(3)
    page.click('#changelist-filter a:has-text("Needs re-authorization")')  # status filter
    expect(page.locator("#result_list tbody tr")).to_have_count(1)
    expect(page.locator("#result_list tbody tr")).to_contain_text("u-cy")
    page.go_back()
    page.fill("#searchbar", "u-ada")
    page.press("#searchbar", "Enter")
    expect(page.locator("#result_list tbody tr")).to_have_count(1)
    expect(page.locator("#result_list tbody tr")).to_contain_text(f"{op.issuer} ada")
    shot(page, "connections-list")
    revocations = op.log()["counters"]["revocation"]
    page.click("a.datasource-disconnect-end-user")
    expect(page.locator(".datasource-end-user-disconnect")).to_contain_text("u-ada")
    page.click("input.datasource-confirm-disconnect-end-user")
    message(page, expect, "End user “u-ada” was disconnected")
    assert not Token.objects.filter(end_user="u-ada").exists()
    assert set(Token.objects.of_end_users().values_list("end_user", flat=True)) == {
        "u-bob",
        "u-cy",
    }
    assert op.log()["counters"]["revocation"] == revocations + 2  # refresh, then access token
