"""The webhook admin in a real browser: every button and link added for webhooks clicked,
its outcome asserted at the local receiver (which verifies signatures with the secret the
page showed) and in the database."""

from __future__ import annotations

import pytest

from datasources.models import DeliveryStatus, WebhookDelivery, WebhookEndpoint, WebhookEvent

from .test_admin_browser import eager_celery, log_in, message, shot  # noqa: F401
from .webhook_receiver import receiver  # noqa: F401

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_endpoint_secret_test_event_rotation_deliveries_and_retry(
    live_server,
    page,
    expect,
    builder,
    eager_celery,  # noqa: F811
    receiver,  # noqa: F811
    settings,
):
    base = live_server.url
    log_in(page, base)

    # Create: the secret is shown once, on the page the save leads to.
    page.goto(f"{base}/admin/datasources/webhookendpoint/add/")
    page.fill("#id_name", "Ops alerts")
    page.fill("#id_url", receiver.url)
    # Every event type is ticked for a new endpoint.
    assert page.locator("input[name=event_types]:checked").count() == len(WebhookEvent.values)
    page.click("input[name=_save]")
    page.wait_for_url("**/secret/")
    secret = page.locator("code.new-webhook-secret").inner_text()
    endpoint = WebhookEndpoint.objects.get()
    assert secret.startswith("whsec_") and secret == endpoint.secret
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.click("button.datasource-copy-secret")
    expect(page.locator("button.datasource-copy-secret")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == secret
    shot(page, "webhook-secret-once")
    page.reload()
    expect(page.locator(".datasource-webhook-secret-gone")).to_be_visible()
    assert secret not in page.content()
    page.click("a.datasource-back-to-endpoint")
    page.wait_for_url(f"**/webhookendpoint/{endpoint.pk}/change/")
    assert secret not in page.content()
    shot(page, "webhook-endpoint-change")

    # Send test event: delivered, signed with the secret the page showed.
    receiver.secrets = [secret]
    page.click("button.datasource-webhook-test")
    message(page, expect, "Test event queued")
    assert [r.json["type"] for r in receiver.verified()] == ["webhook.test"]
    page.click("ul.messagelist a")
    page.wait_for_url("**/webhookdelivery/*/change/")
    expect(page.locator("div.field-status")).to_contain_text("Delivered")
    expect(page.locator(".field-status_code").first).to_contain_text("204")
    shot(page, "webhook-delivery")

    # Rotate: a new secret, shown once; events carry both signatures during the grace.
    page.goto(f"{base}{endpoint.get_admin_url()}")
    page.click("button.datasource-webhook-rotate")
    page.wait_for_url("**/secret/")
    rotated = page.locator("code.new-webhook-secret").inner_text()
    assert rotated.startswith("whsec_") and rotated != secret
    expect(page.locator(".datasource-webhook-grace")).to_be_visible()
    page.click("button.datasource-copy-secret")
    assert page.evaluate("navigator.clipboard.readText()") == rotated
    page.click("a.datasource-back-to-endpoint")
    receiver.secrets = [rotated]
    page.click("button.datasource-webhook-test")
    message(page, expect, "Test event queued")
    assert len(receiver.verified()) == 2
    assert len(receiver.requests[-1].headers["webhook-signature"].split(" ")) == 2

    # A receiver that fails, one attempt allowed: gave up; "Retry now" delivers it.
    settings.DATASOURCES = {**settings.DATASOURCES, "WEBHOOK_MAX_ATTEMPTS": 1}
    receiver.script = [500]
    page.click("button.datasource-webhook-test")
    message(page, expect, "Test event queued")
    failed = WebhookDelivery.objects.get(status=DeliveryStatus.GAVE_UP)
    assert failed.last_status_code == 500

    page.click("a.datasource-webhook-deliveries")
    page.wait_for_url(f"**/webhookdelivery/?endpoint__id__exact={endpoint.pk}")
    assert page.locator("#result_list tbody tr").count() == 3
    page.click("#changelist-filter a:text('Gave up')")
    page.wait_for_url("**status__exact=gave_up**")
    assert page.locator("#result_list tbody tr").count() == 1
    shot(page, "webhook-deliveries-gave-up")
    page.check("#result_list tbody input.action-select")
    page.select_option("select[name=action]", "retry_now")
    page.click("button[name=index]")
    message(page, expect, "Retrying 1 delivery now.")
    failed.refresh_from_db()
    assert (failed.status, failed.attempts, failed.last_status_code) == ("delivered", 2, 204)
    assert len(receiver.verified()) == 4  # the failed attempt was signed too
    assert page.locator("#result_list tbody tr").count() == 0  # no longer given up
    page.click(f"#changelist-filter a[href='?endpoint__id__exact={endpoint.pk}']")
    page.click(f"#result_list a[href*='/webhookdelivery/{failed.pk}/change/']")
    page.wait_for_url(f"**/webhookdelivery/{failed.pk}/change/**")
    codes = page.locator(".field-status_code").all_inner_texts()
    assert [c.strip() for c in codes] == ["500", "204"]  # each attempt, inline
    expect(page.locator(".field-error").first).to_contain_text("HTTP 500")
    page.go_back()

    page.click("#changelist-filter a:text('webhook.test')")
    page.wait_for_url("**event_type=webhook.test**")
    page.click("#changelist-filter a:text('Delivered')")
    page.wait_for_url("**status__exact=delivered**")
    assert page.locator("#result_list tbody tr").count() == 3
