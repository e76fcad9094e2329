"""Writing tokens: a new authorization, a refresh, a disconnect, a reset; and reading rows.

Every write of a new token goes through :func:`token_fields`, so the expiry rules and the
"keep the stored refresh token when none is sent" rule hold for the callback, the refresh and
the client-credentials grant alike.
"""

from __future__ import annotations

import copy
import logging
from datetime import datetime, timedelta

from django.db import transaction
from django.db.models import F
from django.utils import timezone
from django.views.decorators.debug import sensitive_variables

from ..authserver import oauth
from ..authserver.identity import Verdict, same_account
from ..conf import app_settings
from ..exceptions import DatasourceError, IdentityMismatch, NotAuthorized, NotConnected
from ..models import AuthorizationRequest, Datasource, Token, TokenEvent, TokenStatus
from ..signals import datasource_authorized, identity_mismatch, token_refreshed
from .decide import due_for
from .expiry import expiry_of, parse_expires_in
from .failures import announce, outbox, record_event
from .lease import NO_LEASE

logger = logging.getLogger(__name__)

#: Cleared by a success: the bookkeeping of past failures.
NO_FAILURE = {
    "last_error": "",
    "failure_count": 0,
    "failure_kind": "",
    "next_attempt_at": None,
    "retry_not_before": None,
    "outcome_unknown_at": None,
}


def load_token(datasource: Datasource, user_id: int | None, end_user: str = "") -> Token:
    """The token row for (datasource, user or end user), created empty if they have none yet;
    neither: the shared token."""
    token, _ = Token.objects.select_related("datasource").get_or_create(
        datasource=datasource, user_id=user_id, end_user=end_user
    )
    return token


def end_user_token(datasource: Datasource, end_user: str) -> Token:
    """An end user's token row; NotConnected when they have none. Never created here (an id a
    caller sends must not create rows), never the shared token instead."""
    token = (
        Token.objects.select_related("datasource")
        .filter(datasource=datasource, user=None, end_user=end_user)
        .first()
    )
    if token is None or not token.access_token:
        raise NotConnected(
            f"End user {end_user!r} has not connected datasource {datasource.slug!r}.",
            end_user=end_user,
        )
    return token


def reload(token: Token, datasource: Datasource) -> Token:
    """The row as stored now (a new instance: cached instances are shared between threads)."""
    fresh = Token.objects.get(pk=token.pk)
    fresh.datasource = datasource
    return fresh


def token_owner(datasource: Datasource, user) -> int | None:
    """Whose token serves a call: nobody's (shared) or the given user's (per-user tokens)."""
    if not datasource.per_user:
        return None
    user_id = getattr(user, "pk", user)
    if user_id is None:
        raise NotAuthorized(
            f"Datasource {datasource.slug!r} has per-user tokens and no user was given."
        )
    return user_id


@sensitive_variables()
def token_fields(
    datasource: Datasource, token: Token, response: oauth.TokenResponse, now: datetime
) -> dict:
    """The columns a token response sets. A response without a refresh token keeps the stored
    one (Google sends it only on first consent; many providers never rotate), unless the stored
    one was issued to another client ID or is known to be dead."""
    keep = token.status != TokenStatus.NEEDS_REAUTHORIZATION and (
        not token.client_id or token.client_id == datasource.client_id
    )
    refresh_token = response.refresh_token or (token.refresh_token if keep else None)
    renewable = datasource.machine_grant or bool(refresh_token)
    expiry = expiry_of(
        expires_in=response.expires_in,
        access_token=response.access_token,
        renewable=renewable,
        assumed_lifetime=datasource.effective_token_lifetime,
        now=now,
    )
    fields = {
        "access_token": response.access_token,
        "refresh_token": refresh_token,
        "client_id": datasource.client_id[:500],
        "token_type": response.token_type[:50],
        "scope": (response.scope or datasource.scopes)[:2000],
        "expires_at": expiry.expires_at,
        "expiry_known": expiry.known,
        "last_refreshed_at": now,
        "last_attempt_at": now,
        "status": TokenStatus.ACTIVE,
        **NO_FAILURE,
    }
    fields["refresh_due_at"] = due_for(datasource, token, now, fields)
    return fields


