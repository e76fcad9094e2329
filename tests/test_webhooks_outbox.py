"""The transactional outbox: a token change, its event row and its webhook deliveries commit
together. A "crash" (an exception no code catches, as a killed process) between the token
write and the event loses both; a crash after the commit but before the Celery task was
enqueued leaves delivery rows the sweep sends; a failing outbox write never costs the token
change."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.db import DatabaseError, connection
from django.utils import timezone

from datasources import tasks, tokens
from datasources.models import DeliveryStatus, Token, TokenEvent, WebhookDelivery
from datasources.signals import token_refreshed
from datasources.tokens import lifecycle
from datasources.webhooks import delivery, endpoints, events

from .fakeprovider import authorize_through_admin, connect, fake_provider, wait_until  # noqa: F401
from .test_webhooks import eager, make_endpoint, sweep_until  # noqa: F401
from .webhook_receiver import receiver  # noqa: F401


class Crash(BaseException):
    """The process dies here: not an Exception, so no handler on the way out catches it."""


def _state(token: Token) -> tuple:
    token.refresh_from_db()
    return (token.status, token.failure_count, token.access_token, token.refresh_token)


def _crash_after_the_outbox_insert(monkeypatch) -> list[str]:
    """Every event's delivery rows are written, then the process dies inside the transaction."""
    written: list[str] = []
    real = events.emit

    def emit_then_crash(event_type, *args, **kwargs):
        real(event_type, *args, **kwargs)
        written.append(event_type)
        assert WebhookDelivery.objects.filter(event_type=event_type).exists()
        raise Crash(event_type)

    monkeypatch.setattr(events, "emit", emit_then_crash)
    return written


@pytest.mark.django_db(transaction=True)
def test_a_crash_inside_the_token_change_loses_the_change_and_its_events_together(
    fake_provider,  # noqa: F811
    staff_client,
    receiver,  # noqa: F811
    eager,  # noqa: F811
    monkeypatch,
):
    """For a transient failure, a recovery (store_refresh) and a dead grant: the process dies
    after the token UPDATE and the delivery insert, before the commit. The token, its event row
    and the deliveries are all as before; nothing reaches the receiver. Without the crash the
    same calls write every event's delivery row and send it."""
    provider = fake_provider("rfc")
    datasource = connect(provider, staff_client)
    endpoint = make_endpoint(receiver.url)
    receiver.secrets = [endpoint.secret]
    token = Token.objects.get(datasource=datasource)
    sent: list[str] = []

    def step(prepare, expect: list[str]) -> None:
        prepare()
        before, history = _state(token), TokenEvent.objects.count()
        crashed = _crash_after_the_outbox_insert(monkeypatch)
        with pytest.raises(Crash):
            tokens.refresh_token(token, force=True)
        monkeypatch.undo()
        assert crashed == expect[:1]  # the rows were written, then the crash
        assert _state(token) == before  # the token change is gone ...
        assert TokenEvent.objects.count() == history  # ... with its event row ...
        assert WebhookDelivery.objects.count() == len(sent)  # ... and its deliveries
        # The dead process's lease (taken before the token request, in its own commit) lapses.
        Token.objects.filter(pk=token.pk).update(lease_id="", lease_expires_at=None)
        token.refresh_from_db()
        tokens.refresh_token(token, force=True)  # no crash: all of it commits
        assert _state(token) != before
        sent.extend(expect)
        rows = WebhookDelivery.objects.order_by("pk").values_list("event_type", flat=True)
        assert list(rows) == sent

    step(lambda: provider.fail("503-html"), ["token.refresh_failed"])
    step(provider.recover, ["datasource.recovered"])
    step(
        provider.revoke_refresh_tokens,
        ["token.refresh_failed", "datasource.reauthorization_required"],
    )
    assert [r.json["type"] for r in receiver.verified()] == sent


