"""Who is calling the proxy: an API key (``Authorization: Api-Key <key>`` or ``X-Api-Key``), or a
signed-in user with the ``datasources.use_datasource`` permission (a browser session, which must
pass the CSRF check for unsafe methods). Neither credential ever goes upstream."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from django.db import DatabaseError
from django.http import HttpRequest
from django.middleware.csrf import CsrfViewMiddleware
from django.views.decorators.debug import sensitive_variables

from ..calls.call import Refused
from . import apikeys, cache

_CSRF_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})


@dataclass(frozen=True)
class Caller:
    api_key_id: int | None
    #: The datasource ids an API key may use; None: every datasource.
    allowed: frozenset[int] | None
    #: The session user, or the user an API key acts for.
    user_id: int | None
    #: An API key's permission to call the proxy (a signed-in user's is its Django permission,
    #: checked in :func:`authenticate`).
    may_proxy: bool = True

    @property
    def is_browser(self) -> bool:
        """A signed-in session: the answer is rendered by a browser on our own origin."""
        return self.api_key_id is None

    def may_use(self, datasource_id: int) -> bool:
        return self.allowed is None or datasource_id in self.allowed


@sensitive_variables()
def authenticate(request: HttpRequest) -> Caller:
    """The caller, or Refused (401 no or bad credentials, 403 no permission or CSRF)."""
    key = api_key_of(request.headers)
    if key:
        caller = caller_for_key(key)
        if caller is None:
            raise _unauthorized("The API key is not valid or was revoked.")
        return caller
    user = getattr(request, "user", None)
    if user is not None and user.is_authenticated:
        if not user.has_perm("datasources.use_datasource"):
            raise Refused(403, "forbidden", "You may not use datasources.")
        if request.method not in _CSRF_SAFE_METHODS:
            rejected = CsrfViewMiddleware(lambda r: None).process_view(request, None, (), {})
            if rejected is not None:
                raise Refused(403, "csrf_failed", "CSRF verification failed.")
        return Caller(None, None, user.pk)
    raise _unauthorized("Send Authorization: Api-Key <key>.")


@sensitive_variables()
def api_key_of(headers: Mapping[str, str]) -> str:
    """The API key the request carries ("" if none): ``Authorization: Api-Key <key>`` first,
    then ``X-Api-Key``. ``headers``: a request's ``headers`` (case-insensitive)."""
    header = headers.get("Authorization") or ""
    if header[:8].lower() == "api-key ":
        return header[8:].strip()
    return (headers.get("X-Api-Key") or "").strip()


@sensitive_variables()
def caller_for_key(key: str, *, cached_only: bool = False) -> Caller | None:
    """The caller an API key stands for, or None (not valid, revoked; or, ``cached_only``, not
    in the process cache: the fast lane asks that on its event loop, without the database)."""
    digest = apikeys.hash_key(key)
    caller = cache.keys.get(digest)
    if caller is None and not cached_only:
        try:
            api_key = apikeys.authenticate(key)
        except DatabaseError as err:
            caller = cache.keys.if_error(digest, err)  # stale-if-error, or 503
            if caller is None:
                raise
            return caller
        if api_key is None:
            return None
        caller = Caller(
            api_key.pk,
            apikeys.allowed_datasource_ids(api_key),
            api_key.user_id,
            may_proxy=api_key.may_proxy,
        )
        cache.keys.put(digest, caller)
    return caller


def _unauthorized(detail: str) -> Refused:
    refused = Refused(401, "unauthorized", detail)
    refused.headers["WWW-Authenticate"] = 'Api-Key realm="datasources"'
    return refused


__all__ = ["Caller", "Refused", "api_key_of", "authenticate", "caller_for_key"]
