"""``/api/v1/datasources/<slug>/proxy/<path>``: forward a call upstream with a valid token.

Thin: who is calling (:mod:`.callers`), which datasource and token (:mod:`.cache`), where the call
goes (:mod:`.target`), sending it and relaying the answer (:mod:`.transport`), counting it
(:mod:`.usage`). Everything refused is refused before anything is sent upstream.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

import urllib3
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils.log import log_response
from django.views.decorators.csrf import csrf_exempt

from .. import tokens
from ..calls import binding, health, retries, target, transport
from ..calls.attempts import URLLIB3, Attempts
from ..calls.limits import Verdict
from ..exceptions import NotAuthorized, ReauthorizationRequired, TransientUpstreamError
from ..models import Datasource, Token
from ..ops import tracing
from ..security import dpop, tls
from . import cache, callers, calllog, usage
from .callers import Refused


@csrf_exempt  # session callers are CSRF-checked in callers.authenticate (API keys need none)
def proxy(request: HttpRequest, slug: str, path: str = "") -> HttpResponse:
    # --- tracing (datasources/tracing.py): one span around the call --------------------------
    with tracing.span(
        tracing.PROXY, {"http.request.method": request.method}, parent_headers=request.headers
    ) as span:
        response, call = _proxy(request, slug, path)
        if span is not tracing.NOOP:
            _describe(span, slug, call, response.status_code)
    return response


def _describe(span: tracing.Span, slug: str, call: calllog.Call, status: int) -> None:
    """The proxy span's attributes: nothing the caller typed but a known datasource's slug."""
    if call.error != "not_found":
        span.set("datasources.datasource", slug)
    span.set(
        "datasources.caller", "api_key" if call.api_key_id else "user" if call.user_id else "none"
    )
    span.set("http.response.status_code", status)
    span.set("datasources.retries", call.retries)
    span.set("datasources.refreshed", call.refreshed)
    if call.error:
        span.set("datasources.refusal", call.error)
    if status >= 500:
        span.fail(call.error or str(status))


def _proxy(request: HttpRequest, slug: str, path: str) -> tuple[HttpResponse, calllog.Call]:
    call = calllog.Call.begin(request.method, path, _content_length(request))
    datasource: Datasource | None = None

    def done(status: int) -> None:
        if datasource is not None:
            elapsed = (time.perf_counter() - call.started) * 1000
            usage.record(datasource.pk, status, elapsed, error=status >= 500)
            calllog.record(call, datasource.pk, status, elapsed)

    try:
        caller = callers.authenticate(request)
        call.api_key_id, call.user_id = caller.api_key_id, caller.user_id
        token = token_for(slug, caller)
        assert token is not None
        datasource = token.datasource
        url = check_request(
            request.method,
            datasource,
            path,
            chunked=bool(request.META.get("HTTP_TRANSFER_ENCODING")),
        )
        response = _forward(request, caller, token, url, done, call)
    except Refused as refused:
        call.error = refused.error
        response = refusal_response(request, refused)
    if response.streaming:  # counted (and logged, by relay's done) when its body has been sent
        response.streaming_content = _counted(response.streaming_content, call)
    else:
        call.response_bytes = len(response.content)
        done(response.status_code)
    return response, call


def _counted(chunks: Iterable[bytes], call: calllog.Call) -> Iterator[bytes]:
    for chunk in chunks:
        call.response_bytes += len(chunk)
        yield chunk


def _content_length(request: HttpRequest) -> int:
    value = request.META.get("CONTENT_LENGTH") or ""
    return int(value) if value.isdigit() else 0


def token_for(slug: str, caller: callers.Caller, *, cached_only: bool = False) -> Token | None:
    """The token (with its datasource) ``caller`` calls ``slug`` with, or Refused (404, 403,
    409 user_required). ``cached_only``: None instead of reading the database (the fast lane
    asks this first, on its event loop)."""
    token = cache.tokens.get((slug, caller.user_id))
    if token is None and caller.user_id is not None:
        token = cache.tokens.get((slug, None))
    if token is None:
        if cached_only:
            return None
        try:
            token = Token.objects.select_related("datasource").get(datasource__slug=slug, user=None)
        except Token.DoesNotExist:
            raise Refused(404, "not_found", f"No datasource with slug {slug!r}.") from None
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
        token = tokens.load_token(datasource, caller.user_id)
    return token


def check_request(method: str, datasource: Datasource, path: str, *, chunked: bool) -> str:
    """The upstream URL (without query), or Refused: 405 method, 400 path, 411 chunked body
    (a Transfer-Encoding header)."""
    if method not in datasource.allowed_method_set:
        refused = Refused(
            405,
            "method_not_allowed",
            f"Datasource {datasource.slug!r} does not allow {method} calls.",
        )
        refused.headers["Allow"] = ", ".join(sorted(datasource.allowed_method_set))
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


def _forward(
    request: HttpRequest,
    caller: callers.Caller,
    token: Token,
    url: str,
    done,
    call: calllog.Call,
) -> HttpResponse:
    datasource = token.datasource
    query = request.META.get("QUERY_STRING", "")
    body, length, replayable = transport.request_body(request)

    def headers_for(token: Token) -> dict[str, str]:
        placed = binding.auth_headers(datasource, token, request.method, url)
        headers = transport.request_headers(datasource, request.headers, placed, length)
        tracing.inject(headers)  # traceparent upstream, only with TRACING_PROPAGATE
        return headers

    def send(token: Token) -> urllib3.BaseHTTPResponse:
        return transport.send_for_token(
            request.method, datasource, url, query, token, headers_for, body, replayable
        )

    gate = health.admit(datasource.pk)
    if gate.verdict in (Verdict.RATE_LIMITED, Verdict.CIRCUIT_OPEN):
        # Remembered from an earlier answer, in any process: the upstream is not called.
        refused = Refused(*health.refusal(gate))
        refused.headers["Retry-After"] = health.retry_after_header(gate)
        raise refused
    try:
        token = tokens.get_valid_token(datasource, token=token)
        cache.tokens.keep((datasource.slug, token.user_id), token)
        attempts = Attempts(
            datasource,
            token,
            URLLIB3,
            method=request.method,
            policy=retries.RetryPolicy.of(
                datasource, requested=request.headers.get(retries.RETRIES_HEADER)
            ),
            replayable=replayable,
            idempotency_key=bool(request.headers.get(retries.IDEMPOTENCY_HEADER)),
            on_token=lambda fresh: cache.tokens.put((datasource.slug, fresh.user_id), fresh),
            observe=health.observe,
        )
        try:
            upstream = attempts.run(send)
        finally:
            call.retries, call.refreshed = attempts.retries, attempts.refreshed
    except Exception as err:
        refused = refusal_for(err, request, datasource)
        if refused is None:
            raise
        raise refused from None
    response = transport.relay(upstream, browser=caller.is_browser, done=done)
    log_upstream_error(request, response, datasource.slug)
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


def refusal_for(err: Exception, request: HttpRequest, datasource: Datasource) -> Refused | None:
    """The answer for a failure while getting a token or calling upstream (None: not ours to
    answer, an error of this server). Shared by the view and the fast lane (.lane)."""
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
            authorize_url=request.build_absolute_uri(authorize_url),
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


def refusal_response(request: HttpRequest, refused: Refused) -> JsonResponse:
    response = JsonResponse(
        {"error": refused.error, "detail": refused.detail, **refused.extra}, status=refused.status
    )
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
