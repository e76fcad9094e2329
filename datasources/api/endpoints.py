"""The JSON API's calls (``/api/v1/…``): datasources and end users' connections for ``manage``
keys, access tokens for ``token`` keys, and the OpenAPI document."""

from __future__ import annotations

import logging
import time
from typing import Any

from django.db.models import Prefetch
from django.http import HttpRequest, HttpResponse
from django.urls import reverse
from ninja import Body, NinjaAPI, Query, Status
from pydantic import ValidationError as PydanticValidationError

from .. import tokens
from ..authorize import connect as links
from ..calls import health, limits
from ..exceptions import (
    NotAuthorized,
    NotConnected,
    ReauthorizationRequired,
    TransientUpstreamError,
)
from ..models import Datasource, Token, TokenEvent, TokenStatus
from ..models.values import end_user_problem
from ..ops import config_io
from ..ops.config_io import SECRET_FIELDS
from . import errors
from .auth import ApiKeyAuth, datasource_for, require
from .errors import ApiError
from .schemas import (
    AccessTokenOut,
    ConnectionListOut,
    ConnectionOut,
    ConnectSessionIn,
    ConnectSessionOut,
    DatasourceListOut,
    DatasourceOut,
    ErrorOut,
    TokenIn,
)

logger = logging.getLogger(__name__)

#: Most datasources on one page of the list.
MAX_PAGE = 500


class _API(NinjaAPI):
    """Mounted inside this app's URLconf (``app_name = "datasources"``), so its URL names live
    under that namespace too; django-ninja reverses its root from its own namespace alone."""

    def get_root_path(self, path_params: dict) -> str:
        return reverse(f"datasources:{self.urls_namespace}:api-root", kwargs=path_params)


api = _API(
    title="django-oauth2-datasources",
    version="1",
    description=(
        "Manage OAuth2-connected datasources and read their tokens. Authenticate with "
        "`Authorization: Api-Key <key>`; each call names the key permission it needs."
    ),
    auth=ApiKeyAuth(),
    urls_namespace="datasources-api",
    openapi_url="/openapi.json",
    docs_url=None,  # no Swagger UI: it would load scripts from a CDN
)
errors.install(api)

#: The PUT body: one import entry, validated by the import itself (not a schema).
_ENTRY = Body(
    ...,
    description=(
        "One datasource in the import file's format (docs/operations.md, config as code); "
        "fields left out keep their values. Secrets are write-only and given as values: "
        '{"env": …} and {"file": …} name things on the server and are refused here.'
    ),
)

#: Error answers every authenticated call may give.
COMMON = {400: ErrorOut, 401: ErrorOut, 403: ErrorOut, 503: ErrorOut}


def _shared_tokens() -> Prefetch:
    return Prefetch("tokens", queryset=Token.objects.shared(), to_attr="shared")


def _out(datasource: Datasource, known: limits.Health, now: float) -> dict:
    shared = getattr(datasource, "shared", None)
    token = None if datasource.per_user or not shared else shared[0]
    return {
        "slug": datasource.slug,
        "name": datasource.name,
        "grant_type": datasource.grant_type,
        "base_url": datasource.base_url,
        "per_user": datasource.per_user,
        "token": None
        if token is None
        else {
            "status": token.status,
            "expires_at": token.expires_at,
            "last_refreshed_at": token.last_refreshed_at,
            "refresh_count": token.refresh_count,
            "last_error": token.last_error,
            "scope": token.scope,
        },
        "upstream": {
            "state": limits.gate(known, now).verdict.value,
            "consecutive_failures": known.failures,
        },
    }


@api.get(
    "/datasources",
    response={200: DatasourceListOut, **COMMON},
    summary="List datasources (manage)",
)
def list_datasources(
    request: HttpRequest,
    cursor: str | None = Query(None, description="The next_cursor of the previous page."),
    limit: int = Query(100, ge=1, le=MAX_PAGE),
):
    """Datasources this key may use, by slug, with their token state and upstream health."""
    api_key = require(request, "manage")
    rows = Datasource.objects.order_by("slug").prefetch_related(_shared_tokens())
    allowed = None if api_key.all_datasources else list(api_key.datasources.values("pk"))
    if allowed is not None:
        rows = rows.filter(pk__in=[row["pk"] for row in allowed])
    if cursor:
        rows = rows.filter(slug__gt=cursor)
    page = list(rows[: limit + 1])
    more = len(page) > limit
    page = page[:limit]
    known = health.store().read_many(ds.pk for ds in page)
    now = time.time()
    return {
        "items": [_out(ds, known.get(ds.pk, limits.CLEAN), now) for ds in page],
        "next_cursor": page[-1].slug if more else None,
    }


