"""Tell a datasource's owner by email when it needs re-authorization (besides the signal)."""

from __future__ import annotations

import logging
from typing import Any

from django.core.mail import send_mail
from django.db import transaction
from django.dispatch import receiver

from ..conf import app_settings
from ..signals import reauthorization_required

logger = logging.getLogger(__name__)


@receiver(reauthorization_required, dispatch_uid="datasources-email-owner")
def email_owner(*, datasource, token=None, error: str = "", **kwargs: Any) -> None:
    if not app_settings.EMAIL_OWNER_ON_REAUTHORIZATION:
        return
    owner = datasource.owner
    if owner is None or not owner.email:
        return
    base = (app_settings.PUBLIC_BASE_URL or "").rstrip("/")
    link = base + datasource.get_admin_url() if base else datasource.get_admin_url()
    whose = f" (the token of user {token.user})" if token is not None and token.user_id else ""
    subject = f"Datasource “{datasource.name}” needs re-authorization"
    body = (
        f"Refreshing the access token of datasource “{datasource.name}” ({datasource.slug})"
        f"{whose} failed for good:\n\n    {error}\n\n"
        f"Calls through it fail until someone re-authorizes it:\n\n    {link}\n"
    )

    def send() -> None:
        try:
            send_mail(subject, body, None, [owner.email])
        except Exception:
            logger.exception("could not email the owner of datasource %s", datasource.slug)

    transaction.on_commit(send)
