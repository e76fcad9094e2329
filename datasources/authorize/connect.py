"""Connect links: an end user of an application connects their own account to a datasource.

An application (an API key with the ``connect`` permission) asks for a link for one end user
(:func:`create`). The link works once and for CONNECT_SESSION_LIFETIME seconds. The person who
opens it sees a page on this origin (the datasource's name, who is connecting, one *Connect*
button); pressing it claims the link for that browser (:func:`claim`) and starts the usual
authorization-code flow (state and PKCE bound to the browser). The callback stores the end
user's token and sends the person back to the application's return URL with
``?connect=success&session=<id>`` or ``?connect=error&error=<code>&session=<id>``
(:func:`back_to_app`): never a token or a code in that URL.

Refusals, each leaving the stored token unchanged: a link that is unknown (forged: a plain
page, as no return URL can be trusted), expired (``expired``), already claimed or finished
(``used``), or whose flow is finished in another browser (the state's browser binding).
"""

from __future__ import annotations

import secrets
from datetime import timedelta
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from django.http import HttpRequest
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.debug import sensitive_variables

from ..conf import app_settings
from ..models import ApiKey, ConnectSession, Datasource, GrantType, sha256_hex
from ..models.values import end_user_problem, parse_return_urls, return_url_allowed

#: The error codes an application can receive on its return URL.
EXPIRED, USED = "expired", "used"


class Refusal(Exception):
    """A connect session that cannot be created: ``error`` (a stable code) and a sentence."""

    def __init__(self, error: str, detail: str) -> None:
        self.error, self.detail = error, detail
        super().__init__(detail)


def base_url(request: HttpRequest | None) -> str:
    """Where links point: PUBLIC_BASE_URL, else the request's own origin."""
    base = (app_settings.PUBLIC_BASE_URL or "").rstrip("/")
    if base or request is None:
        return base
    return request.build_absolute_uri("/").rstrip("/")


@sensitive_variables()
def create(
    request: HttpRequest | None,
    datasource: Datasource,
    *,
    end_user: str,
    return_url: str,
    display_name: str = "",
    api_key: ApiKey | None = None,
) -> tuple[ConnectSession, str]:
    """A new connect session and its link (the secret is in the link only). Raises Refusal."""
    if datasource.grant_type != GrantType.AUTHORIZATION_CODE:
        raise Refusal(
            "unsupported_datasource",
            "Only authorization-code datasources have end users who connect.",
        )
    problem = end_user_problem(end_user)
    if problem:
        raise Refusal("invalid_end_user", problem[:1].upper() + problem[1:] + ".")
    if len(display_name) > 255 or not display_name.isprintable():
        raise Refusal("invalid_request", "display_name: at most 255 printable characters.")
    allowed = parse_return_urls(datasource.allowed_return_urls)
    if not return_url_allowed(return_url, allowed):
        raise Refusal(
            "return_url_not_allowed",
            "The return URL is not among the datasource's allowed return URLs"
            + ("" if allowed else " (none are set: add one on the datasource's page)")
            + ".",
        )
    secret = secrets.token_urlsafe(32)
    now = timezone.now()
    session = ConnectSession.objects.create(
        secret_hash=sha256_hex(secret),
        datasource=datasource,
        end_user=end_user,
        display_name=display_name,
        return_url=return_url,
        api_key=api_key,
        created_at=now,
        expires_at=now + timedelta(seconds=app_settings.CONNECT_SESSION_LIFETIME),
    )
    link = base_url(request) + reverse("datasources:connect-link", args=[secret])
    return session, link


def find(secret: str) -> ConnectSession | None:
    """The session a link's secret names (None: unknown, i.e. forged or mistyped)."""
    if not secret or len(secret) > 100:
        return None
    return (
        ConnectSession.objects.select_related("datasource")
        .filter(secret_hash=sha256_hex(secret))
        .first()
    )


def unusable(session: ConnectSession) -> str | None:
    """Why the link can no longer be opened (``used``, ``expired``), or None."""
    if session.claimed_at is not None or session.finished_at is not None:
        return USED
    if session.expires_at <= timezone.now():
        return EXPIRED
    return None


def claim(session: ConnectSession, browser: str) -> str | None:
    """Take the link for this browser (the hash of its binding): one conditional UPDATE, so two
    presses, or two browsers, cannot both go on. None when claimed, else why not."""
    now = timezone.now()
    claimed = ConnectSession.objects.filter(
        pk=session.pk, claimed_at__isnull=True, finished_at__isnull=True, expires_at__gt=now
    ).update(claimed_at=now, browser_hash=browser)
    if claimed:
        session.claimed_at, session.browser_hash = now, browser
        return None
    session.refresh_from_db()
    return unusable(session) or USED


def finish(session: ConnectSession, outcome: str) -> None:
    """Record how it ended (the first outcome stands)."""
    ConnectSession.objects.filter(pk=session.pk, finished_at__isnull=True).update(
        finished_at=timezone.now(), outcome=outcome
    )


def back_to_app(session: ConnectSession, error: str | None = None) -> str:
    """The application's return URL with the outcome: ``connect=success`` or
    ``connect=error&error=<code>``, and the session's public id. Its own query is kept."""
    parts = urlsplit(session.return_url)
    query = [
        (k, v)
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
        if k not in ("connect", "error", "session")
    ]
    if error:
        query += [("connect", "error"), ("error", error)]
    else:
        query += [("connect", "success")]
    query.append(("session", str(session.public_id)))
    return urlunsplit(parts._replace(query=urlencode(query), fragment=""))
