"""One upstream call as steps that know no transport: the one place each decision is written.

Every entry point (the proxy's Django view, its ASGI fast lane, the Python client, the admin's
Test) runs the same sequence and only translates its own request and answer types:

1. :func:`token_for` — which token (and datasource) a caller calls a slug with (an end user's
   with :data:`END_USER_HEADER`, never the shared one instead), or a refusal;
2. :func:`check_request` — the method allowed, the target under ``base_url``, or a refusal;
3. :func:`gate` — the upstream's remembered health (rate limit, circuit breaker), or a refusal;
4. :func:`attempts_for` — the attempts (refresh-and-retry once, opt-in retries) for the call;
5. :func:`refusal_for` — a failure while getting a token or calling upstream as an answer.

A refusal is a :class:`Refused`: plain data (status, JSON body, headers) that needs no request
object, so each entry point renders it its own way (a ``JsonResponse``, ASGI messages, an
exception, a line in the Test's report). Nothing here allocates more per call than the code it
replaced: the fast lane runs it on its hot path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import urllib3
from django.db import DatabaseError

from .. import tokens
from ..exceptions import (
    NotAuthorized,
    NotConnected,
    ReauthorizationRequired,
    TransientUpstreamError,
)
from ..models import Datasource, Token
from ..models.values import end_user_problem
from ..security import dpop, tls
from . import health, retries, target
from .attempts import Attempts, Observer, R, Wire
from .limits import Verdict

#: The request header that selects an end user's token (an application acting for one of its
#: users, who connected through a connect link). Addressed to this proxy: never sent upstream.
END_USER_HEADER = "X-Datasource-End-User"


class Refused(Exception):
    """The call is answered without (further) going upstream: ``status``, the JSON body
    (:meth:`body`: ``error``, ``detail`` and the ``extra`` fields) and ``headers``. Messages
    name the datasource and the reason, never a credential."""

    def __init__(self, status: int, error: str, detail: str, **extra: Any) -> None:
        self.status = status
        self.error = error
        self.detail = detail
        self.extra = extra
        self.headers: dict[str, str] = {}
        #: Seconds before a retry may succeed (a gate's refusal), for callers that raise.
        self.retry_after: float | None = None
        super().__init__(detail)

    def body(self) -> dict[str, Any]:
        """The JSON answer (the proxy's documented error shape)."""
        return {"error": self.error, "detail": self.detail, **self.extra}


class Caller(Protocol):
    """What the steps read of a caller (:class:`datasources.proxy.callers.Caller`)."""

    @property
    def api_key_id(self) -> int | None: ...

    @property
    def user_id(self) -> int | None: ...

    @property
    def may_proxy(self) -> bool: ...

    def may_use(self, datasource_id: int) -> bool: ...


class TokenCache(Protocol):
    """Tokens remembered per :func:`cache_key` (:data:`datasources.proxy.cache.tokens`)."""

    def get(self, key: Any) -> Any: ...

    def if_error(self, key: Any, err: BaseException) -> Any: ...


def cache_key(slug: str, user_id: int | None, end_user: str = "") -> tuple:
    """Where the process cache keeps a token: per slug and owner (the shared token, a Django
    user's, an end user's). An end user's key has three parts, so it is never another owner's."""
    return (slug, user_id, end_user) if end_user else (slug, user_id)


def key_of(token: Token) -> tuple:
    """:func:`cache_key` of a token row (with its datasource)."""
    return cache_key(token.datasource.slug, token.user_id, token.end_user)


def token_for(
    slug: str,
    caller: Caller,
    cached: TokenCache,
    *,
    end_user: str | None = None,
    cached_only: bool = False,
) -> Token | None:
    """The token (with its datasource) ``caller`` calls ``slug`` with, from ``cached`` else the
    database, or Refused (404, 403, 409 user_required). ``end_user``: the value of the
    :data:`END_USER_HEADER` (None: no such header), which selects that end user's token and
    nothing else (400 invalid_end_user, 409 not_connected; never the shared token instead).
    ``cached_only``: None instead of reading the database (the fast lane asks this first, on
    its event loop). While the database is away, an entry past its time still serves
    (``cached.if_error``: stale-if-error); with none, the database's error is raised (503
    database_unavailable)."""
    if not caller.may_proxy:
        raise Refused(
            403, "forbidden", "This API key may not call the proxy (it lacks the proxy permission)."
        )
    if end_user is not None:
        return _end_user_token_for(slug, caller, cached, end_user, cached_only=cached_only)
    token = cached.get((slug, caller.user_id))
    if token is None and caller.user_id is not None:
        token = cached.get((slug, None))
    if token is None:
        if cached_only:
            return None
        try:
            token = Token.objects.shared().select_related("datasource").get(datasource__slug=slug)
        except Token.DoesNotExist:
            raise Refused(404, "not_found", f"No datasource with slug {slug!r}.") from None
        except DatabaseError as err:
            token = cached.if_error((slug, caller.user_id), err)
            if token is None and caller.user_id is not None:
                token = cached.if_error((slug, None), err)
            if token is None:
                raise
    datasource = token.datasource
    if not caller.may_use(datasource.pk):
        raise Refused(403, "forbidden", "This API key may not use this datasource.")
    if datasource.per_user and token.user_id is None:
        if caller.user_id is None:
            raise Refused(
                409,
                "user_required",
                f"Datasource {slug!r} has per-user tokens: call it as a user, or with an API key "
                "that acts for one.",
                datasource=slug,
            )
        if cached_only:
            return None
        try:
            token = tokens.load_token(datasource, caller.user_id)
        except DatabaseError as err:
            token = cached.if_error((slug, caller.user_id), err)
            if token is None:
                raise
    return token


def _end_user_token_for(
    slug: str, caller: Caller, cached: TokenCache, end_user: str, *, cached_only: bool
) -> Token | None:
    """:func:`token_for` with the end-user header: only an API key acts for an end user, and
    only that end user's token serves (the cache key names them)."""
    problem = end_user_problem(end_user)
    if problem is not None:
        raise Refused(
            400, "invalid_end_user", f"The {END_USER_HEADER} header is not valid: {problem}."
        )
    if caller.api_key_id is None:
        raise Refused(403, "forbidden", "Only an API key may act for an end user.")
    key = cache_key(slug, None, end_user)
    token = cached.get(key)
    if token is None:
        if cached_only:
            return None
        try:
            datasource = Datasource.objects.filter(slug=slug).first()
            if datasource is None:
                raise Refused(404, "not_found", f"No datasource with slug {slug!r}.")
            if not caller.may_use(datasource.pk):
                raise Refused(403, "forbidden", "This API key may not use this datasource.")
            token = tokens.end_user_token(datasource, end_user)
        except NotConnected as err:
            raise _not_connected(slug, err.end_user) from None
        except DatabaseError as err:
            token = cached.if_error(key, err)
            if token is None:
                raise
    if not caller.may_use(token.datasource.pk):
        raise Refused(403, "forbidden", "This API key may not use this datasource.")
    return token


def _not_connected(slug: str, end_user: str) -> Refused:
    return Refused(
        409,
        "not_connected",
        f"End user {end_user!r} has not connected datasource {slug!r}: send them through a "
        "connect link.",
        end_user=end_user,
        datasource=slug,
    )


def method_refusal(datasource: Datasource, method: str) -> Refused | None:
    """405 (with ``Allow``) when the datasource does not allow ``method``, else None."""
    if method in datasource.allowed_method_set:
        return None
    refused = Refused(
        405,
        "method_not_allowed",
        f"Datasource {datasource.slug!r} does not allow {method} calls.",
    )
    refused.headers["Allow"] = ", ".join(sorted(datasource.allowed_method_set))
    return refused


def check_request(method: str, datasource: Datasource, path: str, *, chunked: bool) -> str:
    """The upstream URL (without query), or Refused: 405 method, 400 path, 411 chunked body
    (a Transfer-Encoding header)."""
    refused = method_refusal(datasource, method)
    if refused is not None:
        raise refused
    try:
        url = target.resolve(datasource.base_url, path)
    except target.InvalidPath as err:
        raise Refused(
            400,
            "invalid_path",
            f"The path would leave the datasource's base URL or be read ambiguously "
            f"({err.reason}).",
        ) from None
    if chunked:
        # WSGI gives no portable access to a chunked body; refuse rather than send it empty.
        raise Refused(411, "length_required", "Send the request body with a Content-Length.")
    return url


def gate(datasource: Datasource) -> Refused | None:
    """Refused (429 rate_limited, 503 circuit_open, with Retry-After; ``retry_after`` in
    seconds) when the upstream's remembered health, in any process, says not to call it now;
    else None (this call may be the circuit's one probe)."""
    admitted = health.admit(datasource.pk)
    if admitted.verdict not in (Verdict.RATE_LIMITED, Verdict.CIRCUIT_OPEN):
        return None
    refused = Refused(*health.refusal(admitted))
    refused.headers["Retry-After"] = health.retry_after_header(admitted)
    refused.retry_after = admitted.retry_after
    return refused


def attempts_for(
    datasource: Datasource,
    token: Token,
    wire: Wire[R],
    *,
    method: str,
    requested_retries: str | None = None,
    idempotency_key: bool = False,
    replayable: bool = True,
    on_token: Callable[[Token], None] | None = None,
    observe: Observer | None = None,
) -> Attempts[R]:
    """The attempts of one call: the datasource's retry policy after the caller's
    ``X-Datasource-Retries`` (``requested_retries``, fewer only)."""
    return Attempts(
        datasource,
        token,
        wire,
        method=method,
        policy=retries.RetryPolicy.of(datasource, requested=requested_retries),
        replayable=replayable,
        idempotency_key=idempotency_key,
        on_token=on_token,
        observe=observe,
    )


def refusal_for(
    err: BaseException,
    datasource: Datasource,
    absolute_uri: Callable[[str], str] = str,
    *,
    end_user: str = "",
) -> Refused | None:
    """The answer for a failure while getting a token or calling upstream; None: not ours to
    answer (an error of this server). ``absolute_uri`` turns the authorize URL into the one
    the caller can follow (the view's ``request.build_absolute_uri``). ``end_user``: the call
    used that end user's token (a connect link, not the admin, fixes it)."""
    if end_user and isinstance(err, NotAuthorized):
        return _not_connected(datasource.slug, end_user)
    if end_user and isinstance(err, ReauthorizationRequired):
        return Refused(
            409,
            "reauthorization_required",
            f"End user {end_user!r} must connect datasource {datasource.slug!r} again: send "
            "them through a connect link.",
            end_user=end_user,
            datasource=datasource.slug,
        )
    if isinstance(err, NotAuthorized | ReauthorizationRequired):
        error = "not_authorized" if isinstance(err, NotAuthorized) else "reauthorization_required"
        if datasource.per_user:
            where, authorize_url = "by the calling user", datasource.get_connect_url()
        else:
            where, authorize_url = "in the admin", datasource.get_authorize_url()
        return Refused(
            409,
            error,
            f"Datasource {datasource.slug!r} needs to be authorized {where}.",
            datasource=datasource.slug,
            authorize_url=absolute_uri(authorize_url),
        )
    if isinstance(err, TransientUpstreamError):
        refused = Refused(
            503,
            "token_unavailable",
            f"Could not get an access token for {datasource.slug!r}: {err}",
        )
        if err.retry_after:
            refused.headers["Retry-After"] = str(max(1, int(err.retry_after)))
        return refused
    return upstream_refusal(err)


def upstream_refusal(err: BaseException) -> Refused | None:
    """The answer for a call that got no answer from the upstream (nothing sent, refused,
    timed out, TLS failed); None for any other error."""
    if isinstance(err, urllib3.exceptions.NewConnectionError):  # a ConnectTimeoutError subclass
        return Refused(502, "upstream_unreachable", "The upstream API refused the connection.")
    if isinstance(err, urllib3.exceptions.TimeoutError):
        return Refused(504, "upstream_timeout", "The upstream API did not answer in time.")
    if isinstance(err, dpop.DPoPKeyError):
        return Refused(503, "dpop_key_unusable", f"No call was made: {err}")
    if isinstance(err, urllib3.exceptions.SSLError | tls.TLSConfigError):
        # Nothing was sent: the server's certificate is not trusted, or ours was refused.
        return Refused(
            502, "upstream_tls_failed", f"No call was made: {tls.failure_reason(err) or err}."
        )
    if isinstance(err, urllib3.exceptions.HTTPError):
        return Refused(
            502, "upstream_unreachable", f"The upstream API is unreachable ({type(err).__name__})."
        )
    return None
