"""Which tokens the sweep picks, the cron command, and startup configuration errors."""

import subprocess
import sys
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.db import DatabaseError, connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from datasources import tokens
from datasources.models import Token, TokenEvent
from datasources.tasks import refresh
from datasources.tokens import lifecycle
from datasources.tokens.decide import due_for

from .conftest import make_datasource
from .helpers import ROOT

pytestmark = pytest.mark.django_db

OK = (
    200,
    '{"access_token": "fresh-access", "refresh_token": "fresh-refresh", "expires_in": 3600}',
    {"Content-Type": "application/json"},
)


def token_for(slug: str, **fields) -> Token:
    datasource = make_datasource(slug=slug, name=slug)
    defaults = dict(
        access_token="a",
        refresh_token="r",
        status="active",
        expires_at=timezone.now() + timedelta(hours=1),
        # Issued an hour ago: a token that expires within minutes is near the end of its life
        # (a margin is never more than half the lifetime).
        last_refreshed_at=timezone.now() - timedelta(hours=1),
    )
    defaults.update(fields)
    Token.objects.filter(datasource=datasource).update(**defaults)
    token = Token.objects.get(datasource=datasource)
    # What the write that produced this state stores along with it.
    token.refresh_due_at = due_for(datasource, token, timezone.now())
    Token.objects.filter(pk=token.pk).update(refresh_due_at=token.refresh_due_at)
    return token


def test_due_selects_exactly_the_tokens_that_need_work():
    now = timezone.now()
    expiring = token_for("expiring", expires_at=now + timedelta(minutes=2))
    idle = token_for(
        "idle", expires_at=now + timedelta(days=30), last_refreshed_at=now - timedelta(days=2)
    )
    retry_due = token_for(
        "retry",
        expires_at=now + timedelta(minutes=3),
        failure_kind="transient",
        next_attempt_at=now - timedelta(seconds=1),
        failure_count=1,
    )
    cc = make_datasource(
        slug="cc", name="cc", grant_type="client_credentials", authorization_url=""
    )
    token_for("fresh")
    token_for(
        "backoff", expires_at=now + timedelta(minutes=1), next_attempt_at=now + timedelta(minutes=5)
    )
    token_for("dead", status="needs_reauthorization", expires_at=now - timedelta(hours=1))
    token_for(
        "leased",
        expires_at=now + timedelta(minutes=1),
        lease_id="x",
        lease_expires_at=now + timedelta(seconds=20),
    )
    token_for(
        "never", status="not_authorized", access_token=None, refresh_token=None, expires_at=None
    )
    token_for(  # GitHub-style: no refresh token, no expiry, old: nothing to do, ever
        "github", refresh_token=None, expires_at=None, last_refreshed_at=now - timedelta(days=9)
    )
    due = set(tokens.due_token_ids())
    assert due == {expiring.pk, idle.pk, retry_due.pk, cc.token.pk}


def test_idle_long_lived_token_is_refreshed_daily(fake_token_endpoint):
    token = token_for(
        "idle",
        expires_at=timezone.now() + timedelta(days=30),
        last_refreshed_at=timezone.now() - timedelta(days=2),
    )
    fake_token_endpoint.queue(OK)
    assert tokens.refresh_token(token).outcome == "refreshed"
    token.refresh_from_db()
    assert token.refresh_token == "fresh-refresh"


def test_refresh_task_refreshes_from_the_id_in_four_queries(fake_token_endpoint):
    token = token_for("due", expires_at=timezone.now() + timedelta(minutes=1))
    fake_token_endpoint.queue(OK)
    with CaptureQueriesContext(connection) as ctx:
        assert refresh.run(token.pk) == "refreshed"
    # lease UPDATE, read, store UPDATE (also releases the lease), event INSERT; the event in
    # the outbox's savepoint of the store's transaction (SAVEPOINT and RELEASE)
    sql = [q["sql"] for q in ctx.captured_queries]
    assert len([s for s in sql if "SAVEPOINT" not in s]) == 4, sql
    assert len(sql) == 6, sql
    token.refresh_from_db()
    assert (token.refresh_token, token.refresh_count, token.lease_id) == ("fresh-refresh", 1, "")
    assert TokenEvent.objects.filter(datasource=token.datasource, kind="refreshed").count() == 1


def test_refresh_task_leaves_a_token_leased_elsewhere_alone(fake_token_endpoint):
    until = timezone.now() + timedelta(seconds=20)
    token = token_for(
        "busy",
        expires_at=timezone.now() + timedelta(minutes=1),
        lease_id="other-worker",
        lease_expires_at=until,
    )
    assert refresh.run(token.pk) == "skipped"
    token.refresh_from_db()
    assert fake_token_endpoint.calls == []
    assert (token.lease_id, token.lease_expires_at, token.refresh_token) == (
        "other-worker",
        until,
        "r",
    )


def test_refresh_task_releases_the_lease_of_a_token_refreshed_meanwhile(fake_token_endpoint):
    token = token_for("fresh-now")  # e.g. the proxy refreshed it after the sweep picked it
    assert refresh.run(token.pk) == "fresh"
    token.refresh_from_db()
    assert fake_token_endpoint.calls == []
    assert (token.lease_id, token.lease_expires_at) == ("", None)


def test_refresh_task_skips_a_deleted_token(fake_token_endpoint):
    token = token_for("gone", expires_at=timezone.now() + timedelta(minutes=1))
    token.datasource.delete()
    assert refresh.run(token.pk) == "skipped"
    assert fake_token_endpoint.calls == []


def test_rotated_refresh_token_is_kept_when_the_event_cannot_be_written(
    fake_token_endpoint, monkeypatch
):
    token = token_for("event-fails", expires_at=timezone.now() + timedelta(minutes=1))
    fake_token_endpoint.queue(OK)

    def fail(*args, **kwargs):
        raise DatabaseError("could not write the event row")

    monkeypatch.setattr(lifecycle, "record_event", fail)
    assert refresh.run(token.pk) == "refreshed"  # the outbox is rolled back, and logged
    token.refresh_from_db()
    # The server has already rotated: the old refresh token is dead, the new one must be stored.
    assert (token.access_token, token.refresh_token) == ("fresh-access", "fresh-refresh")


def test_refresh_tokens_command_reports_a_summary(fake_token_endpoint, capsys):
    token_for("one", expires_at=timezone.now() + timedelta(minutes=1))
    token_for("two", expires_at=timezone.now() + timedelta(minutes=1))
    token_for("three", expires_at=timezone.now() + timedelta(minutes=1))
    fake_token_endpoint.queue(OK, (503, "down", {}), (400, '{"error": "invalid_grant"}', {}))
    call_command("refresh_tokens")
    out = capsys.readouterr().out
    assert "[3/3]" in out
    assert (
        "1 refreshed, 1 failed transiently, 0 failed on a configuration error, "
        "1 need re-authorization"
    ) in out


def test_missing_keys_without_debug_is_a_startup_error():
    env = {
        "PATH": "/usr/bin:/bin",
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "SECRET_KEY": "k",
        "DEBUG": "0",
        "ENV_FILE": "/dev/null",
        "DATA_DIR": str(ROOT / "var" / "test"),
    }
    result = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "FERNET_KEYS is not set" in result.stderr
    debug = subprocess.run(
        [sys.executable, "-c", "import django; django.setup(); print('ok')"],
        cwd=ROOT,
        env={**env, "DEBUG": "1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert debug.stdout.strip() == "ok"
    assert "deriving an encryption key from SECRET_KEY" in debug.stderr