@sensitive_variables()
def store_authorization(
    datasource: Datasource,
    response: oauth.TokenResponse,
    *,
    user=None,
    end_user: str = "",
    identity: str | None = None,
) -> Token:
    """Store the token from a completed authorization-code flow.

    It becomes ``end_user``'s token when one is given (a connect link); else, with per-user
    tokens, ``user``'s; otherwise the shared one. ``identity``: the account the authorization
    signed in (:mod:`datasources.authserver.identity`; None: not known). An end user's or a
    user's connected token is replaced only by the same account: else IdentityMismatch, an
    ``identity_mismatch`` event and signal, and nothing replaced.
    """
    now = timezone.now()
    owner = None if end_user else token_owner(datasource, user)
    current = load_token(datasource, owner, end_user)
    if identity is not None and (end_user or owner is not None):
        _check_same_account(datasource, current, identity, end_user or f"user {owner}")
    recovered = current.is_failing
    fields = token_fields(datasource, current, response, now)
    if identity is not None:
        fields["identity"] = identity[:500]
    with transaction.atomic():  # the token and its outbox: all or nothing
        Token.objects.filter(pk=current.pk).update(**fields, obtained_at=now, **NO_LEASE)
        detail = granted(response)
        if fields["refresh_token"] and not response.refresh_token:
            detail += "; no new refresh token: the stored one is kept"
        token = load_token(datasource, owner, end_user)
        if end_user:
            detail = f"End user {end_user}: {detail}"
        with outbox(datasource):
            record_event(datasource, TokenEvent.Kind.AUTHORIZED, detail)
            announce(datasource_authorized, datasource, user=user, token=token, recovered=recovered)
    return token


@sensitive_variables()
def store_refresh(
    datasource: Datasource,
    token: Token,
    response: oauth.TokenResponse,
    lease_id: str,
    *,
    after_rejection: bool = False,
) -> Token:
    """Persist access and (rotated) refresh token in one UPDATE, before anyone can use either.
    ``after_rejection``: an upstream rejection caused this refresh (starts REJECTION_COOLDOWN)."""
    now = timezone.now()
    recovered = token.is_failing
    fields = token_fields(datasource, token, response, now)
    if after_rejection:
        fields["rejection_refreshed_at"] = now
    if token.status == TokenStatus.NOT_AUTHORIZED:
        fields["obtained_at"] = now
    # One transaction: the UPDATE and its outbox (event row, webhook deliveries) commit
    # together. The outbox sits in a savepoint (:func:`.failures.outbox`): if it fails, the
    # UPDATE still commits, so a lost event can never cost the only valid (rotated) refresh
    # token.
    rows = Token.objects.filter(pk=token.pk)
    bump = {"refresh_count": F("refresh_count") + 1}
    with transaction.atomic(savepoint=False):
        if not rows.filter(lease_id=lease_id).update(**fields, **bump, **NO_LEASE):
            # Our lease lapsed mid-request. The response may carry the only valid (rotated)
            # refresh token, so it is stored all the same.
            logger.warning(
                "refresh lease of datasource %s lapsed before the refresh finished",
                datasource.slug,
            )
            rows.update(**fields, **bump)
        stored = copy.copy(token)  # as stored; ``token`` itself only once that has committed
        for name, value in {**fields, **NO_LEASE}.items():
            setattr(stored, name, value)
        stored.refresh_count += 1
        with outbox(datasource):
            if token.outcome_unknown_at:
                record_event(datasource, TokenEvent.Kind.LOST_RESPONSE, _survived(token))
            record_event(datasource, TokenEvent.Kind.REFRESHED, granted(response))
            announce(token_refreshed, datasource, token=stored, recovered=recovered)
    token.__dict__.update(stored.__dict__)  # callers may share the instance (caches)
    return token


