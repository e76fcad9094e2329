"""``/api/v1/datasources/<slug>/proxy/<path>``: forward a call upstream with a valid token.

Thin: who is calling (:mod:`.callers`); the call's steps (which token, where the call goes, the
health gate, the attempts, a failure as an answer) are :mod:`datasources.calls.call`'s, shared
with the fast lane, the Python client and the admin's Test; sending it and relaying the answer
(:mod:`datasources.calls.transport`), counting it (:mod:`.usage`). Everything refused is refused
before anything is sent upstream.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

import urllib3
from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt

from .. import tokens
from ..calls import binding, health, retries, transport
from ..calls import call as steps
from ..calls.attempts import URLLIB3
from ..models import Datasource, Token
from ..ops import tracing
from . import answers, cache, callers, calllog, usage
from .callers import Refused


@csrf_exempt  # session callers are CSRF-checked in callers.authenticate (API keys need none)
def proxy(request: HttpRequest, slug: str, path: str = "") -> HttpResponse:
    # --- tracing (datasources/ops/tracing.py): one span around the call --------------------------
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
        token = steps.token_for(
            slug, caller, cache.tokens, end_user=request.headers.get(steps.END_USER_HEADER)
        )
        assert token is not None
        datasource = token.datasource
        call.end_user = token.end_user
        url = steps.check_request(
            request.method,
            datasource,
            path,
            chunked=bool(request.META.get("HTTP_TRANSFER_ENCODING")),
        )
        response = _forward(request, caller, token, url, done, call)
    except Refused as refused:
        call.error = refused.error
        response = answers.refusal_response(request, refused)
    except Exception as err:  # an error of ours (the database away, a bug): JSON, logged once
        refused = answers.failure_refusal(err)
        call.error = refused.error
        response = answers.failure_response(request, refused, err, slug, request.path)
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
    body, length, replayable = answers.request_body(request)

    def headers_for(token: Token) -> dict[str, str]:
        placed = binding.auth_headers(datasource, token, request.method, url)
        headers = transport.request_headers(datasource, request.headers, placed, length)
        tracing.inject(headers)  # traceparent upstream, only with TRACING_PROPAGATE
        return headers

    def send(token: Token) -> urllib3.BaseHTTPResponse:
        return transport.send_for_token(
            request.method, datasource, url, query, token, headers_for, body, replayable
        )

    refused = steps.gate(datasource)
    if refused is not None:  # remembered from an earlier answer, in any process
        raise refused
    try:
        token = tokens.get_valid_token(datasource, token=token)
        cache.tokens.keep(steps.key_of(token), token)
        attempts = steps.attempts_for(
            datasource,
            token,
            URLLIB3,
            method=request.method,
            requested_retries=request.headers.get(retries.RETRIES_HEADER),
            replayable=replayable,
            idempotency_key=bool(request.headers.get(retries.IDEMPOTENCY_HEADER)),
            on_token=lambda fresh: cache.tokens.put(steps.key_of(fresh), fresh),
            observe=health.observe,
        )
        try:
            upstream = attempts.run(send)
        finally:
            call.retries, call.refreshed = attempts.retries, attempts.refreshed
    except Exception as err:
        refused = steps.refusal_for(
            err, datasource, request.build_absolute_uri, end_user=token.end_user
        )
        if refused is None:
            raise
        raise refused from None
    response = answers.relay(upstream, browser=caller.is_browser, done=done)
    answers.log_upstream_error(request, response, datasource.slug)
    return response