@api.get(
    "/datasources/{slug}",
    response={200: DatasourceOut, 404: ErrorOut, **COMMON},
    summary="One datasource (manage)",
)
def get_datasource(request: HttpRequest, slug: str):
    api_key = require(request, "manage")
    datasource = datasource_for(api_key, slug)
    datasource = Datasource.objects.prefetch_related(_shared_tokens()).get(pk=datasource.pk)
    return _out(datasource, health.current(datasource.pk), time.time())


@api.post(
    "/connect/sessions",
    response={201: ConnectSessionOut, 404: ErrorOut, **COMMON},
    summary="A connect link for an end user (connect)",
)
def create_connect_session(request: HttpRequest, payload: ConnectSessionIn):
    """A single-use link (CONNECT_SESSION_LIFETIME, 30 minutes by default) that lets the end user
    connect their own account: a page on this server with one Connect button, the provider's
    consent, then back to ``return_url`` with ``?connect=success&session=<id>`` or
    ``?connect=error&error=<code>&session=<id>``."""
    api_key = require(request, "connect")
    datasource = datasource_for(api_key, payload.datasource)
    try:
        session, link = links.create(
            request,
            datasource,
            end_user=payload.end_user,
            return_url=payload.return_url,
            display_name=payload.display_name,
            api_key=api_key,
        )
    except links.Refusal as refusal:
        raise ApiError(400, refusal.error, refusal.detail) from None
    logger.info(
        "connect session %s for datasource %s created with API key %s",
        session.public_id,
        datasource.slug,
        api_key.prefix,
    )
    return Status(
        201,
        {"session": str(session.public_id), "connect_url": link, "expires_at": session.expires_at},
    )


@api.put(
    "/datasources/{slug}",
    response={200: DatasourceOut, 201: DatasourceOut, 404: ErrorOut, **COMMON},
    summary="Create or update a datasource (manage)",
)
def put_datasource(
    request: HttpRequest,
    slug: str,
    entry: dict[str, Any] = _ENTRY,
):
    """Upsert by slug, with the import's validation: everything is checked first and nothing is
    written if anything is wrong (400 with one problem per line). A key restricted to some
    datasources may update those, and creates nothing (403)."""
    api_key = require(request, "manage")
    existing = Datasource.objects.filter(slug=slug).first()
    if existing is None and not api_key.all_datasources:
        raise ApiError(403, "forbidden", "Only a key for all datasources may create one.")
    if existing is not None:
        datasource_for(api_key, slug)  # 403 outside the key's scope
    if "slug" in entry and entry["slug"] != slug:
        raise ApiError(400, "invalid_request", "The body's slug differs from the URL's.")
    indirect = sorted(name for name in SECRET_FIELDS if isinstance(entry.get(name), dict))
    if indirect:
        raise ApiError(
            400,
            "invalid_request",
            'Secrets are given as values over HTTP: {"env": …} and {"file": …} are for '
            "import files read on the server.",
            problems=[{"field": name, "message": "must be a string"} for name in indirect],
        )
    try:
        result = config_io.import_datasources([{**entry, "slug": slug}], environ={})
    except config_io.ImportFailed as failed:
        raise ApiError(
            400,
            "invalid_request",
            "The datasource is not valid; nothing was written.",
            problems=[errors.import_problem(line) for line in failed.errors],
        ) from None
    logger.info(
        "datasource %s %s through the API with key %s",
        slug,
        "created" if result.created else "updated",
        api_key.prefix,
    )
    datasource = Datasource.objects.prefetch_related(_shared_tokens()).get(slug=slug)
    status = 201 if result.created else 200
    return Status(status, _out(datasource, health.current(datasource.pk), time.time()))


#: The optional body of POST …/token, in the document (read by :func:`_token_body`: a body is
#: optional, which a ninja body parameter is not).
_TOKEN_BODY = {
    "requestBody": {
        "required": False,
        "content": {"application/json": {"schema": TokenIn.model_json_schema()}},
    }
}


