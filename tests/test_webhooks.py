"""Webhooks: signed events from real token flows (the fake provider), delivered over HTTP to a
local receiver that verifies each signature with the Standard Webhooks reference library."""

from __future__ import annotations

import json
import socket
import time
from datetime import UTC, datetime, timedelta

import pytest
import requests
from django.utils import timezone
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from datasources import tasks, tokens
from datasources.authserver import outbound
from datasources.models import (
    DeliveryStatus,
    Token,
    TokenStatus,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookEvent,
)
from datasources.webhooks import delivery, endpoints, events, signing
from datasources.webhooks.delivery import Result

from .conftest import SECRET, make_datasource
from .fakeprovider import connect, fake_provider, wait_until  # noqa: F401
from .webhook_receiver import Receiver, receiver  # noqa: F401

ALL = list(WebhookEvent.values)


def make_endpoint(url: str, *, datasource=None, event_types=None, name="hooks") -> WebhookEndpoint:
    endpoint = WebhookEndpoint(
        name=name, url=url, datasource=datasource, event_types=event_types or ALL
    )
    endpoints.assign_secret(endpoint)
    endpoint.full_clean()
    endpoint.save()
    return endpoint


@pytest.fixture
def eager():
    """Deliveries enqueued on commit are attempted at once in this process (a retry's task is
    then skipped, its time not come: the sweep, called by the test, sends it)."""
    from config.celery import app

    before = app.conf.task_always_eager
    app.conf.task_always_eager = True
    yield app
    app.conf.task_always_eager = before


def sweep_until(predicate, timeout: float = 15.0, what: str = ""):
    """Run the webhook sweep (beat's job) until ``predicate`` holds."""

    def step():
        tasks.sweep_webhooks()
        return predicate()

    return wait_until(step, timeout, interval=0.05, what=what)


# --- signing -------------------------------------------------------------------------------


def test_signatures_verify_with_the_reference_library_and_fail_when_tampered():
    secret = signing.new_secret()
    assert secret.startswith("whsec_")
    body = b'{"type":"datasource.authorized"}'
    now = int(time.time())
    headers = signing.headers("msg_1", now, body, [secret])
    assert headers["webhook-signature"].startswith("v1,")
    assert Webhook(secret).verify(body, headers) == {"type": "datasource.authorized"}

    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body.replace(b"authorized", b"recovered"), headers)
    old = signing.headers("msg_1", now - 600, body, [secret])
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(secret).verify(body, old)
    with pytest.raises(WebhookVerificationError):
        Webhook(signing.new_secret()).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body, {**headers, "webhook-id": "msg_2"})
    # A rotation signs with both secrets: a receiver holding either one verifies.
    newer = signing.new_secret()
    both = signing.headers("msg_1", now, body, [newer, secret])
    assert len(both["webhook-signature"].split(" ")) == 2
    Webhook(secret).verify(body, both)
    Webhook(newer).verify(body, both)


# --- decisions -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "result", "status", "delay"),
    [
        (1, Result(200), DeliveryStatus.DELIVERED, None),
        (1, Result(204), DeliveryStatus.DELIVERED, None),
        (12, Result(299), DeliveryStatus.DELIVERED, None),
        (1, Result(500, "HTTP 500"), DeliveryStatus.RETRYING, 15),
        (2, Result(error="timeout"), DeliveryStatus.RETRYING, 30),
        (3, Result(302, "HTTP 302"), DeliveryStatus.RETRYING, 60),
        (4, Result(404, "HTTP 404"), DeliveryStatus.RETRYING, 120),
        (11, Result(503, "HTTP 503"), DeliveryStatus.RETRYING, 3600),  # capped
        (1, Result(429, "HTTP 429", retry_after=100), DeliveryStatus.RETRYING, 100),
        (1, Result(429, "HTTP 429", retry_after=99999), DeliveryStatus.RETRYING, 3600),
        (5, Result(429, "HTTP 429", retry_after=1), DeliveryStatus.RETRYING, 240),
        (1, Result(410, "HTTP 410"), DeliveryStatus.GAVE_UP, None),
        (12, Result(500, "HTTP 500"), DeliveryStatus.GAVE_UP, None),
        (13, Result(error="connection refused"), DeliveryStatus.GAVE_UP, None),
    ],
)
def test_next_step(attempt, result, status, delay):
    step = delivery.next_step(attempt, result, max_attempts=12, rand=1.0)
    assert (step.status, step.delay) == (status, delay)


