"""Celery tasks: a sweep that fans out one refresh task per due token. Thin by design.

Also the database-connection hygiene around these tasks (see :func:`_recycle_connections`).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task
from celery.signals import task_postrun, task_prerun
from django.db import DatabaseError, connections

from . import tokens
from .conf import app_settings
from .models import Token

logger = logging.getLogger(__name__)


@shared_task(name="datasources.tasks.sweep", ignore_result=True)
def sweep() -> int:
    """Enqueue one refresh task per due token, batch after batch until none is due or
    SWEEP_MAX_QUEUED refresh tasks wait in the broker: a backlog drains within one beat tick,
    and an idle tick costs one indexed query.

    Each batch is claimed (``tokens.claim_due``) before it is enqueued, so the next batch, or a
    second sweep running at the same time, picks other tokens.
    """
    batch = max(1, app_settings.SWEEP_BATCH_SIZE)
    most = app_settings.SWEEP_MAX_QUEUED
    enqueued = 0
    # One producer (and broker connection) for the whole fan-out rather than one per message.
    with sweep.app.producer_or_acquire() as producer:
        while True:
            waiting = _waiting_refreshes(producer)
            room = most - (enqueued if waiting is None else waiting)
            if room <= 0:
                logger.info("sweep stopped: %d refresh tasks already wait in the broker", most)
                break
            size = min(batch, room)
            ids = tokens.claim_due(size)
            for token_id in ids:
                refresh.apply_async((token_id,), producer=producer)
            enqueued += len(ids)
            if len(ids) < size:
                break
    tokens.prune_history()
    if enqueued:
        logger.info("sweep enqueued %d token refresh(es)", enqueued)
    return enqueued


def _waiting_refreshes(producer: Any) -> int | None:
    """How many messages wait in the refresh task's queue (None when the broker cannot say)."""
    try:
        route = refresh.app.amqp.router.route({}, refresh.name, (), {})
        queue = route["queue"].name
        _, count, _ = producer.channel.queue_declare(queue=queue, passive=True)
    except Exception:  # a transport without passive declares, or the queue does not exist yet
        return None
    return int(count)


@shared_task(
    name="datasources.tasks.refresh",
    ignore_result=True,
    acks_late=True,
    soft_time_limit=60,
    time_limit=90,
)
def refresh(token_id: int) -> str:
    """Refresh one token; idempotent (fresh tokens are left alone) and single-flight."""
    result = tokens.refresh_token_by_id(token_id)
    if result.outcome in ("transient", "reauthorization"):
        logger.info("refresh of datasource %s: %s", result.token.datasource.slug, result.outcome)
    return result.outcome


# --- database connections around our tasks --------------------------------------------------

#: Literal names: reading ``sweep.name`` here would evaluate the shared_task proxies at import.
_OWN_TASKS = frozenset(
    {
        "datasources.tasks.sweep",
        "datasources.tasks.refresh",
        "datasources.tasks.refresh_now",
        "datasources.tasks.revoke_deleted",
        "datasources.tasks.sample_usage",
        "datasources.tasks.deliver_webhook",
        "datasources.tasks.sweep_webhooks",
        "datasources.tasks.prune_call_log",
    }
)


