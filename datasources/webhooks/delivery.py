"""Sending deliveries: one bounded, signed attempt at a time, retried with backoff.

A delivery row is claimed before each attempt by moving its ``claimed_until`` and
``next_attempt_at`` past the attempt's deadline (a conditional UPDATE: one sender at a time,
whoever enqueued it; Retry now leaves a claimed row alone). A
task lost in the broker or a worker killed mid-attempt leaves a row that falls due again
when the claim lapses, and the sweep (beat) sends it: an event is never lost, at the cost of
a rare second attempt that receivers de-duplicate by ``webhook-id``.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from http.client import RemoteDisconnected

import requests
import urllib3
from django.db import transaction
from django.db.models import Q, QuerySet
from django.utils import timezone

from ..authserver import outbound
from ..authserver.outbound import parse_retry_after
from ..conf import app_settings
from ..models import DeliveryStatus, WebhookAttempt, WebhookDelivery
from . import signing

logger = logging.getLogger(__name__)

OPEN = (DeliveryStatus.PENDING, DeliveryStatus.RETRYING)
_local = threading.local()


@dataclass(frozen=True)
class Result:
    """What one attempt got: an HTTP status, or an error from a fixed vocabulary."""

    status_code: int | None = None
    error: str = ""
    retry_after: float | None = None
    duration_ms: int = 0

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


@dataclass(frozen=True)
class Step:
    status: str
    delay: float | None = None  # seconds until the next attempt (RETRYING only)


def next_step(attempt: int, result: Result, max_attempts: int, rand: float = 1.0) -> Step:
    """After attempt number ``attempt``: delivered, another try (after a backoff), or give up.

    Any answer but a 2xx is retried (receivers that fail return 5xx, time out or are down for a
    deploy), except 410 Gone, the Standard Webhooks way to say "stop sending". ``rand`` is the
    jitter factor (0.8 to 1.2). A Retry-After is honoured up to WEBHOOK_BACKOFF_MAX.
    """
    if result.delivered:
        return Step(DeliveryStatus.DELIVERED)
    if result.status_code == 410 or attempt >= max_attempts:
        return Step(DeliveryStatus.GAVE_UP)
    ceiling = float(app_settings.WEBHOOK_BACKOFF_MAX)
    delay = min(ceiling, app_settings.WEBHOOK_BACKOFF_BASE * 2 ** max(0, attempt - 1)) * rand
    if result.retry_after is not None:
        delay = max(delay, min(result.retry_after, ceiling))
    return Step(DeliveryStatus.RETRYING, delay)


def describe(err: BaseException) -> str:
    """A failed call in a few fixed words: never the exception's text, which can carry the URL
    (where receivers often put a secret) or the peer's bytes."""
    chain: list[BaseException] = []
    seen: BaseException | None = err
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
        if seen is None and chain[-1].args and isinstance(chain[-1].args[0], BaseException):
            seen = chain[-1].args[0]
    kinds = tuple(type(e) for e in chain)

    def has(*types: type) -> bool:
        return any(issubclass(kind, types) for kind in kinds)

    def named(*words: str) -> bool:
        return any(any(w in kind.__name__ for w in words) for kind in kinds)

    if has(outbound.DeadlineExceeded, requests.Timeout, TimeoutError):
        return "timeout"
    if has(requests.exceptions.SSLError) or named("SSL"):
        return "TLS error"
    if has(ConnectionRefusedError):
        return "connection refused"
    if named("NameResolution") or has(requests.exceptions.InvalidURL):
        return "host not found"
    if has(ConnectionResetError, RemoteDisconnected, urllib3.exceptions.ProtocolError):
        return "connection closed without an answer"
    return "connection failed"


def _session() -> requests.Session:
    session = getattr(_local, "session", None)
    if session is None:
        session = requests.Session()
        session.trust_env = False  # no proxy or .netrc credentials from the environment
        session.headers["User-Agent"] = app_settings.USER_AGENT
        session.mount("https://", outbound.BoundedAdapter())
        session.mount("http://", outbound.BoundedAdapter())
        _local.session = session
    return session


