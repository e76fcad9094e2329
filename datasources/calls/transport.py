"""Talking to the upstream API: one keep-alive pool per process, headers filtered both ways,
request bodies sent as the serving path hands them in, the answer's headers filtered. Building
a Django response from the answer is the serving path's job (:mod:`datasources.proxy.answers`):
this package knows no serving types.

urllib3 directly: no cookie jar, no redirects followed, no environment proxies, no retries.

Request headers: the caller's own credentials and cookies, hop-by-hop headers and the headers
named in the caller's ``Connection`` header, URL and method overrides (``X-Original-URL``,
``X-HTTP-Method-Override`` …) and client-address headers never go upstream. The datasource's
default headers fill in what the caller did not send; the token's header is always ours.

Response headers: hop-by-hop and ``Connection``-named headers, cookies, and headers that would
set policy for our whole origin (HSTS, Alt-Svc, reporting endpoints) never come back. Every
answer is inert in a browser (``Content-Security-Policy: sandbox``, ``nosniff``); to a signed-in
browser session, whose pages share our origin with the admin, upstream CORS, ``Clear-Site-Data``,
framing, refresh and link headers are removed as well. API-key callers get the body unchanged.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Mapping
from typing import Protocol

import urllib3
from django.views.decorators.debug import sensitive_variables

from ..conf import app_settings
from ..models import Datasource, Token
from ..security import tls
from . import binding, target

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
#: Caller headers that never go upstream.
NOT_FORWARDED = HOP_BY_HOP | {
    # the caller's own credentials and cookies
    "authorization",
    "cookie",
    "x-api-key",
    "x-csrftoken",
    "dpop",  # a proof is ours to make, for our key
    # addressed to this proxy, not to the upstream (see proxy/retries.py)
    "x-datasource-retries",
    "x-datasource-end-user",  # selects an end user's token (calls/call.py)
    # set by us (or by urllib3) for the upstream
    "host",
    "content-length",
    "expect",
    # proxy and client-address headers: the upstream must not trust what a caller claims
    "forwarded",
    "via",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-server",
    "x-forwarded-scheme",
    "x-forwarded-ssl",
    "x-real-ip",
    "true-client-ip",
    "x-client-ip",
    "x-cluster-client-ip",
    "cf-connecting-ip",
    "fastly-client-ip",
    "x-originating-ip",
    "x-remote-ip",
    "x-remote-addr",
    "x-host",
    # URL and method overrides: another way past base_url or the method allowlist
    "x-original-url",
    "x-rewrite-url",
    "x-original-uri",
    "x-override-url",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-http-destinationurl",
}
#: Upstream headers no caller gets back: they would set state or policy for our origin.
NOT_RETURNED = HOP_BY_HOP | {
    "set-cookie",
    "set-cookie2",
    "strict-transport-security",
    "public-key-pins",
    "public-key-pins-report-only",
    "expect-ct",
    "alt-svc",
    "nel",
    "report-to",
    "reporting-endpoints",
    "content-security-policy",
    "content-security-policy-report-only",
    "x-content-type-options",
}
#: Upstream headers a signed-in browser session does not get back either.
NOT_RETURNED_TO_BROWSERS = NOT_RETURNED | {
    "clear-site-data",
    "refresh",
    "link",
    "service-worker-allowed",
    "x-frame-options",
    "permissions-policy",
    "feature-policy",
    "origin-agent-cluster",
    "cross-origin-opener-policy",
    "cross-origin-embedder-policy",
    "cross-origin-resource-policy",
    "timing-allow-origin",
    "x-xss-protection",
    "x-permitted-cross-domain-policies",
}
#: On every proxied answer: no script, plugin, form, frame or subresource runs or loads, and
#: the browser does not guess a content type.
INERT_HEADERS = {
    "Content-Security-Policy": "sandbox; default-src 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}
#: Added for browser sessions: other sites may not embed or frame the answer.
BROWSER_HEADERS = {
    **INERT_HEADERS,
    "Cross-Origin-Resource-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}


class Readable(Protocol):
    """A request body sent as it is read (larger than the replay buffer): anything with
    ``read(size)`` (the view's :class:`datasources.proxy.answers.BodyStream`)."""

    def read(self, size: int = -1) -> bytes: ...


# --- the pool --------------------------------------------------------------------------------

_pool_lock = threading.Lock()
_pool: urllib3.PoolManager | None = None

#: No retries (a failed call is reported, never repeated) and no redirects followed.
_NO_RETRIES = urllib3.Retry(total=False, redirect=False)


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


@functools.lru_cache(maxsize=1024)
def _origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of a base URL, parsed once per process rather than per call."""
    parts = urllib3.util.parse_url(url)
    return parts.scheme or "http", parts.host or "", parts.port


@functools.lru_cache(maxsize=16)
def _timeout(connect: float, read: float) -> urllib3.Timeout:
    return urllib3.Timeout(connect=connect, read=read)


@sensitive_variables()
def send(
    method: str,
    datasource: Datasource,
    url: str,
    headers: dict[str, str],
    body: bytes | Readable | None,
) -> urllib3.BaseHTTPResponse:
    """Send one request (token already placed) to the datasource's origin; no redirects."""
    scheme, host, port = _origin(datasource.base_url)
    # The origin's pool directly: the URL was built from base_url, so it is on that origin, and
    # only its path and query are sent (what PoolManager.request would do, minus re-parsing).
    # A datasource with its own TLS context (CA bundle, certificate-bound tokens) has pools of
    # its own: a connection made with its client certificate serves nobody else.
    context = tls.context_for(datasource, api=True) if scheme == "https" else None
    manager = (
        upstream_pool()
        if context is None
        else tls.pool_manager(context, maxsize=app_settings.PROXY_POOL_SIZE)
    )
    pool = manager.connection_from_host(host, port=port, scheme=scheme)
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


@sensitive_variables()
def send_with_token(
    method: str,
    datasource: Datasource,
    url: str,
    query: str,
    access_token: str,
    headers: dict[str, str],
    body: bytes | Readable | None,
) -> urllib3.BaseHTTPResponse:
    """:func:`send` to ``url`` with the caller's ``query``, the datasource's default parameters
    and, when it goes in the query, the token (``headers`` carry it otherwise)."""
    full_url = target.with_query(url, target.build_query(datasource, query, access_token))
    return send(method, datasource, full_url, headers, body)


@sensitive_variables()
def send_for_token(
    method: str,
    datasource: Datasource,
    url: str,
    query: str,
    token: Token,
    headers_for: Callable[[Token], dict[str, str]],
    body: bytes | Readable | None,
    replayable: bool,
) -> urllib3.BaseHTTPResponse:
    """:func:`send_with_token` with ``token`` (``headers_for`` builds the headers, a fresh
    DPoP proof each time), sent once more when the server refused the DPoP proof (a nonce it
    wants, a proof it saw already): the one place the proxy and the Test answer DPoP."""
    upstream = send_with_token(
        method, datasource, url, query, token.access_token, headers_for(token), body
    )
    if binding.proof_refused(datasource, token, url, upstream.status, upstream.headers) and (
        replayable
    ):
        upstream.drain_conn()
        upstream.release_conn()
        upstream = send_with_token(
            method, datasource, url, query, token.access_token, headers_for(token), body
        )
        binding.proof_refused(datasource, token, url, upstream.status, upstream.headers)
    return upstream


def upstream_target(
    datasource: Datasource, url: str, query: str, access_token: str
) -> tuple[str, str, int | None, str]:
    """(scheme, host, port, request target) of a call to ``url``: what
    :func:`send_with_token` sends, for the fast lane's client."""
    full_url = target.with_query(url, target.build_query(datasource, query, access_token))
    return (*_origin(datasource.base_url), _request_target(full_url))


def _request_target(url: str) -> str:
    """The path and query of an absolute URL (``scheme://authority`` removed)."""
    slash = url.find("/", url.find("//") + 2)
    return url[slash:] if slash >= 0 else "/"


# --- request ---------------------------------------------------------------------------------


def _connection_named(value: str | None) -> set[str]:
    if not value:
        return set()
    return {name.strip().lower() for name in value.split(",") if name.strip()}


def request_headers(
    datasource: Datasource,
    incoming: Mapping[str, str],
    token_headers: Mapping[str, str],
    content_length: int | None,
) -> dict[str, str]:
    """The headers sent upstream: the caller's, filtered; the datasource's defaults where the
    caller sent none; our Content-Length; the token's headers last (nobody overrides them;
    :func:`datasources.calls.binding.auth_headers`)."""
    named = _connection_named(incoming.get("Connection"))
    dropped = NOT_FORWARDED | named if named else NOT_FORWARDED
    headers = {name: value for name, value in incoming.items() if name.lower() not in dropped}
    defaults = datasource.default_headers
    if defaults:
        sent = {name.lower() for name in headers}
        for name, value in defaults.items():
            if name.lower() not in sent:
                headers[name] = value
    if content_length:
        headers["Content-Length"] = str(content_length)
    if token_headers:
        names = {name.lower() for name in token_headers}
        if defaults or not names <= dropped:  # else no header left has one of these names
            headers = {k: v for k, v in headers.items() if k.lower() not in names}
        headers.update(token_headers)
    return headers


# --- response --------------------------------------------------------------------------------


def answered_in_one_piece(headers: Mapping[str, str]) -> bool:
    """Whether an upstream answer is relayed as one body (its declared length is at most
    PROXY_CHUNK_SIZE) rather than streamed."""
    length = headers.get("Content-Length", "")
    return length.isdigit() and int(length) <= app_settings.PROXY_CHUNK_SIZE


def answer_headers(headers: urllib3.HTTPHeaderDict, *, browser: bool) -> list[tuple[str, str]]:
    """The upstream's headers our caller gets, then ours: the one rule for both serving paths
    (:func:`datasources.proxy.answers.copy_headers` for the view, the fast lane directly)."""
    dropped = NOT_RETURNED_TO_BROWSERS if browser else NOT_RETURNED
    named = _connection_named(headers.get("Connection"))
    if named:
        dropped = dropped | named
    kept = [
        (name, value)
        for name, value in headers.itermerged()
        if not (
            (lowered := name.lower()) in dropped
            or (browser and lowered.startswith("access-control-"))
        )
    ]
    kept.extend((BROWSER_HEADERS if browser else INERT_HEADERS).items())
    if browser and "Cache-Control" not in headers:
        kept.append(("Cache-Control", "private"))
    return kept
