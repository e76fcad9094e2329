"""The proxy's answers as Django responses, for both serving paths (:mod:`.view`, :mod:`.lane`).

:mod:`datasources.calls` decides (a refusal is plain data: status, JSON body, headers); this
module only renders it and logs it the way Django logs a response, so the view and the fast lane
answer and log a refusal identically without the lane importing the view.
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils.log import log_response

from ..calls.call import Refused


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
