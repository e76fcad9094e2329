"""``/api/v1/datasources/<slug>/proxy/<path>``: forward a call upstream with a valid token.

The caller authenticates with an API key (or a session with ``use_datasource``); their own
credentials and cookies never go upstream. Request bodies up to PROXY_REPLAY_MAX_BYTES are
buffered so that a 401 can be answered by one refresh and one retry; larger ones stream through.
Responses stream back. One pooled keep-alive session per process; no cookie jar; no redirects.
"""

from __future__ import annotations

import http.cookiejar
import logging
import threading
import time
from typing import Any

import requests
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.views.decorators.csrf import csrf_exempt

from . import apikeys, tokens, usage
from .conf import app_settings
from .exceptions import NotAuthorized, OAuthError, TransientUpstreamError
from .models import Datasource, Token
from .upstream import path_problem, place_token, resolve_upstream_url

logger = logging.getLogger(__name__)

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
#: Caller headers that never go upstream: their credentials, cookies, and what we set ourselves.
NOT_FORWARDED = HOP_BY_HOP | {
    "host",
    "authorization",
    "cookie",
    "x-api-key",
    "x-csrftoken",
    "content-length",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
}
NOT_RETURNED = HOP_BY_HOP | {"set-cookie", "set-cookie2"}
_UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

_session_lock = threading.Lock()
_session: requests.Session | None = None


def upstream_session() -> requests.Session:
    """The process-wide pooled session: no default headers, no cookie jar, no env proxies."""
    global _session
    if _session is None:
        with _session_lock:
            if _session is None:
                session = requests.Session()
                session.trust_env = False
                session.headers.clear()
                session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
                adapter = requests.adapters.HTTPAdapter(
                    pool_connections=16, pool_maxsize=app_settings.PROXY_POOL_SIZE, max_retries=0
                )
                session.mount("http://", adapter)
                session.mount("https://", adapter)
                _session = session
    return _session


def _json_error(status: int, error: str, detail: str, **extra: Any) -> JsonResponse:
    return JsonResponse({"error": error, "detail": detail, **extra}, status=status)


@csrf_exempt
def proxy(request: HttpRequest, slug: str, path: str = "") -> HttpResponse:
    started = time.perf_counter()
    denied = _authenticate(request)
    if isinstance(denied, HttpResponse):
        return denied
    api_key = denied
    token = Token.objects.select_related("datasource").filter(datasource__slug=slug).first()
    if token is None:
        return _json_error(404, "not_found", f"No datasource with slug {slug!r}.")
    datasource = token.datasource
    if api_key is not None and not apikeys.allows(api_key, datasource):
        return _json_error(403, "forbidden", "This API key may not use this datasource.")

    def done(status: int) -> None:
        usage.record(
            datasource.pk, status, (time.perf_counter() - started) * 1000, error=status >= 500
        )

    problem = path_problem(path)
    target = None if problem else resolve_upstream_url(datasource.base_url, path)
    if target is None:
        response = _json_error(
            400, "invalid_path", f"The path would leave the datasource's base URL ({problem})."
        )
    else:
        query = request.META.get("QUERY_STRING", "")
        response = _forward(
            request, datasource, token, f"{target}?{query}" if query else target, done
        )
    if not isinstance(response, StreamingHttpResponse):
        done(response.status_code)
    return response


