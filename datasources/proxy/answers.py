"""The proxy's Django side of a call: the request body handed to the call, and its outcome as
a Django response, for both serving paths (:mod:`.view`, :mod:`.lane`).

:mod:`datasources.calls` decides and sends (a refusal is plain data: status, JSON body,
headers; the answer's headers are filtered there) and knows no Django request or response
types; this module renders a refusal and logs it the way Django logs a response (the view and
the fast lane answer alike without the lane importing the view), reads the view's request body
and relays an upstream answer as the view's response.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import urllib3
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.utils.log import log_response

from ..calls import transport
from ..calls.call import Refused
from ..conf import app_settings
from ..exceptions import is_database_outage


def refusal_response(request: HttpRequest, refused: Refused) -> JsonResponse:
    """``refused`` as the proxy's JSON error answer, logged as a warning."""
    response = JsonResponse(refused.body(), status=refused.status)
    for name, value in refused.headers.items():
        response[name] = value
    # Expected outcomes (bad credentials, a datasource needing authorization, the token endpoint
    # down) are warnings: Django would log every 5xx at ERROR, one line per call in an outage.
    log_response(
        "Proxy call refused (%s %s): %s",
        refused.status,
        refused.error,
        request.path,
        response=response,
        request=request,
        level="warning",
    )
    return response


#: Seconds a caller is told to wait while the database is unavailable (a restart, a failover).
DATABASE_RETRY_AFTER = 2


def failure_refusal(err: BaseException) -> Refused:
    """An error of this server while serving a call (not an upstream's answer, not a refusal)
    as the answer both serving paths give: the database unavailable is ``503
    database_unavailable`` with Retry-After (it comes back by itself: callers retry); anything
    else ``500 internal_error``. JSON with no detail of the error: never a traceback."""
    if is_database_outage(err):
        refused = Refused(
            503, "database_unavailable", "The database is unavailable; try again shortly."
        )
        refused.headers["Retry-After"] = str(DATABASE_RETRY_AFTER)
        return refused
    return Refused(
        500,
        "internal_error",
        "The proxy failed while handling this call; the error has been logged.",
    )


def failure_response(
    request: HttpRequest | None, refused: Refused, err: BaseException, slug: str, path: str
) -> JsonResponse:
    """:func:`failure_refusal`'s ``refused`` as a response, logged once (marked as logged, so
    Django's handler does not log it again) with the datasource's slug and the path: a database
    outage as a warning by the error's name only (its message can carry the database's URL and
    password), anything else as an error with its traceback (messages of ours carry no
    secret)."""
    response = JsonResponse(refused.body(), status=refused.status)
    for name, value in refused.headers.items():
        response[name] = value
    if refused.status == 503:
        log_response(
            "Proxy call to %s failed: the database is unavailable (%s): %s",
            slug or "-",
            type(err).__name__,
            path,
            response=response,
            request=request,
            level="warning",
        )
    else:
        log_response(
            "Proxy call to %s failed (%s): %s",
            slug or "-",
            type(err).__name__,
            path,
            response=response,
            request=request,
            level="error",
            exception=err,
        )
    return response


def log_upstream_error(request: HttpRequest, response: HttpResponse, slug: str) -> None:
    """An upstream's own 5xx, passed on, is logged as a warning: not an error of this server."""
    if response.status_code >= 500:
        log_response(
            "Upstream of datasource %s answered %s: %s",
            slug,
            response.status_code,
            request.path,
            response=response,
            request=request,
            level="warning",
        )


# --- the view's request body and relayed answer ----------------------------------------------


class BodyStream:
    """A request body of known length, read from the WSGI input as it is sent upstream."""

    def __init__(self, request: HttpRequest) -> None:
        self._request = request

    def read(self, size: int = -1) -> bytes:
        return self._request.read(size)


def request_body(request: HttpRequest) -> tuple[bytes | BodyStream | None, int, bool]:
    """(body, length, replayable). Bodies up to PROXY_REPLAY_MAX_BYTES are read so that a
    refresh-and-retry can send them again; larger ones stream through once."""
    try:
        length = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    if length <= 0:
        return None, 0, True
    if length <= app_settings.PROXY_REPLAY_MAX_BYTES:
        return request.read(), length, True
    return BodyStream(request), length, False


def relay(
    upstream: urllib3.BaseHTTPResponse, *, browser: bool, done: Callable[[int], None]
) -> HttpResponse:
    """The upstream's answer for our caller: small bodies in one piece, others streamed (raw
    bytes: a compressed body stays compressed, matching Content-Encoding)."""
    chunk_size = app_settings.PROXY_CHUNK_SIZE
    if transport.answered_in_one_piece(upstream.headers):
        try:
            body = upstream.read(decode_content=False)
        finally:
            upstream.release_conn()
        response: HttpResponse = HttpResponse(body, status=upstream.status)
        copy_headers(upstream.headers, response, browser=browser)
        return response

    def content() -> Iterator[bytes]:
        try:
            yield from upstream.stream(chunk_size, decode_content=False)
        finally:
            upstream.release_conn()
            done(upstream.status)

    streaming = StreamingHttpResponse(content(), status=upstream.status)
    copy_headers(upstream.headers, streaming, browser=browser)
    return streaming


def copy_headers(headers: urllib3.HTTPHeaderDict, response: HttpResponse, *, browser: bool) -> None:
    """The headers of :func:`datasources.calls.transport.answer_headers` set on ``response`` (Django's default
    Content-Type removed when the upstream sent none)."""
    if "Content-Type" not in headers:
        del response["Content-Type"]
    for name, value in transport.answer_headers(headers, browser=browser):
        response[name] = value
