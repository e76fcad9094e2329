"""The authorization-code flow's server-side state: start, consume state, complete.

State and PKCE verifier live in :class:`AuthorizationRequest` rows (state hashed, verifier
encrypted), bound to the browser session through a random binding value kept in the session,
single-use and expiring (RFC 9700 §2.1, §4.7).
"""

from __future__ import annotations

import secrets
from datetime import timedelta

from django.http import HttpRequest
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.debug import sensitive_variables

from .. import tokens
from ..authserver import identity, oauth
from ..conf import app_settings
from ..exceptions import InvalidState
from ..models import AuthorizationRequest, ConnectSession, Datasource, Token, sha256_hex
from ..tokens.lifecycle import purge_expired

SESSION_BINDING_KEY = "datasources_authorization_binding"


def callback_url(request: HttpRequest | None = None) -> str:
    """The redirect URI to register at the provider: public base URL, else the request origin."""
    path = reverse("datasources:callback")
    base = (app_settings.PUBLIC_BASE_URL or "").rstrip("/")
    if base:
        return base + path
    if request is None:
        return path
    return request.build_absolute_uri(path)


def browser_binding(request: HttpRequest) -> str:
    """The hash of this browser's binding value (created in its session on first use): what
    ties an authorization, and a claimed connect link, to the browser that started it."""
    binding = request.session.get(SESSION_BINDING_KEY)
    if not binding:
        binding = secrets.token_urlsafe(32)
        request.session[SESSION_BINDING_KEY] = binding
    return sha256_hex(binding)


def started_from_connect_link(request: HttpRequest) -> bool:
    """Whether the callback's state belongs to an authorization started from a connect link
    (whose end user has no account here, so no sign-in is asked). Reads, uses nothing up."""
    state = request.GET.get("state", "")
    return (
        bool(state)
        and AuthorizationRequest.objects.filter(
            state_hash=sha256_hex(state), connect_session__isnull=False
        ).exists()
    )


@sensitive_variables()
def start(
    request: HttpRequest, datasource: Datasource, *, connect_session: ConnectSession | None = None
) -> str:
    """Create a pending request and return the provider URL to redirect the browser to.
    ``connect_session``: started from that connect link (the token will be its end user's)."""
    binding_hash = browser_binding(request)
    now = timezone.now()
    purge_expired(now)
    pending = AuthorizationRequest.objects.filter(
        session_binding_hash=binding_hash, used_at__isnull=True
    ).order_by("-created_at")
    stale = list(
        pending.values_list("pk", flat=True)[app_settings.MAX_PENDING_AUTHORIZATIONS - 1 :]
    )
    if stale:
        AuthorizationRequest.objects.filter(pk__in=stale).delete()

    state = secrets.token_urlsafe(32)
    pkce = oauth.new_pkce_pair() if datasource.use_pkce else None
    redirect_uri = callback_url(request)
    AuthorizationRequest.objects.create(
        datasource=datasource,
        user=request.user if request.user.is_authenticated and not connect_session else None,
        connect_session=connect_session,
        state_hash=sha256_hex(state),
        session_binding_hash=binding_hash,
        code_verifier=pkce.verifier if pkce else None,
        redirect_uri=redirect_uri,
        created_at=now,
        expires_at=now + timedelta(seconds=app_settings.STATE_LIFETIME),
    )
    return oauth.build_authorization_url(
        datasource,
        state=state,
        redirect_uri=redirect_uri,
        code_challenge=pkce.challenge if pkce else None,
    )


def consume(request: HttpRequest) -> AuthorizationRequest:
    """Validate and use up the callback's state. Raises InvalidState saying what is wrong."""
    state = request.GET.get("state", "")
    if not state:
        raise InvalidState("The authorization response has no state parameter.")
    found = (
        AuthorizationRequest.objects.select_related("datasource")
        .filter(state_hash=sha256_hex(state))
        .first()
    )
    if found is None:
        raise InvalidState(
            "This authorization response does not match any authorization started here "
            "(unknown state). Start again from the datasource's admin page."
        )
    binding = request.session.get(SESSION_BINDING_KEY, "")
    if not binding or not secrets.compare_digest(sha256_hex(binding), found.session_binding_hash):
        raise InvalidState(
            "This authorization was started in a different browser session. "
            "Start again from the datasource's admin page in this browser."
        )
    now = timezone.now()
    if found.used_at is not None:
        raise InvalidState("This authorization response was already used. Start again.")
    if found.expires_at <= now:
        raise InvalidState(
            "This authorization took too long and expired. Start again from the admin page."
        )
    claimed = AuthorizationRequest.objects.filter(pk=found.pk, used_at__isnull=True).update(
        used_at=now, code_verifier=None
    )
    if not claimed:
        raise InvalidState("This authorization response was already used. Start again.")
    return found


@sensitive_variables()
def complete(
    auth_request: AuthorizationRequest, code: str, *, user=None, end_user: str = ""
) -> Token:
    """Exchange the code and store the token (``end_user``'s when given, else ``user``'s or the
    shared one). Raises the oauth module's classified errors."""
    datasource = auth_request.datasource
    response = oauth.exchange_code(
        datasource,
        code=code,
        redirect_uri=auth_request.redirect_uri,
        code_verifier=auth_request.code_verifier,
    )
    try:
        account = identity.identity_of(datasource, response)
    except identity.IdentityError:
        account = ""  # cannot be told: a connected owner's reconnect is refused (same_account)
    return tokens.store_authorization(
        datasource, response, user=user, end_user=end_user, identity=account
    )