def test_backoff_jitter_stays_within_a_fifth():
    low = delivery.next_step(3, Result(500), 12, rand=0.8).delay
    high = delivery.next_step(3, Result(500), 12, rand=1.2).delay
    assert (low, high) == pytest.approx((48, 72))


@pytest.mark.parametrize(
    ("message", "transient", "code", "kind"),
    [
        ("invalid_grant: refresh token is not valid", False, "invalid_grant", "permanent"),
        ("invalid_client", False, "invalid_client", "permanent"),
        ("no_refresh_token: nothing to renew with", False, "no_refresh_token", "permanent"),
        ("Configuration error: invalid_scope: bad", True, "invalid_scope", "configuration"),
        ("server_error: try later", True, "server_error", "transient"),
        ("Token endpoint answered HTTP 503", True, "unavailable", "transient"),
        # An unknown code could be anything a provider put there: never passed on.
        ("eyJhbGciOi_secret_looking: x", True, "unavailable", "transient"),
        ("custom_dead_token: gone", False, "error", "permanent"),
        ("", True, "unavailable", "transient"),
    ],
)
def test_error_code_and_kind(message, transient, code, kind):
    assert events.error_code(message, transient=transient) == code
    assert events.failure_kind(message, transient=transient) == kind


@pytest.mark.parametrize(
    ("status", "failures", "failing"),
    [
        (TokenStatus.ACTIVE, 0, False),
        (TokenStatus.ACTIVE, 1, True),  # a transient failure since the last success
        (TokenStatus.ACTIVE, 5, True),
        (TokenStatus.REFRESHING, 0, False),
        (TokenStatus.NOT_AUTHORIZED, 0, False),  # never authorized or disconnected: not failing
        (TokenStatus.NEEDS_REAUTHORIZATION, 0, True),
        (TokenStatus.NEEDS_REAUTHORIZATION, 3, True),
    ],
)
def test_failing_means_needing_reauthorization_or_failures_since_the_last_success(
    status, failures, failing
):
    assert Token(status=status, failure_count=failures).is_failing is failing


# --- real flows, real HTTP -----------------------------------------------------------------


def _everything_stored() -> str:
    rows = [json.dumps(d.payload) + d.last_error for d in WebhookDelivery.objects.all()]
    rows += [a.error for a in WebhookAttempt.objects.all()]
    return "\n".join(rows)


def _assert_secret_free(texts: list[str], secrets: list[str]) -> None:
    for secret in secrets:
        assert secret
        for text in texts:
            assert secret not in text


