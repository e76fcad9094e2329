"""Standard Webhooks signatures (https://www.standardwebhooks.com/), so receivers can verify
with the spec's libraries: ``webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">``
keyed with the secret's bytes; the secret is written ``whsec_<base64>``."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets as _secrets
from collections.abc import Iterable

from django.views.decorators.debug import sensitive_variables

SECRET_PREFIX = "whsec_"
#: 32 random bytes: the spec asks for 24 to 64.
SECRET_BYTES = 32


@sensitive_variables()
def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(_secrets.token_bytes(SECRET_BYTES)).decode()


@sensitive_variables()
def signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """One ``v1,<base64>`` entry of the webhook-signature header."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


@sensitive_variables()
def headers(msg_id: str, timestamp: int, body: bytes, secrets: Iterable[str]) -> dict[str, str]:
    """The three headers of one attempt; several secrets (during a rotation) give several
    space-separated signatures, any of which verifies."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(signature(s, msg_id, timestamp, body) for s in secrets if s),
    }
