"""``/api/v1/datasources/<slug>/proxy/<path>``: forward a call upstream with a valid token.

The caller authenticates with an API key (or a session with ``use_datasource``); their own
credentials and cookies never go upstream. Request bodies up to PROXY_REPLAY_MAX_BYTES are
buffered so that a 401 can be answered by one refresh and one retry; larger ones stream through.
Responses stream back. One pooled keep-alive connection pool per process (urllib3: no cookie
jar, no redirects, no environment proxies). Verified API keys and each datasource's current
token are kept in memory for PROXY_CACHE_SECONDS so the hot path does not query the database.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import urllib3
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.debug import sensitive_variables

from . import apikeys, tokens, usage
from .conf import app_settings
from .exceptions import NotAuthorized, ReauthorizationRequired, TransientUpstreamError
from .models import ApiKey, Datasource, Token
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


# --- process-wide state ---------------------------------------------------------------------

_pool_lock = threading.Lock()
_pool: urllib3.PoolManager | None = None


def upstream_pool() -> urllib3.PoolManager:
    """The process-wide keep-alive pool. urllib3 keeps no cookies and follows nothing itself."""
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                _pool = urllib3.PoolManager(
                    num_pools=64, maxsize=app_settings.PROXY_POOL_SIZE, retries=False, block=False
                )
    return _pool


class _TTLCache:
    def __init__(self) -> None:
        self._data: dict[Any, tuple[float, Any]] = {}
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        item = self._data.get(key)
        if item is not None and item[0] > time.monotonic():
            return item[1]
        return None

    def put(self, key: Any, value: Any) -> None:
        ttl = app_settings.PROXY_CACHE_SECONDS
        if ttl <= 0:
            return
        with self._lock:
            if len(self._data) > 10_000:
                self._data.clear()
            self._data[key] = (time.monotonic() + ttl, value)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


@dataclass(frozen=True)
class _Caller:
    api_key_id: int | None
    allowed: frozenset[int] | None  # None: every datasource
    user_id: int | None  # the session user, or the user an API key acts for


_tokens = _TTLCache()  # (slug, user id or None) -> Token (with its datasource)
_keys = _TTLCache()  # apikeys.hash_key(key) -> _Caller


@receiver(post_save, sender=Datasource)
@receiver(post_delete, sender=Datasource)
@receiver(post_save, sender=ApiKey)
@receiver(post_delete, sender=ApiKey)
def _forget(**kwargs: Any) -> None:
    """This process's edits apply at once; other processes' within PROXY_CACHE_SECONDS."""
    _tokens.clear()
    _keys.clear()


# --- the view -------------------------------------------------------------------------------


def _json_error(status: int, error: str, detail: str, **extra: Any) -> JsonResponse:
    return JsonResponse({"error": error, "detail": detail, **extra}, status=status)


@csrf_exempt
def proxy(request: HttpRequest, slug: str, path: str = "") -> HttpResponse:
    started = time.perf_counter()
    caller = _authenticate(request)
    if isinstance(caller, HttpResponse):
        return caller
    token = _tokens.get((slug, caller.user_id)) or _tokens.get((slug, None))
    if token is None:
        try:
            token = Token.objects.select_related("datasource").get(datasource__slug=slug, user=None)
        except Token.DoesNotExist:
            return _json_error(404, "not_found", f"No datasource with slug {slug!r}.")
    datasource = token.datasource
    if caller.allowed is not None and datasource.pk not in caller.allowed:
        return _json_error(403, "forbidden", "This API key may not use this datasource.")
    if datasource.per_user and token.user_id is None:
        if caller.user_id is None:
            return _json_error(
                409,
                "user_required",
                f"Datasource {slug!r} has per-user tokens: call it as a user, or with an API key "
                "that acts for one.",
                datasource=slug,
            )
        token = tokens.load_token(datasource, caller.user_id)

    def done(status: int) -> None:
        usage.record(
            datasource.pk, status, (time.perf_counter() - started) * 1000, error=status >= 500
        )

    target = resolve_upstream_url(datasource.base_url, path)
    if "chunked" in request.META.get("HTTP_TRANSFER_ENCODING", "").lower():
        # WSGI gives no portable access to a chunked body; refuse rather than send it empty.
        response = _json_error(
            411, "length_required", "Send the request body with a Content-Length."
        )
    elif target is None:
        problem = path_problem(path) or "it would leave the base URL"
        response: HttpResponse = _json_error(
            400, "invalid_path", f"The path would leave the datasource's base URL ({problem})."
        )
    else:
        query = request.META.get("QUERY_STRING", "")
        response = _forward(request, token, f"{target}?{query}" if query else target, done)
    if not response.streaming:  # a streamed answer is counted when its body has been sent
        done(response.status_code)
    return response


def _forward(
    request: HttpRequest, token: Token, target: str, done: Callable[[int], None]
) -> HttpResponse:
    datasource = token.datasource
    headers = {
        name: value for name, value in request.headers.items() if name.lower() not in NOT_FORWARDED
    }
    body, replayable = _request_body(request, headers)
    try:
        token = tokens.get_valid_token(datasource, token=token)
        _tokens.put((datasource.slug, token.user_id), token)
        upstream = _send(request.method, datasource, token.access_token, target, headers, body)
        if upstream.status in datasource.expiry_statuses and replayable:
            # Refresh once and retry once, unless the rules say the answer stands (the token is
            # too young to blame, or a refresh failed moments ago): then it is passed on.
            retry = tokens.refresh_after_rejection(
                datasource, token.access_token, user=token.user_id
            )
            if retry is not None:
                upstream.drain_conn()
                upstream.release_conn()
                token = retry
                _tokens.put((datasource.slug, token.user_id), token)
                upstream = _send(
                    request.method, datasource, token.access_token, target, headers, body
                )
    except (NotAuthorized, ReauthorizationRequired) as err:
        error = "not_authorized" if isinstance(err, NotAuthorized) else "reauthorization_required"
        if datasource.per_user:
            where, url = "by the calling user", datasource.get_connect_url()
        else:
            where, url = "in the admin", datasource.get_authorize_url()
        return _json_error(
            409,
            error,
            f"Datasource {datasource.slug!r} needs to be authorized {where}.",
            datasource=datasource.slug,
            authorize_url=request.build_absolute_uri(url),
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
    except urllib3.exceptions.NewConnectionError:  # (a ConnectTimeoutError subclass in urllib3)
        return _json_error(502, "upstream_unreachable", "The upstream API refused the connection.")
    except urllib3.exceptions.TimeoutError:
        return _json_error(504, "upstream_timeout", "The upstream API did not answer in time.")
    except urllib3.exceptions.HTTPError as err:
        return _json_error(
            502, "upstream_unreachable", f"The upstream API is unreachable ({type(err).__name__})."
        )
    return _stream_back(upstream, done)


@sensitive_variables()
def _authenticate(request: HttpRequest) -> _Caller | HttpResponse:
    header = request.META.get("HTTP_AUTHORIZATION", "")
    key = ""
    if header[:8].lower() == "api-key ":
        key = header[8:].strip()
    elif request.META.get("HTTP_X_API_KEY"):
        key = request.META["HTTP_X_API_KEY"].strip()
    if key:
        digest = apikeys.hash_key(key)
        caller = _keys.get(digest)
        if caller is None:
            api_key = apikeys.authenticate(key)
            if api_key is None:
                return _unauthorized("The API key is not valid or was revoked.")
            caller = _Caller(api_key.pk, apikeys.allowed_datasource_ids(api_key), api_key.user_id)
            _keys.put(digest, caller)
        return caller
    user = getattr(request, "user", None)
    if user is not None and user.is_authenticated:
        if not user.has_perm("datasources.use_datasource"):
            return _json_error(403, "forbidden", "You may not use datasources.")
        if request.method in _UNSAFE_METHODS:
            rejected = CsrfViewMiddleware(lambda r: None).process_view(request, None, (), {})
            if rejected is not None:
                return _json_error(403, "csrf_failed", "CSRF verification failed.")
        return _Caller(None, None, user.pk)
    return _unauthorized("Send Authorization: Api-Key <key>.")


def _unauthorized(detail: str) -> JsonResponse:
    response = _json_error(401, "unauthorized", detail)
    response["WWW-Authenticate"] = 'Api-Key realm="datasources"'
    return response


class _BodyStream:
    """A request body of known length, read from the WSGI input as it is sent upstream."""

    def __init__(self, request: HttpRequest) -> None:
        self._request = request

    def read(self, size: int = -1) -> bytes:
        return self._request.read(size)


def _request_body(
    request: HttpRequest, headers: dict[str, str]
) -> tuple[bytes | _BodyStream | None, bool]:
    try:
        length = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    if length <= 0:
        return None, True
    headers["Content-Length"] = str(length)
    if length <= app_settings.PROXY_REPLAY_MAX_BYTES:
        return request.read(), True
    return _BodyStream(request), False


#: No retries (a failed call is reported, never repeated) and no redirects followed.
_NO_RETRIES = urllib3.Retry(total=False, redirect=False)


@functools.lru_cache(maxsize=1024)
def _origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of a base URL, parsed once per process rather than per call."""
    parts = urllib3.util.parse_url(url)
    return parts.scheme or "http", parts.host or "", parts.port


