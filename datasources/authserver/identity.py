"""Which upstream account a new authorization signed in: the identity that a reconnect must
match before it may replace a stored token (issue 31).

Nango, Composio and their peers let a reconnect sign in whoever is in the browser, which can
silently swap one customer's data for another's. Here an end user's (or a per-user Django
user's) token is replaced only by an authorization of the same account:

* **OpenID Connect**: the ID token's ``iss`` and ``sub`` (OpenID Connect Core §2: together they
  identify the account). It is read from the token endpoint's answer, received directly over
  TLS, which §3.1.3.7 (6) allows in place of checking its signature; ``iss`` must be the
  datasource's issuer when one is set, ``aud`` must name our client, and it must not have
  expired.
* **Else a "who am I" call** configured on the datasource (``userinfo_url`` and
  ``userinfo_identity_field``; presets set them: GitHub ``/user`` ``id``, Slack ``auth.test``
  ``user_id``, Google ``sub``, Microsoft Graph ``/me`` ``id``, the user's object id).
* **Else nothing**: the datasource has no identity check, which the admin says.

:func:`same_account` is the one decision, table-tested.
"""

from __future__ import annotations

import base64
import enum
import json
import time
from typing import TYPE_CHECKING, Any

from django.views.decorators.debug import sensitive_variables

from ..exceptions import DatasourceError
from . import oauth

if TYPE_CHECKING:
    from ..models import Datasource

#: Clock skew allowed on the ID token's ``exp``.
LEEWAY = 120


class IdentityError(DatasourceError):
    """The answer's identity cannot be read or trusted (a malformed or foreign ID token, a
    failed userinfo call): a reconnect cannot be checked, so it is refused."""


@sensitive_variables()
def identity_of(datasource: Datasource, response: oauth.TokenResponse) -> str:
    """The account the authorization signed in, as a string to compare ("" when the datasource
    has no way to tell). Raises IdentityError."""
    if response.id_token:
        return _from_id_token(datasource, response.id_token)
    if datasource.userinfo_url and datasource.userinfo_identity_field:
        try:
            document = oauth.fetch_userinfo(
                datasource, datasource.userinfo_url, response.access_token
            )
        except DatasourceError as err:
            raise IdentityError(f"The account could not be identified: {err}") from None
        value = _field(document, datasource.userinfo_identity_field)
        if value is None:
            raise IdentityError(
                f"The userinfo answer has no {datasource.userinfo_identity_field!r}."
            )
        return f"{datasource.userinfo_url} {datasource.userinfo_identity_field}={value}"
    return ""


def _from_id_token(datasource: Datasource, id_token: str) -> str:
    claims = _claims(id_token)
    iss, sub, aud = claims.get("iss"), claims.get("sub"), claims.get("aud")
    if not isinstance(iss, str) or not isinstance(sub, str) or not iss or not sub:
        raise IdentityError("The ID token has no iss or sub.")
    if datasource.issuer and iss != datasource.issuer:
        raise IdentityError("The ID token was issued by another issuer than the datasource's.")
    audiences = aud if isinstance(aud, list) else [aud]
    if datasource.client_id not in audiences:
        raise IdentityError("The ID token was issued to another client.")
    exp = claims.get("exp")
    if not isinstance(exp, int | float) or exp + LEEWAY < time.time():
        raise IdentityError("The ID token has expired.")
    return f"{iss} {sub}"


def _claims(id_token: str) -> dict[str, Any]:
    parts = id_token.split(".")
    if len(parts) != 3:  # a JWE (5 parts) or not a JWT: we cannot read it
        raise IdentityError("The ID token is not a signed JWT.")
    try:
        payload = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        raise IdentityError("The ID token cannot be read.") from None
    if not isinstance(claims, dict):
        raise IdentityError("The ID token cannot be read.")
    return claims


def _field(document: Any, path: str) -> str | None:
    """``document[path]``, dots for nesting (``user.id``); a number or a string, as a string."""
    value = document
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    return str(value)[:300]


class Verdict(enum.Enum):
    SAME = "same"  # replace the token
    FIRST = "first"  # nothing stored to compare with: store, with this identity
    UNCHECKED = "unchecked"  # the datasource has no identity check: replace
    MISMATCH = "mismatch"  # another account, or one that cannot be told: keep the stored token


def same_account(*, connected: bool, stored: str, new: str) -> Verdict:
    """May an authorization that signed in ``new`` replace a connection whose account is
    ``stored``? ``connected``: a token is stored now (a disconnected or never-connected owner
    may connect any account)."""
    if not connected:
        return Verdict.FIRST
    if not stored and not new:
        return Verdict.UNCHECKED
    if not stored:
        return Verdict.FIRST  # connected before identities were recorded: learn it now
    if new == stored:
        return Verdict.SAME
    return Verdict.MISMATCH
