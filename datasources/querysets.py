"""Which tokens: the rows the sweep and the admin care about, as QuerySet methods."""

from __future__ import annotations

from datetime import datetime, timedelta

from django.db import models
from django.db.models import Q
from django.utils import timezone


class TokenQuerySet(models.QuerySet):
    def unleased(self, now: datetime | None = None) -> TokenQuerySet:
        now = now or timezone.now()
        return self.filter(Q(lease_expires_at__isnull=True) | Q(lease_expires_at__lt=now))

    def expiring(self, within: float, now: datetime | None = None) -> TokenQuerySet:
        """Active tokens whose access token expires within ``within`` seconds."""
        now = now or timezone.now()
        return self.filter(status="active", expires_at__lte=now + timedelta(seconds=within))

    def due(self, margin: float, max_age: float, now: datetime | None = None) -> TokenQuerySet:
        """Tokens the background sweep should refresh now.

        Expiring within the margin, refreshed longer than ``max_age`` ago (idle refresh tokens get
        revoked by some providers; only tokens that can be renewed), or client-credentials
        datasources never fetched, excluding
        tokens in a transient-failure backoff, needing re-authorization, or leased.
        """
        now = now or timezone.now()
        wanted = (
            Q(status="active", expires_at__lte=now + timedelta(seconds=margin))
            | Q(
                Q(refresh_token__isnull=False) | Q(datasource__grant_type="client_credentials"),
                status="active",
                last_refreshed_at__lte=now - timedelta(seconds=max_age),
            )
            | Q(
                status="not_authorized",
                datasource__grant_type="client_credentials",
                failure_count=0,
            )
            | Q(next_attempt_at__lte=now)
        )
        return (
            self.filter(wanted)
            .exclude(status="needs_reauthorization")
            .filter(Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=now))
            .unleased(now)
        )
