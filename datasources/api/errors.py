"""Every error of the JSON API as ``{"error": <stable code>, "detail": <sentence>}``.

django-ninja answers its own errors as ``{"detail": …}``; the handlers registered by
:func:`install` turn each of them (authentication, validation, 404, anything unexpected) into
the shape the proxy uses too, so a client handles one error format across the product.
"""

from __future__ import annotations

import logging
from typing import Any

from django.http import Http404, HttpRequest, HttpResponse
from ninja import NinjaAPI
from ninja.errors import AuthenticationError, HttpError, ValidationError

from ..exceptions import is_database_outage

logger = logging.getLogger(__name__)

#: Seconds a caller is told to wait while the database is unavailable.
DATABASE_RETRY_AFTER = 2


class ApiError(Exception):
    """An answer other than success: ``status``, a stable ``error`` code, a ``detail`` sentence
    (never a secret), extra JSON fields and headers."""

    def __init__(
        self,
        status: int,
        error: str,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        self.status, self.error, self.detail = status, error, detail
        self.headers = headers or {}
        self.extra = extra
        super().__init__(detail)


#: django-ninja's names for where a value came from, and its wrapper for a body schema:
#: not the client's field names.
_LOCATIONS = frozenset({"body", "query", "path", "header", "payload"})


def field_name(loc: tuple | list) -> str:
    """A validation error's field as the client named it: ``limit``, ``end_user``,
    ``items.0.name`` (without ninja's ``query.`` / ``body.payload.`` prefixes)."""
    parts = [str(part) for part in loc]
    while parts and parts[0] in _LOCATIONS:
        parts.pop(0)
    return ".".join(parts)


def import_problem(line: str) -> dict[str, str]:
    """One line of the import's validation (``entry 1 (slug 'x'): field: message``) as a
    problem of a single-datasource request: ``{"field", "message"}``."""
    _, _, rest = line.partition("): ")
    field, sep, message = rest.partition(": ")
    if not sep or " " in field:
        return {"field": "", "message": rest or line}
    return {"field": "" if field == "__all__" else field, "message": message}


def _answer(api: NinjaAPI, request: HttpRequest, err: ApiError) -> HttpResponse:
    response = api.create_response(
        request, {"error": err.error, "detail": err.detail, **err.extra}, status=err.status
    )
    for name, value in err.headers.items():
        response[name] = value
    return response


def install(api: NinjaAPI) -> None:
    """Register the handlers on ``api``."""

    @api.exception_handler(ApiError)
    def api_error(request: HttpRequest, err: ApiError) -> HttpResponse:
        return _answer(api, request, err)

    @api.exception_handler(AuthenticationError)
    def unauthorized(request: HttpRequest, err: AuthenticationError) -> HttpResponse:
        return _answer(
            api,
            request,
            ApiError(
                401,
                "unauthorized",
                "Send Authorization: Api-Key <key> with a valid, unrevoked key.",
                headers={"WWW-Authenticate": 'Api-Key realm="datasources"'},
            ),
        )

    @api.exception_handler(ValidationError)
    def invalid(request: HttpRequest, err: ValidationError) -> HttpResponse:
        problems = [
            {"field": field_name(e.get("loc", ())), "message": e.get("msg")} for e in err.errors
        ]
        return _answer(
            api,
            request,
            ApiError(400, "invalid_request", "The request is not valid.", problems=problems),
        )

    @api.exception_handler(Http404)
    def not_found(request: HttpRequest, err: Http404) -> HttpResponse:
        return _answer(api, request, ApiError(404, "not_found", "No such resource."))

    @api.exception_handler(HttpError)
    def http_error(request: HttpRequest, err: HttpError) -> HttpResponse:
        # django-ninja raises 400 for a body it cannot parse (not JSON, another content type).
        code = {400: "invalid_request", 405: "method_not_allowed", 403: "forbidden"}.get(
            err.status_code, "error"
        )
        return _answer(api, request, ApiError(err.status_code, code, str(err)))

    @api.exception_handler(Exception)
    def unexpected(request: HttpRequest, err: Exception) -> HttpResponse:
        if is_database_outage(err):
            logger.warning(
                "API call failed: the database is unavailable (%s): %s",
                type(err).__name__,
                request.path,
            )
            return _answer(
                api,
                request,
                ApiError(
                    503,
                    "database_unavailable",
                    "The database is unavailable; try again shortly.",
                    headers={"Retry-After": str(DATABASE_RETRY_AFTER)},
                ),
            )
        logger.error("API call failed (%s): %s", type(err).__name__, request.path, exc_info=err)
        return _answer(
            api,
            request,
            ApiError(500, "internal_error", "The API failed; the error has been logged."),
        )
