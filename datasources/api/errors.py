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
            {"field": ".".join(str(part) for part in e.get("loc", ())), "message": e.get("msg")}
            for e in err.errors
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
        code = {405: "method_not_allowed", 403: "forbidden"}.get(err.status_code, "error")
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