def _check_same_account(datasource: Datasource, current: Token, identity: str, whose: str) -> None:
    connected = bool(current.access_token) and current.status != TokenStatus.NOT_AUTHORIZED
    verdict = same_account(connected=connected, stored=current.identity, new=identity)
    if verdict is not Verdict.MISMATCH:
        return
    detail = (
        f"Reconnect of {whose} refused: it signed in {identity or 'an account that cannot be told'}"
        f", not {current.identity}. The stored token was kept; to connect another account, "
        "disconnect first."
    )
    with transaction.atomic(), outbox(datasource):
        record_event(datasource, TokenEvent.Kind.IDENTITY_MISMATCH, detail)
        announce(identity_mismatch, datasource, token=current, identity=identity)
    logger.warning("datasource %s: %s", datasource.slug, detail)
    raise IdentityMismatch(
        "You signed in at the provider as another account than the one connected before, so "
        "nothing was replaced. To connect a different account, disconnect the current one "
        "first."
    )


def _survived(token: Token) -> str:
    """The event of a refresh whose earlier answer was lost and whose repeat was answered."""
    when = timezone.localtime(token.outcome_unknown_at)
    return (
        f"A refresh sent at {when:%Y-%m-%d %H:%M:%S %Z} got no answer (a timeout, a dropped "
        "connection or a stopped worker). It was sent again with the same refresh token and the "
        "provider answered it (a reuse grace period, or no rotation): the grant is intact."
    )


def disconnect(datasource: Datasource) -> list[str]:
    """Revoke at ``revocation_url`` (refresh token first, RFC 7009 §2) when set, then forget the
    stored tokens (every user's, with per-user tokens). Returns the problems met while revoking
    (secret-free)."""
    problems: list[str] = []
    for token in Token.objects.filter(datasource=datasource):
        problems += _disconnect_one(datasource, token)
    record_event(
        datasource,
        TokenEvent.Kind.REVOKED,
        "Disconnected" + (" (revocation failed)" if problems else ""),
    )
    return problems


def disconnect_end_user(datasource: Datasource, end_user: str) -> list[str]:
    """Revoke an end user's tokens at ``revocation_url`` (when set), then delete their row: the
    next call for them is ``409 not_connected`` until they connect again. NotConnected when they
    have no row. Returns the problems met while revoking (secret-free)."""
    token = Token.objects.filter(datasource=datasource, user=None, end_user=end_user).first()
    if token is None or not end_user:
        raise NotConnected(
            f"End user {end_user!r} has not connected datasource {datasource.slug!r}.",
            end_user=end_user,
        )
    problems = _revoke(datasource, token)
    Token.objects.filter(pk=token.pk).delete()
    record_event(
        datasource,
        TokenEvent.Kind.REVOKED,
        f"End user {end_user} disconnected" + (" (revocation failed)" if problems else ""),
    )
    return problems


@sensitive_variables()
def _revoke(datasource: Datasource, token: Token) -> list[str]:
    """Revoke the token's refresh then access token at ``revocation_url`` (RFC 7009), if set."""
    problems: list[str] = []
    if datasource.revocation_url:
        for value, hint in (
            (token.refresh_token, "refresh_token"),
            (token.access_token, "access_token"),
        ):
            if not value:
                continue
            try:
                oauth.revoke(datasource, value, hint)
            except DatasourceError as err:
                problems.append(f"Revoking the {hint.replace('_', ' ')} failed: {err}")
    return problems


def _disconnect_one(datasource: Datasource, token: Token) -> list[str]:
    problems = _revoke(datasource, token)
    cleared = datasource.machine_grant
    Token.objects.filter(pk=token.pk).update(
        # A client-credentials token is fetched again by the sweep, as when first saved.
        refresh_due_at=timezone.now() if cleared else None,
        access_token=None,
        refresh_token=None,
        client_id="",
        token_type="",
        scope="",
        expires_at=None,
        expiry_known=True,
        obtained_at=None,
        last_attempt_at=None,
        status=TokenStatus.NOT_AUTHORIZED,
        **NO_FAILURE,
        **NO_LEASE,
    )
    return problems


