"""The refresh lease: one refresh at a time per token, across threads, processes and machines.

A lease is taken with one conditional UPDATE on the token row (``lease_expires_at`` empty, or
lapsed), which behaves the same on SQLite and PostgreSQL.

A lease is short (``LEASE_SECONDS``, 5 s by default) and kept alive by its holder: while the
holder's request to the token endpoint runs (:func:`kept`), this process's keeper thread extends
it every ``LEASE_SECONDS / 3``. So a holder that dies (a killed worker, a crashed web process)
is noticed within ``LEASE_SECONDS``, not after the longest request could take: a waiting caller
takes the lease over and retries at once with the same refresh token, which a provider with a
reuse grace period (Okta, Auth0) still answers. Most refreshes end before the keeper's first
beat, so a lease costs no statement beyond its taking and its release (the store's UPDATE).

Whoever takes a lapsed lease over records that the previous attempt's outcome is unknown, as of
the moment that attempt took its lease (``refresh_started_at``, moments before it sent its
request): a later ``invalid_grant`` can then say why, and when the lost request was sent.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

from django.db import DatabaseError, connections
from django.db.models import F
from django.db.models.functions import Coalesce
from django.utils import timezone

from ..conf import app_settings
from ..models import Token

logger = logging.getLogger(__name__)

#: Field values that clear a lease.
NO_LEASE = {"lease_id": "", "lease_expires_at": None}


def acquire(token_id: int) -> str | None:
    """Take the lease on ``token_id``; its id, or None when someone else holds it."""
    lease_id = uuid.uuid4().hex
    now = timezone.now()
    until = now + timedelta(seconds=app_settings.LEASE_SECONDS)
    rows = Token.objects.filter(pk=token_id)
    taking = {"lease_id": lease_id, "lease_expires_at": until, "refresh_started_at": now}
    if rows.filter(lease_expires_at__isnull=True).update(**taking):
        return lease_id
    # Only when the lease is not free: take it over if its holder is gone. (The right-hand
    # sides read the row as it was: the previous holder's start, not ours.)
    taken = rows.filter(lease_expires_at__lt=now).update(
        **taking,
        outcome_unknown_at=Coalesce(
            F("outcome_unknown_at"), F("refresh_started_at"), F("lease_expires_at")
        ),
    )
    return lease_id if taken else None


def release(token_id: int, lease_id: str) -> None:
    Token.objects.filter(pk=token_id, lease_id=lease_id).update(**NO_LEASE)


@contextmanager
def kept(token_id: int, lease_id: str) -> Iterator[None]:
    """Keep the lease alive while the block runs (the holder's request to the token endpoint,
    and storing its answer)."""
    _keeper.hold(token_id, lease_id)
    try:
        yield
    finally:
        _keeper.drop(lease_id)


def beat_interval() -> float:
    """How often held leases are extended: three beats per lease, so one late beat (a busy
    database, a pause of the process) does not let a live holder's lease lapse."""
    return max(0.05, app_settings.LEASE_SECONDS / 3)


class _Keeper:
    """One daemon thread per process that extends the leases its threads hold, in one UPDATE
    per beat for all of them. Started on first use (and again in a forked child, which does not
    inherit threads); it closes its database connection whenever it holds nothing, so an idle
    process keeps no connection for it."""

    def __init__(self) -> None:
        self._held: dict[str, tuple[int, float]] = {}  # lease id -> (token id, since)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._pid = 0
        #: Beats that extended at least one lease (tests and /metrics-style checks read it).
        self.beats = 0

    def hold(self, token_id: int, lease_id: str) -> None:
        with self._lock:
            self._held[lease_id] = (token_id, time.monotonic())
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                self._pid = os.getpid()
                self._thread = threading.Thread(
                    target=self._run, name="datasources-lease-keeper", daemon=True
                )
                self._thread.start()
            self._wake.notify()

    def drop(self, lease_id: str) -> None:
        with self._lock:
            self._held.pop(lease_id, None)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._held:
                    self._wake.wait()
            time.sleep(beat_interval())
            with self._lock:
                # A lease taken less than a beat ago still has most of its time.
                due = [
                    (token_id, lease_id)
                    for lease_id, (token_id, since) in self._held.items()
                    if time.monotonic() - since >= beat_interval() * 0.9
                ]
            if due:
                self._extend(due)
            with self._lock:
                idle = not self._held
            if idle:
                connections.close_all()  # this thread's connections only

    def _extend(self, due: list[tuple[int, str]]) -> None:
        until = timezone.now() + timedelta(seconds=app_settings.LEASE_SECONDS)
        try:
            Token.objects.filter(
                pk__in=[token_id for token_id, _ in due],
                lease_id__in=[lease_id for _, lease_id in due],
            ).update(lease_expires_at=until)
            self.beats += 1
        except DatabaseError as err:
            # The database is away (a restart, a failover): nobody else can take the lease
            # meanwhile either. Close the broken connection so the next beat reconnects.
            logger.warning("could not extend refresh leases: %s", type(err).__name__)
            connections.close_all()


_keeper = _Keeper()