@pytest.mark.django_db(transaction=True)
def test_a_dead_refresh_token_and_the_reauthorization_reach_the_receivers(
    fake_provider,  # noqa: F811
    staff_client,
    receiver,  # noqa: F811
    eager,
    settings,
):
    """invalid_grant at the provider: token.refresh_failed and
    datasource.reauthorization_required, signed, to a project-wide endpoint and to a flaky
    datasource endpoint (500, then a reset connection, then 204: three attempts counted at the
    receiver and in the admin's rows); re-authorizing sends authorized + recovered. No secret,
    token or provider text in any payload, attempt row or received body."""
    settings.DATASOURCES = {**settings.DATASOURCES, "WEBHOOK_BACKOFF_BASE": 0.05}
    provider = fake_provider("rfc")
    datasource = connect(provider, staff_client)
    token = Token.objects.get(datasource=datasource)
    stored = {"access": token.access_token, "refresh": token.refresh_token}

    flaky = Receiver()
    try:
        project = make_endpoint(receiver.url, name="project")
        scoped = make_endpoint(
            flaky.url,
            datasource=datasource,
            event_types=[WebhookEvent.REAUTHORIZATION_REQUIRED],
            name="flaky",
        )
        receiver.secrets = [project.secret]
        flaky.secrets = [scoped.secret]
        flaky.script = [500, "reset"]
        other = make_datasource(slug="other", name="Other")
        make_endpoint(receiver.url, datasource=other, name="other-only")  # must get nothing

        provider.revoke_refresh_tokens()
        result = tokens.refresh_token(token, force=True)
        assert result.outcome == "reauthorization"

        got = wait_until(lambda: len(receiver.requests) >= 2, 10, what="two events")
        assert [r.json["type"] for r in got and receiver.requests] == [
            "token.refresh_failed",
            "datasource.reauthorization_required",
        ]
        assert all(r.verified for r in receiver.requests)
        failed, reauth = (r.json for r in receiver.requests)
        assert failed["data"]["error"] == {"code": "invalid_grant", "kind": "permanent"}
        assert failed["data"]["will_retry"] is False
        assert reauth["data"]["datasource"] == {
            "id": datasource.pk,
            "slug": datasource.slug,
            "name": datasource.name,
        }
        assert reauth["data"]["token"]["status"] == "needs_reauthorization"
        assert reauth["id"] == receiver.requests[1].event_id

        # The flaky receiver: the first attempt (500) happened on commit; the sweep sends the
        # retries when due.
        row = WebhookDelivery.objects.get(endpoint=scoped)
        sweep_until(
            lambda: WebhookDelivery.objects.get(pk=row.pk).status == DeliveryStatus.DELIVERED,
            what="the flaky receiver's delivery",
        )
        assert [r.answer for r in flaky.requests] == ["500", "reset", "ok"]
        assert all(r.verified for r in flaky.requests)
        assert len({r.event_id for r in flaky.requests}) == 1  # one event, three attempts
        row.refresh_from_db()
        assert (row.attempts, row.last_status_code, row.last_error) == (3, 204, "")
        attempts = list(row.attempt_log.values_list("number", "status_code", "error", "delivered"))
        assert attempts == [
            (1, 500, "HTTP 500", False),
            (2, None, "connection closed without an answer", False),
            (3, 204, "", True),
        ]

        # Re-authorization: authorized + recovered, to the project-wide endpoint only.
        connect_again = staff_client.get(
            f"/admin/datasources/datasource/{datasource.pk}/authorize/"
        )
        assert connect_again.status_code == 302
        from .fakeprovider import authorize_through_admin

        assert authorize_through_admin(staff_client, datasource).status_code == 302
        wait_until(lambda: len(receiver.requests) >= 4, 10, what="authorized + recovered")
        assert [r.json["type"] for r in receiver.requests[2:]] == [
            "datasource.authorized",
            "datasource.recovered",
        ]
        assert receiver.requests[3].json["data"]["token"]["status"] == "active"
        assert len(flaky.requests) == 3
        assert not WebhookDelivery.objects.filter(endpoint__name="other-only").exists()

        token.refresh_from_db()
        secrets = [
            SECRET,
            stored["access"],
            stored["refresh"],
            token.access_token,
            token.refresh_token,
            project.secret,
            scoped.secret,
            project.secret.removeprefix("whsec_"),
        ]
        bodies = [r.body.decode() for r in receiver.requests + flaky.requests]
        _assert_secret_free([_everything_stored(), *bodies], secrets)
        # The provider's description is free text: only the code is passed on.
        assert "not valid" not in _everything_stored() + "".join(bodies)
    finally:
        flaky.stop()


@pytest.mark.django_db(transaction=True)
def test_an_outage_sends_one_failure_then_recovered(
    fake_provider,  # noqa: F811
    staff_client,
    receiver,  # noqa: F811
    eager,
):
    """Repeated transient failures with the same error send token.refresh_failed once; the
    first success after them sends datasource.recovered; a success after a success sends
    nothing."""
    provider = fake_provider("rfc")
    datasource = connect(provider, staff_client)
    endpoint = make_endpoint(receiver.url)
    receiver.secrets = [endpoint.secret]
    token = Token.objects.get(datasource=datasource)

    provider.fail("503-html")
    for _ in range(3):
        assert tokens.refresh_token(token, force=True).outcome == "transient"
        token.refresh_from_db()
    assert token.failure_count == 3
    provider.recover()
    assert tokens.refresh_token(token, force=True).outcome == "refreshed"
    token.refresh_from_db()
    assert tokens.refresh_token(token, force=True).outcome == "refreshed"

    wait_until(lambda: len(receiver.requests) >= 2, 10, what="two events")
    assert [r.json["type"] for r in receiver.requests] == [
        "token.refresh_failed",
        "datasource.recovered",
    ]
    failed = receiver.requests[0].json["data"]
    assert failed["error"] == {"code": "unavailable", "kind": "transient"}
    assert failed["will_retry"] is True
    assert failed["token"]["consecutive_failures"] == 1
    assert WebhookDelivery.objects.count() == 2
    assert all(r.verified for r in receiver.requests)


