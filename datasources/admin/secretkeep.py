"""A client secret typed into a form that failed validation, kept server-side for that form.

The secret is encrypted with the app's Fernet keys and stored in the signed-in user's session
under a random reference; the form carries only the reference in a hidden field, so the secret
is never rendered back into the page. It is used when the form is sent again with the secret
box left blank, and dropped when the form is saved, after 30 minutes, or when more than a few
forms hold one.
"""

from __future__ import annotations

import secrets
import time

from django.views.decorators.debug import sensitive_variables

SESSION_KEY = "datasources_typed_secrets"
LIFETIME = 1800
MAX_HELD = 5


def _fernet():
    from ..models import Datasource

    return Datasource._meta.get_field("client_secret").fernet


@sensitive_variables()
def keep(session, secret: str, reference: str = "") -> str:
    """Hold ``secret`` for a form; returns the reference to put in the form."""
    now = time.time()
    held = {ref: item for ref, item in session.get(SESSION_KEY, {}).items() if item[1] > now}
    reference = reference if reference in held else secrets.token_urlsafe(16)
    held[reference] = [_fernet().encrypt(secret.encode()).decode(), now + LIFETIME]
    while len(held) > MAX_HELD:
        held.pop(min(held, key=lambda ref: held[ref][1]))
    session[SESSION_KEY] = held
    return reference


@sensitive_variables()
def take(session, reference: str) -> str | None:
    """The secret held under ``reference`` (kept until :func:`drop`), or None."""
    item = session.get(SESSION_KEY, {}).get(reference) if reference else None
    if not item or item[1] <= time.time():
        return None
    try:
        return _fernet().decrypt(item[0].encode()).decode()
    except Exception:  # a rotated key, a tampered session: as if nothing was held
        return None


def drop(session, reference: str) -> None:
    held = session.get(SESSION_KEY, {})
    if reference in held:
        del held[reference]
        session[SESSION_KEY] = held
