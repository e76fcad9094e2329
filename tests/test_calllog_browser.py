"""The admin pages of the call log and the upstream's health, clicked in chromium after real
calls through the live server's proxy to the flaky upstream: every filter, the search, the date
drill-down, sorting, the read-only row page; the datasource list's *upstream* column and the
rate-limit and circuit-breaker banners with their *Test a call* button. Each click's outcome is
asserted on the page (which rows are shown) or at the upstream (what reached it)."""

from __future__ import annotations

import re

import pytest
import requests

from datasources.models import ProxyCall
from datasources.proxy import calllog
from datasources.proxy.apikeys import create_api_key

from .flaky import status
from .test_admin_browser import log_in, message, shot
from .test_retries import flaky_datasource

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def fast_settings(settings):
    settings.DATASOURCES = {
        **settings.DATASOURCES,
        "RETRY_BACKOFF_BASE": 0.01,
        "RETRY_BACKOFF_MAX": 0.02,
        "CALL_LOG_FLUSH_INTERVAL": 3600,  # only the test's own flush() writes
        "BREAKER_THRESHOLD": 2,
        "BREAKER_COOLDOWN": 600,
    }
    return settings


def proxy(base: str, key: str, slug: str, path: str, method: str = "GET") -> requests.Response:
    return requests.request(
        method,
        f"{base}/api/v1/datasources/{slug}/proxy/{path}",
        headers={"Authorization": f"Api-Key {key}"},
        timeout=10,
    )


def shown_paths(page) -> list[str]:
    return page.locator("#result_list tbody td.field-path").all_inner_texts()


def test_call_log_filters_search_sorting_and_row_page(
    live_server, flaky, fast_settings, page, expect, builder
):
    base = live_server.url
    flaky_datasource(flaky, slug="first", name="First API")
    flaky_datasource(flaky, slug="second", name="Second API")
    api_key, key = create_api_key("billing-app")
    flaky.script("/api/fails", status(502))
    flaky.script("/api/expired", status(401))  # refreshed at /token, retried: 200
    flaky.script("/api/by-user", status(404))
    assert proxy(base, key, "first", "fails?secret=query-value").status_code == 502
    assert proxy(base, key, "first", "works").status_code == 200
    assert proxy(base, key, "first", "expired").status_code == 200
    assert proxy(base, key, "second", "other", method="POST").status_code == 200
    assert flaky.token_calls == 1

    log_in(page, base)
    # A logged-in user with the permission is a caller too: the browser calls the proxy.
    page.goto(f"{base}/api/v1/datasources/second/proxy/by-user")
    assert flaky.count("/api/by-user") == 1
    assert calllog.flush() == 5
    everything = {"fails", "works", "expired", "other", "by-user"}

    page.goto(f"{base}/admin/")
    page.click("a[href='/admin/datasources/proxycall/']")  # "Call log" in the app list
    expect(page.locator("#result_list tbody tr")).to_have_count(5)
    assert set(shown_paths(page)) == everything
    assert "query-value" not in page.content()
    expect(page.locator("#content .object-tools a.addlink")).to_have_count(0)  # read-only
    shot(page, "call-log")

    def pick(filter_title: str, choice: str, expected: set[str]) -> None:
        """Click ``choice`` under the filter titled ``filter_title``; clear all filters after."""
        section = page.locator("#changelist-filter details", has_text=f"By {filter_title}")
        section.locator("a", has_text=re.compile(rf"^{re.escape(choice)}(\s|$)")).click()
        expect(page.locator("#result_list tbody tr")).to_have_count(len(expected))
        assert set(shown_paths(page)) == expected, (filter_title, choice)
        page.click("#changelist-filter a:has-text('Clear all filters')")
        expect(page.locator("#result_list tbody tr")).to_have_count(5)

    # "Show counts" puts each choice's number of calls next to it; "Hide counts" takes them away.
    page.click("#changelist-filter a:has-text('Show counts')")
    expect(page.locator("#changelist-filter a", has_text="First API")).to_have_text("First API (3)")
    expect(page.locator("#changelist-filter a", has_text="5xx")).to_have_text("5xx (1)")
    page.click("#changelist-filter a:has-text('Hide counts')")
    expect(page.locator("#changelist-filter a", has_text="First API")).to_have_text("First API")

    pick("datasource", "First API", {"fails", "works", "expired"})
    pick("datasource", "Second API", {"other", "by-user"})
    pick("status class", "5xx", {"fails"})
    pick("status class", "4xx", {"by-user"})
    pick("status class", "2xx", {"works", "expired", "other"})
    pick("API key", str(api_key), {"fails", "works", "expired", "other"})
    pick("user", "builder", {"by-user"})
    pick("method", "POST", {"other"})
    pick("refreshed", "Yes", {"expired"})
    pick("refreshed", "No", everything - {"expired"})

    # Two filters at once narrow further; "All" under one of them drops only that one.
    page.locator("#changelist-filter details", has_text="By datasource").locator(
        "a", has_text="First API"
    ).click()
    page.locator("#changelist-filter details", has_text="By status class").locator(
        "a", has_text="2xx"
    ).click()
    assert set(shown_paths(page)) == {"works", "expired"}
    page.locator("#changelist-filter details", has_text="By datasource").locator(
        "a", has_text=re.compile("^All$")
    ).click()
    assert set(shown_paths(page)) == {"works", "expired", "other"}
    page.goto(f"{base}/admin/datasources/proxycall/")

    # Search by path.
    page.fill("#searchbar", "expired")
    page.click("#changelist-search input[type=submit]")
    assert shown_paths(page) == ["expired"]
    page.goto(f"{base}/admin/datasources/proxycall/")

    # The date links: all calls are from today, so the one choice is today's date; its "back"
    # links climb to the month, the year and all dates, each still showing today's calls.
    page.click("nav.toplinks a:not(.date-back)")
    page.wait_for_url(re.compile(r".*called_at__day=\d+"))
    expect(page.locator("#result_list tbody tr")).to_have_count(5)
    for level in ("month", "year"):
        page.click("nav.toplinks a.date-back")
        page.wait_for_url(re.compile(rf".*called_at__{level}=\d+(?!.*called_at__day)"))
        expect(page.locator("#result_list tbody tr")).to_have_count(5)
    page.click("nav.toplinks a.date-back")
    page.wait_for_url(f"{base}/admin/datasources/proxycall/?")
    expect(page.locator("#result_list tbody tr")).to_have_count(5)
    page.goto(f"{base}/admin/datasources/proxycall/")

    # Sorting by status: ascending puts the 200s first, descending the 502 first.
    page.click("th.column-status a")
    statuses = page.locator("#result_list tbody td.field-status").all_inner_texts()
    assert statuses == sorted(statuses)
    page.click("th.column-status a.toggle")
    assert page.locator("#result_list tbody td.field-status").first.inner_text() == "502"

    # A row opens a view-only page (no Save, no Delete) that says what the call did.
    page.goto(f"{base}/admin/datasources/proxycall/")
    page.click("#result_list tbody th a >> nth=0")
    row = ProxyCall.objects.order_by("-called_at", "-id").first()
    page.wait_for_url(f"{base}/admin/datasources/proxycall/{row.pk}/change/")
    expect(page.locator("input[name=_save]")).to_have_count(0)
    expect(page.locator("a.deletelink")).to_have_count(0)
    expect(page.locator(".field-path .readonly")).to_have_text(row.path)
    page.click("a.closelink")
    page.wait_for_url(f"{base}/admin/datasources/proxycall/")