@pytest.mark.django_db(transaction=True)
def test_timeouts_refusals_redirects_and_giving_up(receiver, eager, settings):  # noqa: F811
    """Each attempt is bounded (WEBHOOK_TIMEOUT), a redirect is not followed, a refused
    connection is retried, and after WEBHOOK_MAX_ATTEMPTS the delivery gives up; "Retry now"
    gives it one more attempt."""
    settings.DATASOURCES = {
        **settings.DATASOURCES,
        "WEBHOOK_TIMEOUT": 0.5,
        "WEBHOOK_BACKOFF_BASE": 0.01,
        "WEBHOOK_MAX_ATTEMPTS": 3,
    }
    endpoint = make_endpoint(receiver.url)
    receiver.secrets = [endpoint.secret]
    receiver.script = ["hang", 307, 500, 500]
    started = time.monotonic()
    row = endpoints.send_test(endpoint)
    sweep_until(
        lambda: WebhookDelivery.objects.get(pk=row.pk).status == DeliveryStatus.GAVE_UP,
        what="giving up",
    )
    assert [r.answer for r in receiver.requests] == ["hang", "307", "500"]
    errors = list(WebhookAttempt.objects.filter(delivery=row).values_list("error", flat=True))
    assert errors == ["timeout", "HTTP 307 (redirects are not followed)", "HTTP 500"]
    hung = WebhookAttempt.objects.get(delivery=row, number=1)
    assert 400 <= hung.duration_ms < 3000
    assert time.monotonic() - started < 10
    receiver.release()

    row.refresh_from_db()
    assert row.next_attempt_at is None
    tasks.sweep_webhooks()
    assert len(receiver.requests) == 3  # given up: the sweep leaves it alone

    assert delivery.retry_now(WebhookDelivery.objects.filter(pk=row.pk)).started == 1
    wait_until(lambda: len(receiver.requests) == 4, 5, what="the manual retry")
    row.refresh_from_db()
    assert (row.status, row.attempts, row.last_status_code) == (DeliveryStatus.GAVE_UP, 4, 500)
    delivery.retry_now(WebhookDelivery.objects.filter(pk=row.pk))
    wait_until(lambda: len(receiver.requests) == 5, 5, what="the second manual retry")
    row.refresh_from_db()
    assert (row.status, row.attempts, row.last_status_code) == (DeliveryStatus.DELIVERED, 5, 204)
    assert all(r.verified for r in receiver.requests)

    # Nothing listens on this port: refused, and retried.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    closed = make_endpoint(f"http://127.0.0.1:{port}/hooks", name="closed")
    row = endpoints.send_test(closed)
    row.refresh_from_db()
    assert (row.status, row.last_error) == (DeliveryStatus.RETRYING, "connection refused")


@pytest.mark.django_db(transaction=True)
def test_a_lost_task_is_sent_by_the_sweep_and_a_claimed_row_is_not_sent_twice(
    receiver,  # noqa: F811
    monkeypatch,
    settings,
):
    """No broker at commit time (the task is lost): the row waits and the sweep sends it. A
    row held by a worker (claimed) is not sent again until the claim lapses."""
    settings.DATASOURCES = {**settings.DATASOURCES, "WEBHOOK_CLAIM_SECONDS": 60}
    endpoint = make_endpoint(receiver.url)
    receiver.secrets = [endpoint.secret]

    def broker_down(*args, **kwargs):
        raise ConnectionError("broker down")

    monkeypatch.setattr(tasks.deliver_webhook, "apply_async", broker_down)
    row = endpoints.send_test(endpoint)
    assert WebhookDelivery.objects.get(pk=row.pk).status == DeliveryStatus.PENDING
    assert receiver.requests == []
    monkeypatch.undo()

    claimed = delivery.claim(row.pk)  # a worker took it ... and died
    assert claimed is not None
    assert delivery.claim(row.pk) is None
    assert delivery.due() == []
    lapsed = timezone.now() - timedelta(seconds=1)  # the claim lapsed
    WebhookDelivery.objects.filter(pk=row.pk).update(next_attempt_at=lapsed, claimed_until=lapsed)
    from config.celery import app

    app.conf.task_always_eager = True
    try:
        assert tasks.sweep_webhooks() == 1
    finally:
        app.conf.task_always_eager = False
    row.refresh_from_db()
    assert (row.status, row.attempts) == (DeliveryStatus.DELIVERED, 1)
    assert len(receiver.verified()) == 1
    payload = receiver.requests[0].json
    assert payload["type"] == "webhook.test"
    assert datetime.fromisoformat(payload["timestamp"]) <= datetime.now(UTC)


