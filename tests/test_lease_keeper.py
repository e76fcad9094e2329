"""Issue 30: the refresh lease is kept alive by its holder, a lost answer is asked again at once,
and a refreshed token is not lost to a database that is away when it is stored.

* The keeper extends a lease while its holder's request runs (the row's ``lease_expires_at``
  moves ahead) and stops when the holder is done, so a dead holder's lease lapses within
  ``LEASE_SECONDS``.
* A read timeout after sending, then the same refresh token sent again at once and answered (a
  provider with a reuse grace period): refreshed, one ``lost_response`` event that says the
  grant is intact and when the lost request was sent.
* The store fails with ``OperationalError`` (a PostgreSQL restart) after the token endpoint
  answered: the answer is stored once the database answers again, and the endpoint was asked
  once.

The HTTP layer is faked at the requests adapter (``fake_token_endpoint``); the real-process
versions (a killed holder, oidc-provider's strict reuse detection, a grace-period provider, a
real PostgreSQL restart) are in test_lost_answer.py and test_database_outage.py.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta

import pytest
import requests
from django.db import OperationalError, connection
from django.utils import timezone

from datasources import tokens
from datasources.models import Token, TokenEvent, TokenStatus
from datasources.tokens import lease, service

from .test_tokens import authorized_fake

pytestmark = pytest.mark.django_db(transaction=True)

GRANTED = (
    200,
    json.dumps(
        {
            "access_token": "new-access-token-value",
            "refresh_token": "new-refresh-token-value",
            "token_type": "Bearer",
            "expires_in": 3600,
        }
    ),
    {"Content-Type": "application/json"},
)


def poll(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_the_keeper_extends_a_held_lease_and_stops_when_it_is_dropped(settings):
    settings.DATASOURCES = {**settings.DATASOURCES, "LEASE_SECONDS": 0.6}
    datasource = authorized_fake()
    token = Token.objects.get(datasource=datasource)
    lease_id = lease.acquire(token.pk)
    assert lease_id
    taken = Token.objects.get(pk=token.pk)
    assert taken.refresh_started_at is not None
    first_expiry = taken.lease_expires_at

    with lease.kept(token.pk, lease_id):
        # Two beats later the lease reaches beyond where it started, and is still held.
        poll(
            lambda: (
                Token.objects.get(pk=token.pk).lease_expires_at
                > first_expiry + timedelta(seconds=0.3)
            ),
            5,
            "the keeper's beat",
        )
        poll(
            lambda: Token.objects.get(pk=token.pk).lease_expires_at > timezone.now(),
            1,
            "a live lease",
        )
    # Dropped: nobody extends it, so it lapses within LEASE_SECONDS and can be taken over.
    last_expiry = Token.objects.get(pk=token.pk).lease_expires_at
    assert last_expiry <= timezone.now() + timedelta(seconds=0.6)
    other = poll(lambda: lease.acquire(token.pk), 5, "the lapsed lease taken over")
    over = Token.objects.get(pk=token.pk)
    assert over.lease_id == other != lease_id
    # Taking it over records when the lost attempt started (its lease), not when it lapsed.
    assert over.outcome_unknown_at == taken.refresh_started_at


def test_a_lease_released_at_once_costs_no_beat(settings):
    settings.DATASOURCES = {**settings.DATASOURCES, "LEASE_SECONDS": 3}
    datasource = authorized_fake()
    token = Token.objects.get(datasource=datasource)
    beats = lease._keeper.beats
    lease_id = lease.acquire(token.pk)
    with lease.kept(token.pk, lease_id):
        pass
    lease.release(token.pk, lease_id)
    # One beat interval later, nothing was extended (the keeper had nothing held that long).
    time.sleep(lease.beat_interval() * 1.2)
    assert lease._keeper.beats == beats


def test_a_lost_answer_is_sent_again_at_once_and_the_grant_survives(fake_token_endpoint):
    datasource = authorized_fake()
    fake_token_endpoint.queue(requests.ReadTimeout("read timed out"), GRANTED)
    before = timezone.now()

    result = tokens.refresh_token(datasource)

    assert result.outcome == "refreshed"
    first, again = fake_token_endpoint.calls
    assert "old-refresh-token-value" in first.body and first.body == again.body
    token = Token.objects.get(datasource=datasource)
    assert token.status == TokenStatus.ACTIVE
    assert token.refresh_token == "new-refresh-token-value"
    assert token.outcome_unknown_at is None and token.lease_id == ""
    lost = TokenEvent.objects.get(datasource=datasource, kind="lost_response")
    assert "the grant is intact" in lost.detail
    sent = timezone.localtime(token.refresh_started_at)
    assert before - timedelta(seconds=1) <= token.refresh_started_at <= timezone.now()
    assert f"{sent:%H:%M:%S}" in lost.detail  # when the lost request was sent


def test_a_refreshed_token_waits_for_the_database_to_be_stored(fake_token_endpoint, monkeypatch):
    datasource = authorized_fake()
    fake_token_endpoint.queue(GRANTED)
    real_store = service.store_refresh
    failures = []

    def store_while_the_database_restarts(*args, **kwargs):
        if len(failures) < 3:
            failures.append(time.monotonic())
            raise OperationalError("server closed the connection unexpectedly")
        return real_store(*args, **kwargs)

    monkeypatch.setattr(service, "store_refresh", store_while_the_database_restarts)

    result = tokens.refresh_token(datasource)

    assert result.outcome == "refreshed"
    assert len(failures) == 3
    assert len(fake_token_endpoint.calls) == 1  # not repeated
    token = Token.objects.get(datasource=datasource)
    assert token.refresh_token == "new-refresh-token-value"
    assert token.access_token == "new-access-token-value"
    assert token.lease_id == "" and token.failure_count == 0


def test_a_statement_error_while_storing_is_not_retried(fake_token_endpoint, monkeypatch):
    from django.db import IntegrityError

    datasource = authorized_fake()
    fake_token_endpoint.queue(GRANTED)
    calls = []

    def broken_store(*args, **kwargs):
        calls.append(1)
        raise IntegrityError("a bug, not an outage")

    monkeypatch.setattr(service, "store_refresh", broken_store)
    with pytest.raises(IntegrityError):
        tokens.refresh_token(datasource)
    assert calls == [1]


def test_waiters_take_over_a_dead_holders_lease_within_lease_seconds(fake_token_endpoint, settings):
    """A holder took the lease and died (nobody keeps it): a caller with an expired token
    notices within LEASE_SECONDS and refreshes, instead of waiting LEASE_WAIT (20 s here)."""
    settings.DATASOURCES = {**settings.DATASOURCES, "LEASE_SECONDS": 2}
    datasource = authorized_fake()
    token = Token.objects.get(datasource=datasource)
    assert lease.acquire(token.pk)  # ... and its holder is gone
    fake_token_endpoint.queue(GRANTED)
    outcome: dict = {}

    def caller() -> None:
        started = time.monotonic()
        try:
            outcome["token"] = datasource.get_access_token()
        finally:
            outcome["waited"] = time.monotonic() - started
            connection.close()

    thread = threading.Thread(target=caller)
    thread.start()
    thread.join(15)
    assert not thread.is_alive()
    assert outcome["token"] == "new-access-token-value"
    assert outcome["waited"] < 2 + 1.5, outcome
    lost = TokenEvent.objects.get(datasource=datasource, kind="lost_response")
    assert "the grant is intact" in lost.detail