def body_of(delivery: WebhookDelivery) -> bytes:
    return json.dumps(delivery.payload, separators=(",", ":"), sort_keys=True).encode()


def send(delivery: WebhookDelivery) -> Result:
    """One signed POST with a total deadline, no redirects, the answer read up to a cap."""
    endpoint = delivery.endpoint
    secrets = [endpoint.secret]
    expires = endpoint.previous_secret_expires_at
    if endpoint.previous_secret and expires and expires > timezone.now():
        secrets.append(endpoint.previous_secret)
    body = body_of(delivery)
    headers = signing.headers(delivery.event_id, int(time.time()), body, secrets)
    headers["Content-Type"] = "application/json"
    timeout = float(app_settings.WEBHOOK_TIMEOUT)
    started = time.monotonic()
    deadline = outbound.Deadline(timeout)

    def elapsed() -> int:
        return int((time.monotonic() - started) * 1000)

    try:
        with deadline:
            response = _session().post(
                endpoint.url,
                data=body,
                headers=headers,
                timeout=timeout,
                allow_redirects=False,
                stream=True,
            )
            status = response.status_code
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            try:  # the answer is not used: read a little (keep-alive), then let go
                outbound.read_body(response, app_settings.WEBHOOK_MAX_RESPONSE_BYTES)
            except Exception:  # noqa: S110 - too large or cut short: the status has come
                pass
            finally:
                response.close()
    except Exception as err:
        if deadline.expired:
            return Result(error="timeout", duration_ms=elapsed())
        return Result(error=describe(err), duration_ms=elapsed())
    error = ""
    if 300 <= status < 400:
        error = f"HTTP {status} (redirects are not followed)"
    elif not 200 <= status < 300:
        error = f"HTTP {status}"
    return Result(status, error, retry_after, elapsed())


def unclaimed(now) -> Q:
    """Rows no worker is sending: never claimed, claim released, or the claim lapsed (its
    worker died)."""
    return Q(claimed_until__isnull=True) | Q(claimed_until__lte=now)


def claim(delivery_id: int) -> WebhookDelivery | None:
    """Take a due delivery for one attempt, or None (sent, not due, or someone has it). One
    conditional UPDATE: of two racing senders (workers, a duplicate task, Retry now's task),
    the database lets exactly one match the row."""
    now = timezone.now()
    hold = now + timedelta(seconds=app_settings.WEBHOOK_CLAIM_SECONDS)
    taken = (
        WebhookDelivery.objects.filter(pk=delivery_id, status__in=OPEN, next_attempt_at__lte=now)
        .filter(unclaimed(now))
        .update(next_attempt_at=hold, claimed_until=hold)
    )
    if not taken:
        return None
    return WebhookDelivery.objects.select_related("endpoint").get(pk=delivery_id)


def attempt(delivery_id: int) -> str:
    """Claim, send once, record; enqueue the next attempt after a failure. Returns the status."""
    delivery = claim(delivery_id)
    if delivery is None:
        return "skipped"
    number = delivery.attempts + 1
    started_at = timezone.now()
    if not delivery.endpoint.active:
        result = Result(error="endpoint deactivated")
        step = Step(DeliveryStatus.GAVE_UP)
    else:
        result = send(delivery)
        step = next_step(
            number, result, app_settings.WEBHOOK_MAX_ATTEMPTS, random.uniform(0.8, 1.2)
        )
    now = timezone.now()
    with transaction.atomic():
        WebhookAttempt.objects.create(
            delivery=delivery,
            number=number,
            started_at=started_at,
            duration_ms=result.duration_ms,
            status_code=result.status_code,
            error=result.error[:200],
            delivered=result.delivered,
        )
        WebhookDelivery.objects.filter(pk=delivery.pk).update(
            status=step.status,
            attempts=number,
            last_status_code=result.status_code,
            last_error=result.error[:200],
            next_attempt_at=now + timedelta(seconds=step.delay) if step.delay is not None else None,
            delivered_at=now if step.status == DeliveryStatus.DELIVERED else None,
            claimed_until=None,
            updated_at=now,
        )
    if step.status == DeliveryStatus.RETRYING and (step.delay or 0) <= _sweep_interval():
        # A longer wait is left to the sweep: a receiver down for hours must not pile up
        # countdown messages held in the workers' memory (and redelivered by Redis).
        _enqueue_later(delivery.pk, step.delay or 0)
    log = logger.info if result.delivered else logger.warning
    log(
        "webhook %s (%s) to endpoint %s, attempt %d: %s",
        delivery.event_id,
        delivery.event_type,
        delivery.endpoint_id,
        number,
        result.error or f"HTTP {result.status_code}",
    )
    return step.status


