"""``Token.refresh_due_at``: written by every transition, read by the sweep with one range scan.

The sweep only ever sees tokens whose stored due time has come, so each write that changes what
the background decision depends on must store the new time in the same UPDATE.
"""

from datetime import timedelta

import pytest
from django.utils import timezone

from datasources import tokens
from datasources.authserver.oauth import TokenResponse
from datasources.models import Token, TokenEvent
from datasources.tasks import refresh
from datasources.tokens.decide import due_for

from .conftest import make_datasource

pytestmark = pytest.mark.django_db

JSON = {"Content-Type": "application/json"}


def row(datasource) -> Token:
    return Token.objects.get(datasource=datasource, user=None)


def seconds_from_now(when) -> float:
    return (when - timezone.now()).total_seconds()


def near_expiry(token: Token) -> None:
    """An hour-long token a minute from expiry, as its last store left it: due now."""
    Token.objects.filter(pk=token.pk).update(
        expires_at=timezone.now() + timedelta(seconds=60),
        last_refreshed_at=timezone.now() - timedelta(seconds=3540),
        refresh_due_at=timezone.now(),
    )


def test_the_due_time_follows_every_transition(fake_token_endpoint):
    datasource = make_datasource()
    assert row(datasource).refresh_due_at is None  # not authorized: nothing to do

    # Authorized with an hour-long token: due within the refresh margin of expiry (300 s, less
    # up to 20% spread per token).
    token = tokens.store_authorization(
        datasource, TokenResponse(access_token="a1", refresh_token="r1", expires_in=3600)
    )
    assert 3600 - 300 - 2 <= seconds_from_now(token.refresh_due_at) <= 3600 - 240 + 2
    assert token.refresh_due_at == due_for(datasource, token, timezone.now())

    # Due: the background refreshes it, and the new token's due time is stored with it.
    near_expiry(token)
    fake_token_endpoint.queue((200, '{"access_token": "a2", "expires_in": 7200}', JSON))
    assert refresh.run(token.pk) == "refreshed"
    assert 7200 - 300 - 2 <= seconds_from_now(row(datasource).refresh_due_at) <= 7200 - 240 + 2

    # A transient failure: due again when the backoff ends, not before.
    near_expiry(token)
    fake_token_endpoint.queue((503, "down", {}))
    assert refresh.run(token.pk) == "transient"
    failed = row(datasource)
    assert failed.refresh_due_at == failed.next_attempt_at
    assert seconds_from_now(failed.refresh_due_at) > 20
    assert token.pk not in tokens.due_token_ids()

    # A dead grant: nothing to do until a person re-authorizes.
    Token.objects.filter(pk=token.pk).update(
        next_attempt_at=timezone.now() - timedelta(seconds=1), refresh_due_at=timezone.now()
    )  # the backoff is over
    fake_token_endpoint.queue((400, '{"error": "invalid_grant"}', JSON))
    assert refresh.run(token.pk) == "reauthorization"
    assert row(datasource).refresh_due_at is None

    # Re-authorized: scheduled again.
    tokens.store_authorization(
        datasource, TokenResponse(access_token="a3", refresh_token="r3", expires_in=600)
    )
    # A 10-minute token: the margin is capped at half its life.
    assert 600 - 300 - 2 <= seconds_from_now(row(datasource).refresh_due_at) <= 600 - 240 + 2

    # Disconnected: nothing to do.
    tokens.disconnect(datasource)
    assert row(datasource).refresh_due_at is None


def test_a_task_that_finds_nothing_to_do_stores_the_real_due_time(fake_token_endpoint):
    """A sweep's claim (or a stale due time) is replaced by the time the decision gives."""
    datasource = make_datasource()
    token = tokens.store_authorization(
        datasource, TokenResponse(access_token="a", refresh_token="r", expires_in=3600)
    )
    expected = row(datasource).refresh_due_at
    Token.objects.filter(pk=token.pk).update(refresh_due_at=timezone.now())
    assert refresh.run(token.pk) == "fresh"
    after = row(datasource)
    assert after.refresh_due_at == expected
    assert (after.lease_id, after.lease_expires_at) == ("", None)
    assert fake_token_endpoint.calls == []


def test_client_credentials_are_due_as_soon_as_saved_and_after_a_disconnect(fake_token_endpoint):
    datasource = make_datasource(slug="cc", grant_type="client_credentials", authorization_url="")
    assert row(datasource).pk in tokens.due_token_ids()
    fake_token_endpoint.queue((200, '{"access_token": "m1", "expires_in": 3600}', JSON))
    assert refresh.run(row(datasource).pk) == "refreshed"
    assert row(datasource).pk not in tokens.due_token_ids()
    tokens.disconnect(datasource)
    assert row(datasource).pk in tokens.due_token_ids()


def test_a_github_style_token_is_never_due():
    datasource = make_datasource(slug="gh")
    tokens.store_authorization(datasource, TokenResponse(access_token="gho_x"))
    token = row(datasource)
    assert (token.expires_at, token.refresh_due_at) == (None, None)


def test_claimed_tokens_are_not_picked_again_until_the_claim_lapses(settings):
    settings.DATASOURCES = {**settings.DATASOURCES, "SWEEP_CLAIM_SECONDS": 300}
    ids = []
    for number in range(7):
        datasource = make_datasource(slug=f"ds{number}", name=f"ds{number}")
        tokens.store_authorization(
            datasource, TokenResponse(access_token="a", refresh_token="r", expires_in=3600)
        )
        Token.objects.filter(datasource=datasource).update(refresh_due_at=timezone.now())
        ids.append(row(datasource).pk)
    first = tokens.claim_due(5)
    second = tokens.claim_due(5)
    assert len(first) == 5 and len(second) == 2
    assert set(first) | set(second) == set(ids)
    assert tokens.claim_due(5) == []
    # A lost task: its claim lapses and the token comes due again.
    Token.objects.filter(pk=first[0]).update(refresh_due_at=timezone.now())
    assert tokens.claim_due(5) == [first[0]]
    assert not TokenEvent.objects.filter(kind="refresh_failed").exists()


@pytest.mark.postgres_only
@pytest.mark.django_db(transaction=True)
def test_concurrent_sweeps_claim_different_tokens():
    """While one sweep holds its batch's rows, another claims the next ones instead of the
    same (FOR UPDATE SKIP LOCKED), so no token is enqueued twice."""
    import threading

    from django.db import connection, transaction

    for number in range(8):
        datasource = make_datasource(slug=f"ds{number}", name=f"ds{number}")
        tokens.store_authorization(
            datasource, TokenResponse(access_token="a", refresh_token="r", expires_in=3600)
        )
    Token.objects.update(refresh_due_at=timezone.now())
    held, release = threading.Event(), threading.Event()
    first: list[int] = []

    def other_sweep() -> None:
        try:
            with transaction.atomic():
                rows = Token.objects.due().select_for_update(skip_locked=True, of=("self",))
                first.extend(rows.values_list("pk", flat=True)[:5])
                held.set()
                assert release.wait(10)
        finally:
            connection.close()

    thread = threading.Thread(target=other_sweep)
    thread.start()
    try:
        assert held.wait(10)
        second = tokens.claim_due(5)
    finally:
        release.set()
        thread.join(10)
    assert len(first) == 5 and len(second) == 3
    assert not set(first) & set(second)
