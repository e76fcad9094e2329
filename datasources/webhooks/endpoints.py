"""Endpoint secrets (created, rotated) and the admin's test event."""

from __future__ import annotations

from datetime import timedelta

from django.utils import timezone
from django.views.decorators.debug import sensitive_variables

from ..conf import app_settings
from ..models import WEBHOOK_TEST_EVENT, WebhookDelivery, WebhookEndpoint
from . import events, signing


@sensitive_variables()
def assign_secret(endpoint: WebhookEndpoint) -> str:
    """Give an unsaved endpoint its secret; returns it, to show once."""
    endpoint.secret = signing.new_secret()
    endpoint.secret_created_at = timezone.now()
    return endpoint.secret


@sensitive_variables()
def rotate_secret(endpoint: WebhookEndpoint) -> str:
    """A new secret; the old one keeps signing (a second signature) for
    WEBHOOK_SECRET_ROTATION_GRACE seconds. Returns the new one, to show once."""
    now = timezone.now()
    grace = app_settings.WEBHOOK_SECRET_ROTATION_GRACE
    endpoint.previous_secret = endpoint.secret if grace else ""
    endpoint.previous_secret_expires_at = now + timedelta(seconds=grace) if grace else None
    secret = assign_secret(endpoint)
    endpoint.save(
        update_fields=[
            "secret",
            "previous_secret",
            "previous_secret_expires_at",
            "secret_created_at",
            "updated_at",
        ]
    )
    return secret


def send_test(endpoint: WebhookEndpoint) -> WebhookDelivery:
    """Queue a ``webhook.test`` event for this endpoint alone (whatever it subscribes to)."""
    data = {
        "endpoint": {"id": endpoint.pk, "name": endpoint.name},
        "datasource": events.datasource_data(endpoint.datasource),
    }
    (delivery,) = events.emit(WEBHOOK_TEST_EVENT, endpoint.datasource, data, endpoints=[endpoint])
    return delivery
