"""The refresh lease: one refresh at a time per token, across threads, processes and machines.

A lease is taken with one conditional UPDATE on the token row (``lease_expires_at`` empty, or
lapsed), which behaves the same on SQLite and PostgreSQL. A holder that dies leaves its lease
to lapse after LEASE_SECONDS; whoever takes a lapsed lease over records that the previous
attempt's outcome is unknown (the provider may have rotated the refresh token in an answer
nobody received), so a later ``invalid_grant`` can say why.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

from django.db.models import F
from django.db.models.functions import Coalesce
from django.utils import timezone

from ..conf import app_settings
from ..models import Token

#: Field values that clear a lease.
NO_LEASE = {"lease_id": "", "lease_expires_at": None}


def acquire(token_id: int) -> str | None:
    """Take the lease on ``token_id``; its id, or None when someone else holds it."""
    lease_id = uuid.uuid4().hex
    now = timezone.now()
    until = now + timedelta(seconds=app_settings.LEASE_SECONDS)
    rows = Token.objects.filter(pk=token_id)
    if rows.filter(lease_expires_at__isnull=True).update(lease_id=lease_id, lease_expires_at=until):
        return lease_id
    # Only when the lease is not free: take it over if its holder is gone.
    taken = rows.filter(lease_expires_at__lt=now).update(
        lease_id=lease_id,
        lease_expires_at=until,
        outcome_unknown_at=Coalesce(F("outcome_unknown_at"), F("lease_expires_at")),
    )
    return lease_id if taken else None


def release(token_id: int, lease_id: str) -> None:
    Token.objects.filter(pk=token_id, lease_id=lease_id).update(**NO_LEASE)