@functools.lru_cache(maxsize=16)
def _timeout(connect: float, read: float) -> urllib3.Timeout:
    return urllib3.Timeout(connect=connect, read=read)


@sensitive_variables()
def _send(
    method: str,
    datasource: Datasource,
    access_token: str,
    url: str,
    headers: dict[str, str],
    body: bytes | _BodyStream | None,
) -> urllib3.BaseHTTPResponse:
    url, headers = place_token(datasource, access_token, url, dict(headers))
    scheme, host, port = _origin(datasource.base_url)
    # The origin's pool directly: the URL was built from base_url, so it is on that origin, and
    # only its path and query are sent (what PoolManager.request would do, minus re-parsing).
    pool = upstream_pool().connection_from_host(host, port=port, scheme=scheme)
    return pool.urlopen(
        method,
        _request_target(url),
        body=body,
        headers=headers,
        preload_content=False,
        decode_content=False,
        redirect=False,
        retries=_NO_RETRIES,
        assert_same_host=False,
        timeout=_timeout(app_settings.PROXY_CONNECT_TIMEOUT, app_settings.PROXY_READ_TIMEOUT),
    )


def _request_target(url: str) -> str:
    """The path and query of an absolute URL (``scheme://authority`` removed)."""
    slash = url.find("/", url.find("//") + 2)
    return url[slash:] if slash >= 0 else "/"


def _stream_back(upstream: urllib3.BaseHTTPResponse, done: Callable[[int], None]) -> HttpResponse:
    chunk_size = app_settings.PROXY_CHUNK_SIZE
    length = upstream.headers.get("Content-Length", "")
    if length.isdigit() and int(length) <= chunk_size:
        # Small bodies (most API answers) are relayed in one piece: cheaper than a stream.
        try:
            body = upstream.read(decode_content=False)
        finally:
            upstream.release_conn()
        response: HttpResponse = HttpResponse(body, status=upstream.status)
        _copy_headers(upstream, response)
        return response

    def content() -> Iterator[bytes]:
        try:
            # Raw bytes: a compressed body stays compressed, matching Content-Encoding.
            yield from upstream.stream(chunk_size, decode_content=False)
        finally:
            upstream.release_conn()
            done(upstream.status)

    streaming = StreamingHttpResponse(content(), status=upstream.status)
    _copy_headers(upstream, streaming)
    return streaming


def _copy_headers(upstream: urllib3.BaseHTTPResponse, response: HttpResponse) -> None:
    if "Content-Type" not in upstream.headers:
        del response["Content-Type"]
    for name, value in upstream.headers.itermerged():
        if name.lower() not in NOT_RETURNED:
            response[name] = value