@pytest.mark.django_db(transaction=True)
def test_rotation_signs_with_both_secrets_during_the_grace(receiver, eager):  # noqa: F811
    endpoint = make_endpoint(receiver.url)
    old = endpoint.secret
    new = endpoints.rotate_secret(endpoint)
    assert new != old and new.startswith("whsec_")
    endpoint.refresh_from_db()
    assert endpoint.secret == new
    receiver.secrets = [old]  # a receiver not yet switched
    endpoints.send_test(endpoint)
    receiver.secrets = [new]
    endpoints.send_test(endpoint)
    assert [r.verified for r in receiver.requests] == [True, True]
    WebhookEndpoint.objects.filter(pk=endpoint.pk).update(
        previous_secret_expires_at=timezone.now() - timedelta(seconds=1)
    )
    receiver.secrets = [old]
    endpoints.send_test(endpoint)
    assert receiver.requests[2].verified is False  # the grace is over


@pytest.mark.django_db
def test_endpoint_validation_and_nothing_queued_without_endpoints():
    endpoint = WebhookEndpoint(name="x", url="http://example.com/hooks", event_types=ALL)
    endpoints.assign_secret(endpoint)
    with pytest.raises(Exception, match="url"):
        endpoint.full_clean()  # plain http to a non-loopback host
    endpoint.url = "https://example.com/hooks"
    endpoint.event_types = ["token.refresh_failed", "made.up"]
    with pytest.raises(Exception, match="event_types"):
        endpoint.full_clean()
    datasource = make_datasource()
    assert events.emit(WebhookEvent.DATASOURCE_AUTHORIZED, datasource, {}) == []
    inactive = make_endpoint("https://example.com/hooks")
    WebhookEndpoint.objects.filter(pk=inactive.pk).update(active=False)
    assert events.emit(WebhookEvent.DATASOURCE_AUTHORIZED, datasource, {}) == []
    assert "whsec" not in repr(inactive) + str(inactive)


@pytest.mark.django_db(transaction=True)
def test_a_rolled_back_change_sends_nothing(receiver, eager):  # noqa: F811
    from django.db import transaction

    endpoint = make_endpoint(receiver.url)
    receiver.secrets = [endpoint.secret]
    datasource = make_datasource()
    with pytest.raises(RuntimeError), transaction.atomic():
        events.emit(WebhookEvent.DATASOURCE_AUTHORIZED, datasource, {"n": 1})
        assert WebhookDelivery.objects.count() == 1  # written in the caller's transaction
        raise RuntimeError("the change that caused the event failed")
    assert WebhookDelivery.objects.count() == 0
    with transaction.atomic():
        events.emit(WebhookEvent.DATASOURCE_AUTHORIZED, datasource, {"n": 2})
        assert receiver.requests == []  # not before the commit
    assert [r.json["data"] for r in receiver.verified()] == [{"n": 2}]


@pytest.mark.django_db
def test_secrets_are_ciphertext_at_rest_and_rotate_with_the_keys(settings):
    import io

    from django.core.management import call_command
    from django.db import connection

    from datasources.encryption import encrypted_fields

    assert (WebhookEndpoint, ["previous_secret", "secret"]) in [
        (model, sorted(names)) for model, names in encrypted_fields()
    ]
    endpoint = make_endpoint("https://example.com/hooks")
    endpoints.rotate_secret(endpoint)

    def raw() -> tuple[bytes, ...]:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT secret, previous_secret FROM datasources_webhookendpoint WHERE id = %s",
                [endpoint.pk],
            )
            return tuple(bytes(value) for value in cursor.fetchone())

    before = raw()
    assert all(value and b"whsec" not in value for value in before)
    new_key = "Xq0kJ6xQv0mW8c3cV3m0u9S1v8pX0d6l2c3k4j5h6g0="
    settings.FERNET_KEYS = [new_key, *settings.FERNET_KEYS]
    call_command("rotate_encryption_keys", stdout=io.StringIO())
    assert raw() != before
    fresh = WebhookEndpoint.objects.get(pk=endpoint.pk)
    assert (fresh.secret, fresh.previous_secret) == (endpoint.secret, endpoint.previous_secret)


