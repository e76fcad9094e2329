"""Plain helpers shared by test modules (fixtures live in tests/conftest.py and the plugins it
registers): datasources with a usable token, response bodies, and the environment of other
processes started against the same test database."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from django.db import connection
from django.utils import timezone

from datasources.models import Datasource, Token

from .conftest import make_datasource

if TYPE_CHECKING:
    from .spy import SpyUpstream

ROOT = Path(__file__).resolve().parent.parent

#: The tokens :func:`connected_at` gives its datasources.
ACCESS_TOKEN = "access-token-" + "a" * 32
REFRESH_TOKEN = "refresh-token-" + "r" * 32


def connected(spy: SpyUpstream, **fields) -> Datasource:
    """A client-credentials datasource whose base URL is the spy's /api/, with a valid token."""
    return connected_at(spy.base, **fields)


def connected_at(base: str, **fields) -> Datasource:
    """:func:`connected` for any origin ``base`` (``https://…`` upstreams, unreachable ones)."""
    fields.setdefault("slug", "spied")
    fields.setdefault("name", "Spied API")
    datasource = make_datasource(
        base_url=f"{base}/api/",
        grant_type="client_credentials",
        authorization_url="",
        access_token_url="http://127.0.0.1:9/token",
        **fields,
    )
    now = timezone.now()
    Token.objects.filter(datasource=datasource, user=None).update(
        access_token=ACCESS_TOKEN,
        refresh_token=REFRESH_TOKEN,
        token_type="Bearer",
        status="active",
        expires_at=now + timedelta(hours=1),
        obtained_at=now,
        last_refreshed_at=now,
    )
    return datasource


def body_of(response) -> bytes:
    """A Django test response's body, streamed (the proxy's answers) or not."""
    return b"".join(response.streaming_content) if response.streaming else response.content


# --- other processes ------------------------------------------------------------------------


def database_url() -> str:
    settings = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{settings['NAME']}"
    user = settings.get("USER") or ""
    password = f":{settings['PASSWORD']}" if settings.get("PASSWORD") else ""
    auth = f"{user}{password}@" if user else ""
    host = settings.get("HOST") or "127.0.0.1"
    port = f":{settings['PORT']}" if settings.get("PORT") else ""
    return f"postgres://{auth}{host}{port}/{settings['NAME']}"


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="tests.settings",
        DATABASE_URL=database_url(),
        PYTHONPATH=str(ROOT),
    )
    env.update(extra)
    return env
