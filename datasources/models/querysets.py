"""Which tokens: the rows the sweep and the admin care about, as QuerySet methods."""

from __future__ import annotations

from datetime import datetime

from django.db import models
from django.db.models import Q
from django.utils import timezone


class TokenQuerySet(models.QuerySet):
    def shared(self) -> TokenQuerySet:
        """The datasources' shared tokens (no Django user, no end user)."""
        return self.filter(user__isnull=True, end_user="")

    def of_end_users(self) -> TokenQuerySet:
        return self.exclude(end_user="")

    def unleased(self, now: datetime | None = None) -> TokenQuerySet:
        now = now or timezone.now()
        return self.filter(Q(lease_expires_at__isnull=True) | Q(lease_expires_at__lt=now))

    def due(self, now: datetime | None = None) -> TokenQuerySet:
        """Tokens the background should look at now, most overdue first.

        ``refresh_due_at`` is kept by every write that changes what the decision depends on
        (see ``datasources.tokens.decide.refresh_due_at``), so this is a range scan of the
        partial index over the due tokens, whatever the size of the table.
        """
        now = now or timezone.now()
        return self.filter(refresh_due_at__lte=now).unleased(now).order_by("refresh_due_at")
