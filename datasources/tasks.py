"""Celery tasks: a sweep that fans out one refresh task per due token. Thin by design."""

from __future__ import annotations

import logging

from celery import shared_task

from . import tokens

logger = logging.getLogger(__name__)


@shared_task(name="datasources.tasks.sweep", ignore_result=True)
def sweep() -> int:
    """Enqueue a refresh for every due token (bounded by SWEEP_BATCH_SIZE per run)."""
    ids = tokens.due_token_ids()
    # One producer (and broker connection) for the whole fan-out rather than one per message.
    with sweep.app.producer_or_acquire() as producer:
        for token_id in ids:
            refresh.apply_async((token_id,), producer=producer)
    tokens.prune_history()
    if ids:
        logger.info("sweep enqueued %d token refresh(es)", len(ids))
    return len(ids)


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