def _recycle_connections(sender: Any = None, **kwargs: Any) -> None:
    """Give each of our tasks a database connection that works: Django's request cycle for tasks.

    Why: Django drops broken or too-old connections only in ``close_old_connections``, which
    runs at the start and end of each *HTTP request*. In a worker, Celery's Django fixup closes
    connections around tasks instead, but with ``CELERY_DB_REUSE_MAX`` (which we set: connecting
    per task cost more than the refresh) it does so only once every ``2 * CELERY_DB_REUSE_MAX``
    tasks. After PostgreSQL cuts the sessions (``pg_terminate_backend``, a restart, a
    failover), every pool process then keeps its dead connection and each task fails with "the
    connection is closed" until the worker is restarted: Django never reconnects a connection
    object that it has not closed itself.

    What: before and after each of this app's tasks, ``close_if_unusable_or_obsolete()`` on
    every connection this thread has opened, as Django does per request. It

    - closes a connection whose last query failed and which no longer answers (``is_usable``),
      or one past ``CONN_MAX_AGE``, so the next query opens a fresh one;
    - resets ``health_check_done``, so with ``CONN_HEALTH_CHECKS`` (on in the project settings)
      the task's first query checks the connection (``close_if_health_check_failed``: one cheap
      ``SELECT 1`` per task) and reconnects when the server went away *between* tasks. That is
      what makes the first task after a failover work; without health checks that first task
      fails, its connection is closed after it, and the next task works.

    It keeps the connection otherwise, so reuse (the point of ``CELERY_DB_REUSE_MAX``) is
    preserved. Limited to our tasks: other apps' tasks in the same worker keep whatever policy
    their project chose. Skipped for eager tasks (run inline by a caller, maybe inside its
    transaction) and for connections inside an atomic block, where closing would break the
    caller's transaction.
    """
    if getattr(sender, "name", None) not in _OWN_TASKS:
        return
    if getattr(getattr(sender, "request", None), "is_eager", False):
        return
    for connection in connections.all(initialized_only=True):
        if connection.in_atomic_block:
            continue
        try:
            connection.close_if_unusable_or_obsolete()
        except DatabaseError:
            # Closing a broken connection can fail; Django forgets it all the same (close()
            # clears it in a ``finally``), so the next query reconnects. Go on with the others.
            logger.warning("closing database connection %r failed", connection.alias, exc_info=True)


task_prerun.connect(_recycle_connections, weak=False, dispatch_uid="datasources.tasks.prerun")
task_postrun.connect(_recycle_connections, weak=False, dispatch_uid="datasources.tasks.postrun")


# --- work handed over by the admin -------------------------------------------------------------


@shared_task(name="datasources.tasks.refresh_now", ignore_result=True, soft_time_limit=60)
def refresh_now(token_id: int) -> str:
    """A person asked for a refresh (the admin's bulk action): refresh even a fresh token."""
    token = Token.objects.select_related("datasource").filter(pk=token_id).first()
    if token is None:
        return "skipped"
    result = tokens.refresh_token(token, force=True)
    logger.info(
        "refresh of datasource %s asked in the admin: %s", token.datasource.slug, result.outcome
    )
    return result.outcome


@shared_task(name="datasources.tasks.revoke_deleted", ignore_result=True, soft_time_limit=60)
def revoke_deleted(payload: str) -> int:
    """Revoke the tokens of a deleted datasource (``payload``: see adminjobs)."""
    from .admin.jobs import revoke_from_payload

    return len(revoke_from_payload(payload))


@shared_task(name="datasources.tasks.sample_usage", ignore_result=True)
def sample_usage() -> int:
    """Snapshot the proxy counters for the admin's 24-hour charts."""
    from .admin.dashboard import take_samples

    return take_samples()


@shared_task(name="datasources.tasks.prune_call_log", ignore_result=True)
def prune_call_log() -> int:
    """Delete call-log rows older than CALL_LOG_RETENTION_DAYS (beat, every
    CALL_LOG_PRUNE_INTERVAL seconds)."""
    from .proxy import calllog

    deleted = calllog.prune()
    if deleted:
        logger.info("pruned %d call-log row(s)", deleted)
    return deleted


# --- webhooks ----------------------------------------------------------------------------------


@shared_task(
    name="datasources.tasks.deliver_webhook",
    ignore_result=True,
    acks_late=True,
    reject_on_worker_lost=True,
)
def deliver_webhook(delivery_id: int) -> str:
    """One attempt of one webhook delivery (claimed first: a duplicate message does nothing)."""
    from .webhooks import delivery

    return delivery.attempt(delivery_id)


@shared_task(name="datasources.tasks.sweep_webhooks", ignore_result=True)
def sweep_webhooks() -> int:
    """Enqueue the deliveries that are due and held by no worker (their task was lost, or
    their worker died mid-attempt); prune finished ones past WEBHOOK_RETENTION_DAYS."""
    from .webhooks import delivery

    ids = delivery.due(limit=max(1, app_settings.WEBHOOK_SWEEP_BATCH_SIZE))
    if ids:
        with sweep_webhooks.app.producer_or_acquire() as producer:
            for pk in ids:
                deliver_webhook.apply_async((pk,), producer=producer)
        logger.info("webhook sweep enqueued %d delivery(ies)", len(ids))
    delivery.prune()
    return len(ids)