@pytest.mark.django_db(transaction=True)
def test_a_crash_after_the_commit_before_the_enqueue_is_sent_by_the_sweep(
    fake_provider,  # noqa: F811
    staff_client,
    receiver,  # noqa: F811
    eager,  # noqa: F811
    monkeypatch,
):
    """The process dies after each commit, before handing the deliveries to Celery: every
    token change (failure, recovery, dead grant, re-authorization) has its delivery rows all
    the same, and the sweep sends each of them once."""
    provider = fake_provider("rfc")
    datasource = connect(provider, staff_client)
    endpoint = make_endpoint(receiver.url)
    receiver.secrets = [endpoint.secret]
    token = Token.objects.get(datasource=datasource)
    monkeypatch.setattr(events, "enqueue", lambda ids: None)  # never handed on

    provider.fail("503-html")
    assert tokens.refresh_token(token, force=True).outcome == "transient"
    provider.recover()
    assert tokens.refresh_token(token, force=True).outcome == "refreshed"
    provider.revoke_refresh_tokens()
    assert tokens.refresh_token(token, force=True).outcome == "reauthorization"
    assert authorize_through_admin(staff_client, datasource).status_code == 302

    expected = [
        "token.refresh_failed",
        "datasource.recovered",
        "token.refresh_failed",
        "datasource.reauthorization_required",
        "datasource.authorized",
        "datasource.recovered",
    ]
    rows = WebhookDelivery.objects.order_by("pk")
    assert [r.event_type for r in rows] == expected
    assert {(r.status, r.attempts) for r in rows} == {(DeliveryStatus.PENDING, 0)}
    kinds = set(TokenEvent.objects.values_list("kind", flat=True))
    assert {"refresh_failed", "refreshed", "reauthorization_required", "authorized"} <= kinds
    assert receiver.requests == []

    monkeypatch.undo()
    sweep_until(lambda: len(receiver.verified()) == len(expected), what="the sweep")
    assert sorted(r.json["type"] for r in receiver.verified()) == sorted(expected)
    assert set(WebhookDelivery.objects.values_list("status", flat=True)) == {"delivered"}


@pytest.mark.django_db(transaction=True)
def test_a_failing_outbox_write_never_costs_the_token_change(
    fake_provider,  # noqa: F811
    staff_client,
    receiver,  # noqa: F811
    monkeypatch,
    caplog,
):
    """A project's receiver raises: the rotated token is stored and the webhook queued all the
    same. The outbox cannot be written: the rotated token is stored all the same, without its
    event row and deliveries (both or neither). The log names only the error's type."""
    provider = fake_provider("rfc")
    datasource = connect(provider, staff_client)
    make_endpoint(receiver.url)
    token = Token.objects.get(datasource=datasource)

    def fail_then_recover() -> tuple[str | None, int]:
        provider.fail("503-html")
        tokens.refresh_token(token, force=True)
        provider.recover()
        token.refresh_from_db()
        old = token.refresh_token
        with caplog.at_level(logging.ERROR, logger="datasources"):
            assert tokens.refresh_token(token, force=True).outcome == "refreshed"
        token.refresh_from_db()
        assert token.failure_count == 0 and token.refresh_token != old
        return old, WebhookDelivery.objects.filter(event_type="datasource.recovered").count()

    def broken_receiver(**kwargs):
        raise RuntimeError("a project's bug: s3cr3t")

    token_refreshed.connect(broken_receiver, dispatch_uid="test-broken")
    try:
        assert fail_then_recover()[1] == 1
    finally:
        token_refreshed.disconnect(dispatch_uid="test-broken")

    def disk_full(*args, **kwargs):
        raise DatabaseError("disk full at /secret/path")

    monkeypatch.setattr(lifecycle, "record_event", disk_full)
    refreshed = TokenEvent.objects.filter(kind="refreshed").count()
    assert fail_then_recover()[1] == 1  # no second "recovered": the outbox went as a whole
    assert TokenEvent.objects.filter(kind="refreshed").count() == refreshed
    # Ours name the error's type only (Django's dispatcher logs a receiver's exception itself).
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("datasources"))
    assert "RuntimeError" in logged and "DatabaseError" in logged
    assert "secret" not in logged and "s3cr3t" not in logged


# --- Retry now and the claim -------------------------------------------------------------------


