"""Encryption-key plumbing around django-fernet-fields-v2.

The fields cache their Fernet objects; rotating FERNET_KEYS (or overriding it in tests) must drop
those caches, and ``rotate_encryption_keys`` re-encrypts every secret with the first key.
"""

from __future__ import annotations

from typing import Any

from django.apps import apps
from django.core.signals import setting_changed
from django.db import transaction
from django.dispatch import receiver
from fernet_fields import EncryptedField


def encrypted_fields() -> list[tuple[type, list[str]]]:
    """(model, [field names]) for every model of this app with encrypted columns."""
    found = []
    for model in apps.get_app_config("datasources").get_models():
        names = [f.name for f in model._meta.concrete_fields if isinstance(f, EncryptedField)]
        if names:
            found.append((model, names))
    return found


def reset_key_cache() -> None:
    for model, names in encrypted_fields():
        for name in names:
            field = model._meta.get_field(name)
            for attr in ("keys", "fernet_keys", "fernet"):
                field.__dict__.pop(attr, None)


@receiver(setting_changed)
def _keys_changed(*, setting: str, **kwargs: Any) -> None:
    if setting in ("FERNET_KEYS", "FERNET_USE_HKDF", "SECRET_KEY"):
        reset_key_cache()


def rotate_all(batch_size: int = 500) -> dict[str, int]:
    """Decrypt with any configured key and re-encrypt with the first; returns rows per model."""
    counts: dict[str, int] = {}
    for model, names in encrypted_fields():
        count = 0
        pks = list(model._default_manager.order_by("pk").values_list("pk", flat=True))
        for start in range(0, len(pks), batch_size):
            with transaction.atomic():
                for obj in model._default_manager.filter(pk__in=pks[start : start + batch_size]):
                    model._default_manager.filter(pk=obj.pk).update(
                        **{name: getattr(obj, name) for name in names}
                    )
                    count += 1
        counts[model._meta.label] = count
    return counts
