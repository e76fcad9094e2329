"""When a freshly issued access token expires, from whatever the provider told us.

Providers disagree: ``expires_in`` as a number or a string ("3599"), as 0 or a negative number,
as 10**12, or absent, with the expiry only inside a JWT access token's ``exp`` claim. None of
that may turn into a 500 or a token declared dead by a guess.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import jwt

#: Longest lifetime believed (10 years); larger values are capped to it.
MAX_LIFETIME = 10 * 365 * 24 * 3600


@dataclass(frozen=True)
class Expiry:
    expires_at: datetime | None
    #: False when ``expires_at`` is an assumption (the datasource's or the default lifetime):
    #: it schedules refreshes but never makes the token unusable.
    known: bool
    source: str  # "expires_in", "jwt", "assumed" or "none"


def parse_expires_in(value: Any) -> int | None:
    """Seconds from ``expires_in`` as sent (int, float or numeric string); None if absent,
    unparseable, 0 or negative (unknown); capped at :data:`MAX_LIFETIME`."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, str):
        value = value.strip()
        if not value or len(value) > 30:
            return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(seconds) or seconds < 1:
        return None
    return int(min(seconds, MAX_LIFETIME))


def jwt_expires_in(access_token: str, now: datetime) -> int | None:
    """Seconds until a JWT access token's ``exp``, if it is a JWT with a future ``exp``.

    The signature is not checked: the claim is only used to schedule our own refresh, and the
    upstream API is the one that judges the token.
    """
    if access_token.count(".") != 2 or len(access_token) > 16384:
        return None
    try:
        claims = jwt.decode(access_token, options={"verify_signature": False})
    except (jwt.PyJWTError, ValueError, TypeError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if isinstance(exp, bool) or not isinstance(exp, int | float) or not math.isfinite(exp):
        return None
    return parse_expires_in(exp - now.timestamp())


def expiry_of(
    *,
    expires_in: Any,
    access_token: str,
    renewable: bool,
    assumed_lifetime: int,
    now: datetime,
) -> Expiry:
    """Known expiry from ``expires_in``, else from a JWT ``exp``; else, for a token that can be
    renewed, an assumed one (to schedule refreshes); else none: the token is used until the
    upstream rejects it."""
    seconds = parse_expires_in(expires_in)
    if seconds is not None:
        return Expiry(now + timedelta(seconds=seconds), True, "expires_in")
    seconds = jwt_expires_in(access_token, now)
    if seconds is not None:
        return Expiry(now + timedelta(seconds=seconds), True, "jwt")
    if renewable:
        lifetime = parse_expires_in(assumed_lifetime) or 3600
        return Expiry(now + timedelta(seconds=lifetime), False, "assumed")
    return Expiry(None, False, "none")