def test_upstream_column_and_banners_after_a_flaky_run(
    live_server, flaky, fast_settings, page, expect, builder
):
    base = live_server.url
    limited = flaky_datasource(flaky, slug="limited", name="Limited API")
    failing = flaky_datasource(flaky, slug="failing", name="Failing API")
    flaky_datasource(flaky, slug="calm", name="Calm API")
    _, key = create_api_key("app")
    flaky.script("/api/a", status(429, Retry_After="300"))
    flaky.always["/api/b"] = status(500)
    assert proxy(base, key, "limited", "a").status_code == 429
    assert proxy(base, key, "failing", "b").status_code == 500
    assert proxy(base, key, "failing", "b").status_code == 500
    refused = proxy(base, key, "failing", "b")
    assert refused.status_code == 503 and refused.json()["error"] == "circuit_open"
    assert proxy(base, key, "calm", "c").status_code == 200
    assert flaky.count("/api/b") == 2  # the third call never reached the upstream

    log_in(page, base)
    page.click("a[href='/admin/datasources/datasource/']")
    rows = page.locator("#result_list tbody tr")
    expect(rows).to_have_count(3)
    expect(rows.filter(has_text="Failing API").locator(".datasource-upstream")).to_have_text(
        re.compile(r"^circuit open until \d\d:\d\d:\d\d after 2 failures in a row$")
    )
    expect(rows.filter(has_text="Limited API").locator(".datasource-upstream")).to_have_text(
        re.compile(r"^rate-limited until \d\d:\d\d:\d\d \([45] min\)$")
    )
    expect(rows.filter(has_text="Calm API").locator(".datasource-upstream")).to_have_text("ok")
    shot(page, "datasource-list-upstream")

    # The rate-limited datasource's page: its banner, and its button leads to the Test page.
    page.click("#result_list a:has-text('Limited API')")
    page.wait_for_url(f"{base}{limited.get_admin_url()}")
    banner = page.locator(".datasource-banner-rate-limited")
    expect(banner).to_contain_text("answered 429 at once, without calling it")
    expect(page.locator(".datasource-banner-circuit-open")).to_have_count(0)
    shot(page, "datasource-banner-rate-limited")
    banner.locator("a.button").click()
    page.wait_for_url(re.compile(rf".*/datasource/{limited.pk}/test/.*"))
    expect(page.locator("#id_path")).to_be_visible()

    # The failing datasource's page: the circuit banner; its Test button sends one call (never
    # refused: it may show recovery). The upstream is back, so the call succeeds and closes
    # the circuit for every caller.
    page.goto(f"{base}{failing.get_admin_url()}")
    banner = page.locator(".datasource-banner-circuit-open")
    expect(banner).to_contain_text("answered 503 at once")
    expect(banner).to_contain_text("after 2 failures in a row")
    shot(page, "datasource-banner-circuit-open")
    flaky.always["/api/b"] = status(200)
    banner.locator("a.button").click()
    page.fill("#id_path", "b")
    page.click("input.datasource-run-test")
    expect(page.locator(".datasource-test-status")).to_contain_text("200")
    message(page, expect, "Test call: 200 OK")
    assert flaky.count("/api/b") == 3
    page.click("a.datasource-back")
    page.wait_for_url(f"{base}{failing.get_admin_url()}")
    expect(page.locator(".datasource-banner-circuit-open")).to_have_count(0)
    page.goto(f"{base}/admin/datasources/datasource/")
    expect(rows.filter(has_text="Failing API").locator(".datasource-upstream")).to_have_text("ok")
    assert proxy(base, key, "failing", "b").status_code == 200
    assert flaky.count("/api/b") == 4