@pytest.mark.django_db
def test_admin_buttons_need_post_and_change_permission(client, django_user_model, staff_client):
    from django.contrib.auth.models import Permission

    endpoint = make_endpoint("https://example.com/hooks")
    base = f"/admin/datasources/webhookendpoint/{endpoint.pk}"
    assert staff_client.get(f"{base}/rotate/").status_code == 405
    assert staff_client.get(f"{base}/test/").status_code == 405
    WebhookEndpoint.objects.filter(pk=endpoint.pk).update(active=False)
    answer = staff_client.post(f"{base}/test/", follow=True)
    assert "not active" in answer.content.decode() and not WebhookDelivery.objects.exists()
    viewer = django_user_model.objects.create_user("viewer", password="x", is_staff=True)
    viewer.user_permissions.add(
        Permission.objects.get(codename="view_webhookendpoint"),
        Permission.objects.get(codename="view_webhookdelivery"),
    )
    client.force_login(viewer)
    secret = endpoint.secret
    assert client.post(f"{base}/rotate/").status_code == 403
    assert client.post(f"{base}/test/").status_code == 403
    endpoint.refresh_from_db()
    assert endpoint.secret == secret and not WebhookDelivery.objects.exists()
    page = client.get(f"{base}/change/").content.decode()
    assert "Rotate secret" not in page and secret not in page
    # A secret page reached without a held secret shows nothing.
    assert secret not in client.get(f"{base}/secret/").content.decode()
    # No "Retry now" for a user who may not change endpoints.
    deliveries = client.get("/admin/datasources/webhookdelivery/").content.decode()
    assert "retry_now" not in deliveries


def _caused(outer: BaseException, inner: BaseException) -> BaseException:
    outer.__cause__ = inner
    return outer


URL = "https://hooks.example.com/services/T000/B000/s3cr3t-path-token"


@pytest.mark.parametrize(
    ("error", "words"),
    [
        (outbound.DeadlineExceeded(URL), "timeout"),
        (requests.ReadTimeout(URL), "timeout"),
        (requests.exceptions.SSLError(URL), "TLS error"),
        (
            _caused(requests.ConnectionError(URL), ConnectionRefusedError(111, URL)),
            "connection refused",
        ),
        (
            _caused(requests.ConnectionError(URL), ConnectionResetError(104, URL)),
            "connection closed without an answer",
        ),
        (requests.ConnectionError(URL), "connection failed"),
        (OSError(URL), "connection failed"),
    ],
)
def test_failures_are_described_in_fixed_words_never_the_exception_text(error, words):
    assert delivery.describe(error) == words


def test_claim_shorter_than_the_timeout_is_flagged(settings):
    from datasources.checks import check_webhook_timing

    assert check_webhook_timing() == []
    settings.DATASOURCES = {**settings.DATASOURCES, "WEBHOOK_TIMEOUT": 90.0}
    assert [w.id for w in check_webhook_timing()] == ["datasources.W020"]


@pytest.mark.django_db(transaction=True)
def test_short_retries_get_a_countdown_and_long_ones_wait_for_the_sweep(
    receiver,  # noqa: F811
    monkeypatch,
    settings,
):
    settings.DATASOURCES = {
        **settings.DATASOURCES,
        "WEBHOOK_SWEEP_INTERVAL": 60,
        "WEBHOOK_BACKOFF_BASE": 40.0,
    }
    endpoint = make_endpoint(receiver.url)
    receiver.script = [500, 500]
    sent: list[dict] = []
    monkeypatch.setattr(
        tasks.deliver_webhook, "apply_async", lambda args, **kw: sent.append({"id": args[0], **kw})
    )
    row = endpoints.send_test(endpoint)
    assert sent == [{"id": row.pk}]  # on commit
    assert delivery.attempt(row.pk) == DeliveryStatus.RETRYING  # 40 s +/- 20%: a countdown
    assert sent[1]["id"] == row.pk and 32 <= sent[1]["countdown"] <= 48
    WebhookDelivery.objects.filter(pk=row.pk).update(next_attempt_at=timezone.now())
    assert delivery.attempt(row.pk) == DeliveryStatus.RETRYING  # 80 s +/- 20%: the sweep's
    assert len(sent) == 2
    row.refresh_from_db()
    wait = (row.next_attempt_at - timezone.now()).total_seconds()
    assert 60 < wait <= 96
    assert delivery.due() == []
    assert delivery.due(now=row.next_attempt_at) == [row.pk]
