"""The DPoP options in the admin, clicked in chromium against panva's oidc-provider (DPoP nonces
required): turn DPoP on, Save and authorize, Regenerate DPoP key, Test a call; every outcome
asserted at the server (proofs, binding to the key thumbprint) and on the page."""

from __future__ import annotations

import json
import re

import pytest

from datasources.models import Datasource, Token

from .conftest import CALLBACK_PATH
from .oidcprovider import TEST_USER, start_oidc_provider
from .test_admin_browser import log_in, message, shot

SECRET = "dpop-browser-secret-0123456789-abcdef"

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


@pytest.fixture(scope="module")
def op_config(live_server):
    return {
        "clients": [
            {
                "client_id": "dpop-admin",
                "client_secret": SECRET,
                "redirect_uris": [f"{live_server.url}{CALLBACK_PATH}"],
                "grant_types": ["authorization_code", "refresh_token"],
                "response_types": ["code"],
                "scope": "openid offline_access api",
                "dpop_bound_access_tokens": True,
            }
        ],
        "features": {"dpop": {"enabled": True, "requireNonce": True}},
    }


def bound_to(op, access_token: str) -> str | None:
    answer = op.introspect(access_token, client_id="dpop-admin", secret=SECRET)
    return (answer.get("cnf") or {}).get("jkt")


def test_dpop_switch_regenerate_and_test_call(live_server, op, page, expect, builder):
    base = live_server.url
    log_in(page, base)
    page.goto(f"{base}/admin/datasources/datasource/add/")
    page.fill("#id_name", "DPoP API")
    page.fill("#id_base_url", f"{op.issuer}/")
    page.fill("#id_authorization_url", op.authorization_url)
    page.fill("#id_access_token_url", op.token_url)
    page.fill("#id_client_id", "dpop-admin")
    page.fill("#id_client_secret", SECRET)
    page.fill("#id_scopes", "openid offline_access")
    page.locator("summary", has_text="Sender-constrained tokens").click()
    page.check("#id_use_dpop")
    page.click("input[name=_authorize]")  # Save and authorize: the provider consents at once
    message(page, expect, "is authorized and active")

    datasource = Datasource.objects.get(slug="dpop-api")
    token = datasource.token
    assert token.token_type == "DPoP"
    assert bound_to(op, token.access_token) == datasource.dpop_jkt
    exchanges = [e for e in op.requests("token") if e["grant_type"] == "authorization_code"]
    assert [e["status"] for e in exchanges] == [400, 200] and all(e["dpop"] for e in exchanges)

    # The page shows the public key's thumbprint and the token type, never the private key.
    page.locator("summary", has_text="Sender-constrained tokens").click()
    expect(page.locator(".datasource-dpop-jkt")).to_have_text(datasource.dpop_jkt)
    assert "PRIVATE KEY" not in page.content()
    shot(page, "datasource-dpop")

    # Regenerate: a new key, its thumbprint in the message and on the page.
    page.click("button.datasource-dpop-regenerate")
    message(page, expect, "has a new DPoP key")
    datasource.refresh_from_db()
    assert datasource.dpop_jkt not in ("", bound_to(op, token.access_token))
    expect(page.locator("ul.messagelist")).to_contain_text(datasource.dpop_jkt)
    page.locator("summary", has_text="Sender-constrained tokens").click()
    expect(page.locator(".datasource-dpop-jkt")).to_have_text(datasource.dpop_jkt)

    # Test a call: the token bound to the old key is replaced first (a refresh with a proof of
    # the new key), then userinfo accepts the call.
    op.reset()
    page.click("a.datasource-test-link")
    page.fill("#id_path", "me")
    page.click("input.datasource-run-test")
    expect(page.locator(".datasource-test-status")).to_contain_text("200")
    assert re.search(rf'"sub":\s*"{TEST_USER}"', page.inner_text(".datasource-test-body"))
    refreshes = [e for e in op.requests("token") if e["grant_type"] == "refresh_token"]
    assert [e["status"] for e in refreshes] == [200] and refreshes[0]["dpop"]
    now = Token.objects.get(pk=token.pk)
    assert now.access_token != token.access_token
    assert bound_to(op, now.access_token) == datasource.dpop_jkt
    assert [e["authorization_scheme"] for e in op.requests("userinfo")][-1] == "DPoP"


# --- mutual TLS: the form follows the choice; token on save; Test a call ----------------------


@pytest.fixture
def mtls(tmp_path):
    from .test_mtls_oidc import make_pki, provider_config

    pki = make_pki()
    with start_oidc_provider(provider_config(pki, tmp_path)) as provider:
        yield provider, pki


def test_mutual_tls_in_the_form_token_on_save_and_test_call(
    live_server, mtls, page, expect, builder
):
    op, pki = mtls
    base = live_server.url
    log_in(page, base)
    page.goto(f"{base}/admin/datasources/datasource/add/")
    page.select_option("#id_grant_type", "client_credentials")
    page.fill("#id_name", "mTLS API")
    page.fill("#id_base_url", f"{op.issuer}/_test/")
    page.fill("#id_access_token_url", op.token_url)
    page.fill("#id_client_id", "mtls-svc")
    page.fill("#id_scopes", "api")
    section = page.locator("details", has=page.locator("#id_tls_client_certificate"))
    assert section.get_attribute("open") is None  # folded until mutual TLS is chosen
    page.select_option("#id_client_authentication", "self_signed_tls_client_auth")
    expect(page.locator("#id_tls_client_certificate")).to_be_visible()  # the section opened
    expect(page.locator(".field-client_secret")).to_be_hidden()  # not used with mutual TLS
    page.fill("#id_tls_client_certificate", pki["svc"].cert_pem)
    page.fill("#id_tls_client_key", pki["svc"].key_pem)
    page.check("#id_certificate_bound_tokens")
    page.fill("#id_tls_ca_bundle", pki["ca"].cert_pem)
    page.click("input[name=_continue]")
    message(page, expect, "got an access token")

    datasource = Datasource.objects.get(slug="mtls-api")
    assert datasource.tls_client_key == pki["svc"].key_pem.strip()
    (fetch,) = op.requests("token")
    assert fetch["status"] == 200 and fetch["client_auth"] == "self_signed_tls_client_auth"
    # Write-only: the page names the certificate, never shows the key (or the certificate).
    content = page.content()
    assert "CN=mtls-svc" in content and pki["svc"].thumbprint in content
    assert pki["svc"].key_pem.splitlines()[1] not in content
    assert pki["svc"].cert_pem.splitlines()[1] not in content
    shot(page, "datasource-mutual-tls")

    page.click("a.datasource-test-link")
    page.fill("#id_path", "resource")
    page.click("input.datasource-run-test")
    expect(page.locator(".datasource-test-status")).to_contain_text("200")
    assert json.loads(page.inner_text(".datasource-test-body"))["client_id"] == "mtls-svc"
