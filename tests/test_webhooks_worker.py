"""Webhooks delivered by real Celery workers (with beat): an event raised in the worker by a
refresh failing with invalid_grant at the fake provider, retried until a failing receiver
answers; and a worker killed in the middle of an attempt, whose event is sent by the next."""

from __future__ import annotations

import os
import signal
from datetime import timedelta

import pytest
from django.utils import timezone

from datasources import tasks
from datasources.models import DeliveryStatus, Token, TokenStatus, WebhookDelivery, WebhookEvent
from datasources.webhooks import endpoints

from .fakeprovider import connect, fake_provider  # noqa: F401
from .test_webhooks import make_endpoint
from .test_worker import wait_for, workers  # noqa: F401
from .webhook_receiver import receiver  # noqa: F401

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]

FAST = {
    "DATASOURCES_WEBHOOK_BACKOFF_BASE": "0.2",
    "DATASOURCES_WEBHOOK_SWEEP_INTERVAL": "1",
}


def test_worker_sends_the_events_of_a_dead_refresh_token_through_a_failing_receiver(
    fake_provider,  # noqa: F811
    staff_client,
    receiver,  # noqa: F811
    workers,  # noqa: F811
):
    provider = fake_provider("rfc")
    datasource = connect(provider, staff_client)
    endpoint = make_endpoint(
        receiver.url, event_types=[WebhookEvent.REAUTHORIZATION_REQUIRED], name="ops"
    )
    receiver.secrets = [endpoint.secret]
    receiver.script = [500, "reset"]
    provider.revoke_refresh_tokens()
    soon = timezone.now() + timedelta(seconds=5)  # inside the workers' refresh margin
    Token.objects.filter(datasource=datasource).update(expires_at=soon, refresh_due_at=soon)

    group = workers(1, env=FAST)
    wait_for(
        lambda: WebhookDelivery.objects.filter(status=DeliveryStatus.DELIVERED).exists(),
        60,
        group,
    )
    assert Token.objects.get(datasource=datasource).status == TokenStatus.NEEDS_REAUTHORIZATION
    row = WebhookDelivery.objects.get()
    assert (row.event_type, row.attempts) == ("datasource.reauthorization_required", 3)
    assert [r.answer for r in receiver.requests] == ["500", "reset", "ok"]
    assert all(r.verified for r in receiver.requests)
    assert {r.event_id for r in receiver.requests} == {row.event_id}
    assert receiver.requests[-1].json["data"]["error"]["code"] == "invalid_grant"
    assert list(row.attempt_log.values_list("status_code", flat=True)) == [500, None, 204]


def test_an_attempt_cut_by_a_killed_worker_is_sent_again(receiver, workers, monkeypatch):  # noqa: F811
    endpoint = make_endpoint(receiver.url)
    receiver.secrets = [endpoint.secret]
    receiver.script = ["hang"]

    def lost(*args, **kwargs):
        raise ConnectionError("no broker here: the workers' sweep sends it")

    monkeypatch.setattr(tasks.deliver_webhook, "apply_async", lost)
    row = endpoints.send_test(endpoint)
    env = {
        **FAST,
        "DATASOURCES_WEBHOOK_TIMEOUT": "30",
        "DATASOURCES_WEBHOOK_CLAIM_SECONDS": "3",
    }
    first = workers(1, env=env)
    wait_for(lambda: len(receiver.requests) == 1, 60, first)  # the attempt hangs there
    os.killpg(first.procs[0].pid, signal.SIGKILL)
    first.procs[0].wait(10)
    assert WebhookDelivery.objects.get(pk=row.pk).status == DeliveryStatus.PENDING

    second = workers(1, env=env)
    wait_for(
        lambda: WebhookDelivery.objects.get(pk=row.pk).status == DeliveryStatus.DELIVERED,
        60,
        second,
    )
    assert [r.answer for r in receiver.requests] == ["hang", "ok"]
    assert receiver.requests[0].event_id == receiver.requests[1].event_id == row.event_id
    assert all(r.verified for r in receiver.requests)
    row.refresh_from_db()
    assert row.attempts == 1  # the killed attempt left no record; the event was not lost