def _given_up(endpoint, monkeypatch) -> WebhookDelivery:
    """A delivery that failed and gave up (its task never ran: nothing was sent yet)."""
    with monkeypatch.context() as patched:
        patched.setattr(events, "enqueue", lambda ids: None)
        row = endpoints.send_test(endpoint)
    WebhookDelivery.objects.filter(pk=row.pk).update(
        status=DeliveryStatus.GAVE_UP, attempts=1, next_attempt_at=None, last_error="HTTP 500"
    )
    return row


@pytest.mark.django_db(transaction=True)
def test_retry_now_cannot_double_send_a_delivery_a_worker_is_sending(
    receiver,  # noqa: F811
    monkeypatch,
):
    """Retry now, then a worker sends the delivery and the receiver holds that request. Meanwhile
    Retry now is clicked again from four threads at once, each also running the task that
    click enqueues, and two more workers try the same row: nobody else sends it. Released, the
    receiver got exactly one request and the row one attempt."""
    endpoint = make_endpoint(receiver.url)
    receiver.secrets = [endpoint.secret]
    receiver.script = ["hold"]
    row = _given_up(endpoint, monkeypatch)
    chosen = WebhookDelivery.objects.filter(pk=row.pk)
    monkeypatch.setattr(events, "enqueue", lambda ids: None)  # the tasks are run by hand below
    assert delivery.retry_now(chosen) == delivery.Retried(started=1, busy=0)

    def in_thread(work):
        def run():
            try:
                return work()
            finally:
                connection.close()

        return run

    with ThreadPoolExecutor(7) as pool:
        worker = pool.submit(in_thread(lambda: delivery.attempt(row.pk)))
        wait_until(lambda: len(receiver.requests) == 1, 10, what="the worker's request")

        def click_and_run() -> tuple:
            retried = delivery.retry_now(WebhookDelivery.objects.filter(pk=row.pk))
            return retried, delivery.attempt(row.pk)

        racers = [pool.submit(in_thread(click_and_run)) for _ in range(4)]
        racers += [pool.submit(in_thread(lambda: delivery.attempt(row.pk))) for _ in range(2)]
        results = [r.result(timeout=30) for r in racers]
        assert len(receiver.requests) == 1
        receiver.release()
        assert worker.result(timeout=30) == DeliveryStatus.DELIVERED

    busy = delivery.Retried(started=0, busy=1)
    assert results == [(busy, "skipped")] * 4 + ["skipped"] * 2
    assert len(receiver.verified()) == 1
    row.refresh_from_db()
    assert (row.status, row.attempts, row.claimed_until) == (DeliveryStatus.DELIVERED, 2, None)
    assert row.attempt_log.count() == 1
    tasks.sweep_webhooks()
    assert len(receiver.requests) == 1


@pytest.mark.django_db
def test_the_admin_says_a_delivery_is_being_sent_now(staff_client, monkeypatch):
    """Retry now on a delivery a worker holds: nothing is retried, and the admin says why; on
    one nobody holds it retries as before."""
    endpoint = make_endpoint("https://hooks.example.com/in")
    held, free = _given_up(endpoint, monkeypatch), _given_up(endpoint, monkeypatch)
    WebhookDelivery.objects.filter(pk=held.pk).update(
        status=DeliveryStatus.RETRYING, next_attempt_at=timezone.now()
    )
    assert delivery.claim(held.pk) is not None  # a worker is sending it
    monkeypatch.setattr(events, "enqueue", lambda ids: None)
    url = "/admin/datasources/webhookdelivery/"

    def click(*rows: WebhookDelivery) -> str:
        form = {"action": "retry_now", "_selected_action": [r.pk for r in rows], "index": 0}
        answer = staff_client.post(url, form, follow=True)
        assert answer.status_code == 200
        return answer.content.decode()

    page = click(held)
    assert "1 delivery is being sent now: not retried" in page
    assert "Retrying" not in page
    held.refresh_from_db()
    assert held.status == DeliveryStatus.RETRYING and held.claimed_until > timezone.now()
    page = click(held, free)
    assert "Retrying 1 delivery now." in page and "1 delivery is being sent now" in page
    free.refresh_from_db()
    assert free.status == DeliveryStatus.RETRYING and free.next_attempt_at <= timezone.now()
    page = click(free)
    assert "Retrying 1 delivery now." in page and "being sent now" not in page
