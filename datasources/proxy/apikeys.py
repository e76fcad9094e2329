"""API keys for the proxy: created once, stored as a hash, checked in constant time."""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Iterable
from datetime import timedelta

from django.db import transaction
from django.utils import timezone
from django.views.decorators.debug import sensitive_variables

from ..models import API_KEY_PREFIX, PERMISSIONS, ApiKey, Datasource, sha256_hex

#: last_used_at is written at most this often per key, to keep the proxy's hot path read-only.
LAST_USED_RESOLUTION = timedelta(seconds=60)


def hash_key(key: str) -> str:
    """What is stored (and cached) instead of the key."""
    return sha256_hex(key)


@sensitive_variables()
def new_key() -> tuple[str, str]:
    """A fresh (prefix, key). The prefix is stored in clear to find the row; the key is not."""
    while True:
        prefix = secrets.token_hex(4)
        if not ApiKey.objects.filter(prefix=prefix).exists():
            return prefix, f"{API_KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"


@sensitive_variables()
def assign_new_key(api_key: ApiKey) -> str:
    """Give an unsaved ApiKey its prefix and hash; returns the plain key to show once."""
    api_key.prefix, key = new_key()
    api_key.key_hash = hash_key(key)
    return key


@sensitive_variables()
def create_api_key(
    name: str,
    *,
    datasources: list[Datasource] | None = None,
    user=None,
    permissions: Iterable[str] = ("proxy",),
) -> tuple[ApiKey, str]:
    """Create a key; returns the row and the plain key, which is never retrievable again.

    ``datasources``: the datasources the key may call; None means every datasource (an explicit
    choice in the admin and in ``manage.py create_api_key``). An empty list allows nothing.
    ``permissions``: names from :data:`~datasources.models.PERMISSIONS` (``proxy`` by default).
    """
    granted = set(permissions)
    unknown = granted - set(PERMISSIONS)
    if unknown:
        raise ValueError(f"Unknown API key permission(s): {', '.join(sorted(unknown))}.")
    with transaction.atomic():
        api_key = ApiKey(name=name, user=user, all_datasources=datasources is None)
        for permission, field in PERMISSIONS.items():
            setattr(api_key, field, permission in granted)
        key = assign_new_key(api_key)
        api_key.save()
        if datasources:
            api_key.datasources.set(datasources)
    return api_key, key


@sensitive_variables()
def authenticate(key: str) -> ApiKey | None:
    """The active ApiKey for ``key``, or None."""
    if not key.startswith(API_KEY_PREFIX) or len(key) < len(API_KEY_PREFIX) + 10:
        return None
    prefix = key[len(API_KEY_PREFIX) : len(API_KEY_PREFIX) + 8]
    api_key = ApiKey.objects.filter(prefix=prefix, revoked_at__isnull=True).first()
    if api_key is None or not hmac.compare_digest(api_key.key_hash, hash_key(key)):
        return None
    now = timezone.now()
    if api_key.last_used_at is None or api_key.last_used_at < now - LAST_USED_RESOLUTION:
        ApiKey.objects.filter(pk=api_key.pk).update(last_used_at=now)
    return api_key


def allowed_datasource_ids(api_key: ApiKey) -> frozenset[int] | None:
    """The datasources this key may use, or None for all of them. A key restricted to
    datasources that were all deleted may use none."""
    if api_key.all_datasources:
        return None
    return frozenset(api_key.datasources.values_list("pk", flat=True))
