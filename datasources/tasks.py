"""Celery tasks: a sweep that fans out one refresh task per due token. Thin by design."""

from __future__ import annotations

import logging

from celery import shared_task

from . import tokens
from .models import Token

logger = logging.getLogger(__name__)


@shared_task(name="datasources.tasks.sweep", ignore_result=True)
def sweep() -> int:
    """Enqueue a refresh for every due token (bounded by SWEEP_BATCH_SIZE per run)."""
    ids = tokens.due_token_ids()
    for token_id in ids:
        refresh.delay(token_id)
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
    try:
        token = Token.objects.select_related("datasource").get(pk=token_id)
    except Token.DoesNotExist:  # the datasource was deleted since the sweep
        return "missing"
    result = tokens.refresh_token(token)
    if result.outcome in ("transient", "reauthorization"):
        logger.info("refresh of datasource %s: %s", token.datasource.slug, result.outcome)
    return result.outcome