def _token_body(request: HttpRequest) -> TokenIn:
    """The JSON body of POST …/token when the request says it sends one (application/json);
    none (or another type, e.g. what ``curl -X POST`` sends): the default token."""
    content_type = request.content_type or ""
    if content_type != "application/json" or not request.body:
        return TokenIn()
    try:
        return TokenIn.model_validate_json(request.body)
    except PydanticValidationError as err:
        raise ApiError(
            400,
            "invalid_request",
            "The body is not valid.",
            problems=[
                {
                    "field": ".".join(str(part) for part in ("body", *e.get("loc", ()))),
                    "message": e.get("msg"),
                }
                for e in err.errors()
            ],
        ) from None


@api.post(
    "/datasources/{slug}/token",
    response={200: AccessTokenOut, 404: ErrorOut, 409: ErrorOut, **COMMON},
    summary="A fresh access token (token)",
    openapi_extra=_TOKEN_BODY,
)
def read_token(request: HttpRequest, response: HttpResponse, slug: str):
    """A usable access token of the datasource (refreshed first when due), for code that must
    call the API itself. With per-user tokens, the token of the user the key acts for; with
    ``{"end_user": …}``, that end user's (409 not_connected when they have none: never the
    shared token instead). Every use is recorded as a ``token_read`` event. The refresh token
    is never returned."""
    api_key = require(request, "token")
    end_user = _token_body(request).end_user
    if end_user is not None:
        _check_end_user(end_user)
    datasource = datasource_for(api_key, slug)
    try:
        if end_user is not None:
            token = tokens.get_valid_token(datasource, end_user=end_user)
        else:
            token = tokens.get_valid_token(datasource, user=api_key.user_id)
    except NotConnected as err:
        raise _not_connected(slug, err.end_user) from None
    except NotAuthorized as err:
        code = "user_required" if datasource.per_user and api_key.user_id is None else None
        raise ApiError(409, code or "not_authorized", str(err), datasource=slug) from None
    except ReauthorizationRequired as err:
        extra = {"end_user": end_user} if end_user is not None else {}
        raise ApiError(
            409, "reauthorization_required", str(err), datasource=slug, **extra
        ) from None
    except TransientUpstreamError as err:
        retry = max(1, round(err.retry_after or 1))
        raise ApiError(
            503, "token_unavailable", str(err), headers={"Retry-After": str(retry)}
        ) from None
    whose = f" for end user {end_user}" if end_user is not None else ""
    detail = f"Read through the API with key {api_key}{whose}"
    TokenEvent.objects.create(
        datasource=datasource, kind=TokenEvent.Kind.TOKEN_READ, detail=detail[:500]
    )
    logger.info("access token of datasource %s read with API key %s", slug, api_key.prefix)
    response["Cache-Control"] = "no-store"  # RFC 6749 §5.1, as for a token endpoint's answer
    return {
        "access_token": token.access_token,
        "token_type": token.token_type or "Bearer",
        "expires_at": token.expires_at,
    }


# --- end users' connections ---------------------------------------------------------------

#: Most connections on one page of the list.
MAX_CONNECTIONS_PAGE = 1000

_STATUSES = [choice.value for choice in TokenStatus]


def _check_end_user(end_user: str) -> None:
    problem = end_user_problem(end_user)
    if problem is not None:
        raise ApiError(400, "invalid_end_user", f"The end user id is not valid: {problem}.")


def _not_connected(slug: str, end_user: str) -> ApiError:
    return ApiError(
        409,
        "not_connected",
        f"End user {end_user!r} has not connected datasource {slug!r}.",
        datasource=slug,
        end_user=end_user,
    )


def _connection(token: Token) -> dict:
    return {
        "end_user": token.end_user,
        "status": token.status,
        "expires_at": token.expires_at,
        "last_refreshed_at": token.last_refreshed_at,
        "last_error": token.last_error,
        "connected_at": token.obtained_at,
        "identity": token.identity,
    }


#: The columns a connection is read from (the token values are never loaded).
_CONNECTION_FIELDS = (
    "pk",
    "end_user",
    "status",
    "expires_at",
    "last_refreshed_at",
    "last_error",
    "obtained_at",
    "identity",
)


def _connection_of(datasource: Datasource, end_user: str) -> Token:
    """The end user's token row (404 not_connected when none)."""
    _check_end_user(end_user)
    token = (
        Token.objects.select_related("datasource")
        .filter(datasource=datasource, user=None, end_user=end_user)
        .first()
    )
    if token is None:
        raise ApiError(
            404,
            "not_connected",
            f"End user {end_user!r} has no connection to datasource {datasource.slug!r}.",
            datasource=datasource.slug,
            end_user=end_user,
        )
    return token