def reset_after_reconfiguration(datasource: Datasource) -> None:
    """Credentials were edited: whatever failed may work now, so retry at once (the sweep
    looks at these tokens now; the task works out their real due time)."""
    now = timezone.now()
    tokens = Token.objects.filter(datasource=datasource)
    if datasource.machine_grant:
        tokens.exclude(status=TokenStatus.ACTIVE).update(
            status=TokenStatus.NOT_AUTHORIZED, refresh_due_at=now, **NO_FAILURE
        )
    tokens.filter(status=TokenStatus.ACTIVE).exclude(failure_kind="").update(
        **NO_FAILURE, last_attempt_at=None, refresh_due_at=now
    )


def replace_now(datasource: Datasource) -> int:
    """The datasource's access tokens are no longer usable as they are (their DPoP key was
    replaced, or DPoP was turned on or off): treat them as expired, so the next call refreshes
    (or fetches) one bound to the current key and the sweep looks at them now. Refresh tokens
    are kept: a confidential client's are not bound to the key."""
    now = timezone.now()
    return (
        Token.objects.filter(datasource=datasource, access_token__isnull=False)
        .exclude(status=TokenStatus.NOT_AUTHORIZED)
        .update(expires_at=now, expiry_known=True, refresh_due_at=now)
    )


def granted(response: oauth.TokenResponse) -> str:
    seconds = parse_expires_in(response.expires_in)
    parts = [f"expires in {seconds}s" if seconds is not None else "no expiry given"]
    if response.scope:
        parts.append(f"scope: {response.scope}")
    if response.refresh_token:
        parts.append("new refresh token")
    return "; ".join(parts)


def due_token_ids(limit: int | None = None) -> list[int]:
    """Ids of the tokens the background should look at now, most overdue first (one range scan
    of the ``refresh_due_at`` index)."""
    limit = app_settings.SWEEP_BATCH_SIZE if limit is None else limit
    return list(Token.objects.due().values_list("pk", flat=True)[:limit])


def claim_due(limit: int) -> list[int]:
    """Due token ids, claimed for the refresh tasks about to be enqueued: their due time moves
    SWEEP_CLAIM_SECONDS ahead, so the next batch (or another sweep) picks other tokens. Each task
    writes the real due time when it has run; a task that was lost lets its claim lapse and the
    token comes due again."""
    with transaction.atomic():
        # Rows another sweep is claiming right now are skipped, not waited for (PostgreSQL's
        # FOR UPDATE SKIP LOCKED); on SQLite the IMMEDIATE transaction serialises sweeps.
        due = Token.objects.due().select_for_update(skip_locked=True, of=("self",))
        ids = list(due.values_list("pk", flat=True)[:limit])
        if ids:
            until = timezone.now() + timedelta(seconds=app_settings.SWEEP_CLAIM_SECONDS)
            Token.objects.filter(pk__in=ids).update(refresh_due_at=until)
    return ids


def store_due(datasource: Datasource, token: Token, *, lease_id: str | None = None) -> None:
    """Write the token's due time as it stands (a task found nothing to do: the time it was
    selected by was stale or a claim), releasing ``lease_id`` in the same UPDATE."""
    now = timezone.now()
    due = due_for(datasource, token, now)
    rows = Token.objects.filter(pk=token.pk)
    if lease_id:
        rows.filter(lease_id=lease_id).update(refresh_due_at=due, **NO_LEASE)
    else:
        rows.unleased(now).update(refresh_due_at=due)
    token.refresh_due_at = due


def prune_history() -> int:
    """Drop token events past the retention period and stale authorization requests."""
    cutoff = timezone.now() - timedelta(days=app_settings.EVENT_RETENTION_DAYS)
    deleted, _ = TokenEvent.objects.filter(created_at__lt=cutoff).delete()
    return deleted + purge_expired()


def purge_expired(now: datetime | None = None) -> int:
    """Delete authorization requests (state, PKCE verifier) that expired or were used more than
    a day ago: the flow purges them as it starts one, the sweep with the token history."""
    now = now or timezone.now()
    with transaction.atomic():
        deleted, _ = AuthorizationRequest.objects.filter(
            expires_at__lt=now - timedelta(days=1)
        ).delete()
    return deleted
