"""Debian's chromium driven by Playwright, shared by the browser tests.

Playwright cannot download its own browser here, so the tests launch /usr/bin/chromium with
the flags a headless CI machine needs, and skip (a failure under CI) when it is missing.

The fixtures at the end (``playwright_api``, ``page``, ``expect``, ``builder``) are shared by
the admin browser tests: ``tests/conftest.py`` loads this module as a pytest plugin.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from django.db import connections

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def playwright_api() -> Any:
    """``playwright.sync_api``, or a skip when Debian's chromium is not installed."""
    if not (os.path.exists(CHROMIUM) and shutil.which("chromium")):
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    return pytest.importorskip("playwright.sync_api")


@contextmanager
def chromium_page(api: Any, monkeypatch: pytest.MonkeyPatch, **context: Any) -> Iterator[Any]:
    """A page in a fresh chromium; ``context`` goes to ``browser.new_context`` (viewport …)."""
    # Playwright's sync API runs an event loop in this thread; the ORM calls here are plain sync.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_context(**context).new_page()
        page.set_default_timeout(20_000)
        try:
            yield page
        finally:
            browser.close()
            # ORM calls made while Playwright's loop runs use their own (context-local)
            # connection; close it, or it keeps the test database busy at teardown.
            connections.close_all()


# --- fixtures shared by the admin browser tests ----------------------------------------------

#: The superuser the admin browser tests log in as (``log_in`` in test_admin_browser.py).
BUILDER_PASSWORD = "builder-pass-1"


@pytest.fixture(name="playwright_api")
def playwright_api_fixture() -> Any:
    return playwright_api()


@pytest.fixture
def page(playwright_api, monkeypatch) -> Iterator[Any]:
    with chromium_page(playwright_api, monkeypatch, viewport={"width": 1280, "height": 900}) as p:
        yield p


@pytest.fixture
def expect(playwright_api) -> Any:
    return playwright_api.expect


@pytest.fixture
def builder(django_user_model):
    return django_user_model.objects.create_superuser("builder", "b@example.com", BUILDER_PASSWORD)