def _forward(
    request: HttpRequest, datasource: Datasource, token: Token, target: str, done
) -> HttpResponse:
    headers = {
        name: value for name, value in request.headers.items() if name.lower() not in NOT_FORWARDED
    }
    body, replayable = _request_body(request)
    try:
        token = tokens.get_valid_token(datasource, token=token)
        upstream = _send(request.method, datasource, token.access_token, target, headers, body)
        if upstream.status_code == 401 and replayable:
            upstream.close()
            token = tokens.refresh_after_rejection(datasource, token.access_token)
            upstream = _send(request.method, datasource, token.access_token, target, headers, body)
    except (NotAuthorized, OAuthError) as err:
        error = "not_authorized" if isinstance(err, NotAuthorized) else "reauthorization_required"
        return _json_error(
            409,
            error,
            f"Datasource {datasource.slug!r} needs to be authorized in the admin.",
            datasource=datasource.slug,
            authorize_url=request.build_absolute_uri(datasource.get_authorize_url()),
        )
    except TransientUpstreamError as err:
        response = _json_error(
            503,
            "token_unavailable",
            f"Could not get an access token for {datasource.slug!r}: {err}",
        )
        if err.retry_after:
            response["Retry-After"] = str(max(1, int(err.retry_after)))
        return response
    except requests.Timeout:
        return _json_error(504, "upstream_timeout", "The upstream API did not answer in time.")
    except requests.RequestException as err:
        return _json_error(
            502, "upstream_unreachable", f"The upstream API is unreachable ({type(err).__name__})."
        )
    return _stream_back(upstream, done)


def _authenticate(request: HttpRequest):
    """The ApiKey used (None for a session user), or an error response."""
    header = request.META.get("HTTP_AUTHORIZATION", "")
    key = ""
    if header[:8].lower() == "api-key ":
        key = header[8:].strip()
    elif request.META.get("HTTP_X_API_KEY"):
        key = request.META["HTTP_X_API_KEY"].strip()
    if key:
        api_key = apikeys.authenticate(key)
        if api_key is None:
            return _unauthorized("The API key is not valid or was revoked.")
        return api_key
    user = getattr(request, "user", None)
    if user is not None and user.is_authenticated:
        if not user.has_perm("datasources.use_datasource"):
            return _json_error(403, "forbidden", "You may not use datasources.")
        if request.method in _UNSAFE_METHODS:
            rejected = CsrfViewMiddleware(lambda r: None).process_view(request, None, (), {})
            if rejected is not None:
                return _json_error(403, "csrf_failed", "CSRF verification failed.")
        return None
    return _unauthorized("Send Authorization: Api-Key <key>.")


def _unauthorized(detail: str) -> JsonResponse:
    response = _json_error(401, "unauthorized", detail)
    response["WWW-Authenticate"] = 'Api-Key realm="datasources"'
    return response


class _BodyStream:
    """A request body of known length, read from the WSGI input as requests sends it."""

    def __init__(self, request: HttpRequest, length: int) -> None:
        self._request = request
        self._length = length

    def __len__(self) -> int:
        return self._length

    def read(self, size: int = -1) -> bytes:
        return self._request.read(size)


def _request_body(request: HttpRequest) -> tuple[bytes | _BodyStream | None, bool]:
    try:
        length = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    if length <= 0:
        return None, True
    if length <= app_settings.PROXY_REPLAY_MAX_BYTES:
        return request.read(), True
    return _BodyStream(request, length), False


def _send(
    method: str,
    datasource: Datasource,
    access_token: str,
    url: str,
    headers: dict[str, str],
    body: bytes | _BodyStream | None,
) -> requests.Response:
    url, headers = place_token(datasource, access_token, url, dict(headers))
    return upstream_session().request(
        method,
        url,
        headers=headers,
        data=body,
        stream=True,
        allow_redirects=False,
        timeout=(app_settings.PROXY_CONNECT_TIMEOUT, app_settings.PROXY_READ_TIMEOUT),
    )


def _stream_back(upstream: requests.Response, done) -> StreamingHttpResponse:
    chunk_size = app_settings.PROXY_CHUNK_SIZE

    def content():
        try:
            # Raw bytes: a compressed body stays compressed, matching Content-Encoding.
            yield from upstream.raw.stream(chunk_size, decode_content=False)
        finally:
            upstream.close()
            done(upstream.status_code)

    response = StreamingHttpResponse(content(), status=upstream.status_code)
    if "Content-Type" not in upstream.headers:
        del response["Content-Type"]
    for name, value in upstream.headers.items():
        if name.lower() not in NOT_RETURNED:
            response[name] = value
    return response