@api.get(
    "/datasources/{slug}/connections",
    response={200: ConnectionListOut, 404: ErrorOut, **COMMON},
    summary="List end users' connections (manage)",
)
def list_connections(
    request: HttpRequest,
    slug: str,
    end_user: str | None = Query(None, description="Only this end user's connection."),
    status: str | None = Query(
        None, description=f"Only connections in this state: {', '.join(_STATUSES)}."
    ),
    cursor: str | None = Query(None, description="The next_cursor of the previous page."),
    limit: int = Query(100, ge=1, le=MAX_CONNECTIONS_PAGE),
):
    """The datasource's end users with their token state, by end user id (never a token value):
    pages follow the (datasource, end user) unique index."""
    api_key = require(request, "manage")
    datasource = datasource_for(api_key, slug)
    if status is not None and status not in _STATUSES:
        raise ApiError(
            400,
            "invalid_request",
            f"Unknown status {status!r}: one of {', '.join(_STATUSES)}.",
            problems=[{"field": "query.status", "message": "unknown status"}],
        )
    rows = Token.objects.of_end_users().filter(datasource=datasource, user=None)
    if end_user is not None:
        _check_end_user(end_user)
        rows = rows.filter(end_user=end_user)
    if status is not None:
        rows = rows.filter(status=status)
    if cursor:
        rows = rows.filter(end_user__gt=cursor)
    page = list(rows.order_by("end_user").only(*_CONNECTION_FIELDS)[: limit + 1])
    more = len(page) > limit
    page = page[:limit]
    return {
        "items": [_connection(token) for token in page],
        "next_cursor": page[-1].end_user if more else None,
    }


@api.post(
    "/datasources/{slug}/connections/{path:end_user}/refresh",
    response={200: ConnectionOut, 404: ErrorOut, 409: ErrorOut, **COMMON},
    summary="Refresh an end user's token now (manage)",
)
def refresh_connection(request: HttpRequest, slug: str, end_user: str):
    """A refresh now, whatever the token's expiry. 200 with the connection when it worked (or
    another refresh just did); 409 reauthorization_required when only the end user can help
    (a connect link); 503 token_unavailable when the provider failed for now."""
    api_key = require(request, "manage")
    datasource = datasource_for(api_key, slug)
    token = _connection_of(datasource, end_user)
    if not token.refresh_token and not datasource.machine_grant:
        raise ApiError(
            409,
            "reauthorization_required",
            f"End user {end_user!r} has no refresh token: send them through a connect link.",
            datasource=slug,
            end_user=end_user,
        )
    result = tokens.refresh_token(token, force=True)
    logger.info(
        "end user %s of datasource %s refreshed through the API with key %s: %s",
        end_user,
        slug,
        api_key.prefix,
        result.outcome,
    )
    if result.outcome == "reauthorization":
        raise ApiError(
            409,
            "reauthorization_required",
            f"End user {end_user!r} must connect datasource {slug!r} again: the provider "
            "refused the refresh token.",
            datasource=slug,
            end_user=end_user,
        )
    if result.outcome in ("transient", "configuration"):
        raise ApiError(
            503,
            "token_unavailable",
            f"The refresh of end user {end_user!r}'s token failed for now; try again later.",
            headers={"Retry-After": "5"},
        )
    token = Token.objects.only(*_CONNECTION_FIELDS).get(pk=token.pk)
    return _connection(token)


@api.delete(
    "/datasources/{slug}/connections/{path:end_user}",
    response={204: None, 404: ErrorOut, **COMMON},
    summary="Disconnect an end user (manage)",
)
def delete_connection(request: HttpRequest, slug: str, end_user: str):
    """Revoke the end user's tokens at the provider (when the datasource has a revocation URL)
    and forget them: the proxy answers 409 not_connected for them until they connect again.
    A revocation that fails is logged; the connection is deleted anyway."""
    api_key = require(request, "manage")
    datasource = datasource_for(api_key, slug)
    _check_end_user(end_user)
    try:
        problems = tokens.disconnect_end_user(datasource, end_user)
    except NotConnected:
        raise ApiError(
            404,
            "not_connected",
            f"End user {end_user!r} has no connection to datasource {slug!r}.",
            datasource=slug,
            end_user=end_user,
        ) from None
    for problem in problems:
        logger.warning("datasource %s, end user %s: %s", slug, end_user, problem)
    logger.info(
        "end user %s of datasource %s disconnected through the API with key %s",
        end_user,
        slug,
        api_key.prefix,
    )
    return Status(204, None)