def _sweep_interval() -> float:
    return float(app_settings.WEBHOOK_SWEEP_INTERVAL)


def _enqueue_later(pk: int, delay: float) -> None:
    from ..tasks import deliver_webhook

    try:
        deliver_webhook.apply_async((pk,), countdown=delay)
    except Exception:  # the broker: the sweep sends it when it falls due
        logger.warning("could not enqueue webhook delivery %s; the sweep will", pk)


def due(now=None, limit: int = 500) -> list[int]:
    """Deliveries whose time has come and that no worker holds: new ones whose task was lost,
    retries whose countdown task was lost, attempts whose worker died (claim lapsed)."""
    now = now or timezone.now()
    rows = WebhookDelivery.objects.filter(status__in=OPEN, next_attempt_at__lte=now)
    return list(rows.order_by("next_attempt_at").values_list("pk", flat=True)[:limit])


@dataclass(frozen=True)
class Retried:
    """What Retry now did: ``started`` deliveries get an attempt now; ``busy`` were being sent
    by a worker at that moment and were left alone (that attempt is their retry)."""

    started: int
    busy: int


def retry_now(queryset: QuerySet[WebhookDelivery]) -> Retried:
    """A person asked: the chosen failed deliveries get one more attempt at once (one after
    giving up; the retry schedule goes on for those still retrying).

    Goes through the claim: a row a worker holds is not touched (one conditional UPDATE, so a
    claim taken a moment later waits for it on the row and then finds it due, a claim taken a
    moment earlier excludes it), and the attempt itself is the task's, which must claim the
    row like any other. A delivery is never sent twice at once."""
    now = timezone.now()
    failed = queryset.filter(status__in=(DeliveryStatus.RETRYING, DeliveryStatus.GAVE_UP))
    ids = list(failed.values_list("pk", flat=True))
    with transaction.atomic():
        free = list(
            WebhookDelivery.objects.filter(
                unclaimed(now),
                pk__in=ids,
                status__in=(DeliveryStatus.RETRYING, DeliveryStatus.GAVE_UP),
            ).values_list("pk", flat=True)
        )
        started = WebhookDelivery.objects.filter(unclaimed(now), pk__in=free).update(
            status=DeliveryStatus.RETRYING, next_attempt_at=now, updated_at=now
        )
    busy = WebhookDelivery.objects.filter(pk__in=ids, claimed_until__gt=now).count()
    from .events import enqueue

    transaction.on_commit(lambda: enqueue(free))
    return Retried(started, busy)


def prune(now=None) -> int:
    """Delete finished deliveries older than WEBHOOK_RETENTION_DAYS."""
    now = now or timezone.now()
    cutoff = now - timedelta(days=app_settings.WEBHOOK_RETENTION_DAYS)
    finished = (DeliveryStatus.DELIVERED, DeliveryStatus.GAVE_UP)
    deleted, _ = WebhookDelivery.objects.filter(status__in=finished, created_at__lt=cutoff).delete()
    return deleted
