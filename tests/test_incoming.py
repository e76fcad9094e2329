"""The fast lane reads a call's facts from the ASGI scope itself (datasources/proxy/incoming.py)
and an upstream answer's headers without urllib3 (datasources/proxy/upstream.py): both must read
exactly what Django's request and urllib3's HTTPHeaderDict read, or the two serving paths would
forward different headers. Each row is compared with the real thing."""

from __future__ import annotations

import io

import pytest
import urllib3
from django.core.handlers.asgi import ASGIRequest

from datasources.proxy import callers
from datasources.proxy import incoming as incoming_module
from datasources.proxy import upstream as upstream_module
from datasources.proxy.asgi import wsgi_like_path
from datasources.proxy.incoming import Headers, Incoming
from datasources.proxy.upstream import Headers as AnswerHeaders

PATH = "/api/v1/datasources/crm/proxy/v1/items"


def scope(headers=(), **extra) -> dict:
    base = {
        "type": "http",
        "method": "GET",
        "scheme": "http",
        "path": PATH,
        "raw_path": PATH.encode(),
        "query_string": b"",
        "root_path": "",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
        "headers": [(name.encode("latin1"), value.encode("latin1")) for name, value in headers],
    }
    return {**base, **extra}


SCOPES = {
    "plain": scope([("host", "api.example"), ("authorization", "Api-Key k")]),
    "repeated header joined": scope([("accept", "a/b"), ("x-tag", "1"), ("accept", "c/d")]),
    "repeated in two cases": scope([("X-Tag", "1"), ("x-tag", "2"), ("X-TAG", "3")]),
    "underscore names dropped": scope([("x_api_key", "smuggled"), ("x-api-key", "real")]),
    "only an underscore name": scope([("x_forwarded_for", "1.2.3.4")]),
    "content headers": scope([("content-type", "text/plain"), ("content-length", "3")]),
    "odd casing and digits": scope([("X-B3-TraceId", "abc"), ("dNt", "1"), ("x-1-2", "z")]),
    "latin-1 values": scope([("x-name", "caf\xe9"), ("x-\xe9t\xe9", "v")]),
    "empty value": scope([("x-empty", ""), ("host", "h")]),
    "no headers": scope([]),
    "method lower case": scope(method="post"),
    "query": scope(query_string=b"a=1&b=%20x&c=%C3%A9"),
    "percent-encoded path": scope(path=PATH + "/a b", raw_path=(PATH + "/a%20b%2Fc").encode()),
    "broken UTF-8 in path": scope(raw_path=(PATH + "/%FF%FE").encode()),
    "root path": scope(
        path="/prefix" + PATH, raw_path=("/prefix" + PATH).encode(), root_path="/prefix"
    ),
    "no raw path": scope(raw_path=None),
}


@pytest.fixture(params=["names new", "names remembered"])
def name_cache(request):
    """The header name caches (each raw name is worked out once): empty, or holding every name
    of the tables below from an earlier read."""
    incoming_module._names.cache_clear()
    upstream_module._names.cache_clear()
    if request.param == "names remembered":
        for each in SCOPES.values():
            Headers(each["headers"])
        for each in ANSWERS:
            AnswerHeaders(each)
    return request.param


@pytest.mark.parametrize("name", list(SCOPES))
def test_incoming_reads_what_django_reads(name, name_cache):
    incoming = Incoming(SCOPES[name], Headers(SCOPES[name]["headers"]), b"body")
    request = ASGIRequest(wsgi_like_path(SCOPES[name]), io.BytesIO(b"body"))
    assert list(incoming.headers.items()) == list(request.headers.items())
    assert len(incoming.headers) == len(request.headers)
    for header in [*request.headers, "host", "HOST", "x_api_key", "X-API-KEY", "missing"]:
        assert incoming.headers.get(header) == request.headers.get(header), header
        assert (header in incoming.headers) == (header in request.headers), header
    assert (incoming.method, incoming.path, incoming.path_info, incoming.query) == (
        request.method,
        request.path,
        request.path_info,
        request.META["QUERY_STRING"],
    )
    assert callers.api_key_of(incoming.headers) == callers.api_key_of(request.headers)
    # The request Django's own checks get is the same request.
    built = incoming.request()
    assert (built.path, built.META, built.read()) == (request.path, request.META, b"body")


def test_a_query_django_cannot_decode_is_refused_the_same_way():
    bad = scope(query_string=b"a=%ff\xff")
    with pytest.raises(UnicodeDecodeError):
        ASGIRequest(bad, io.BytesIO())
    with pytest.raises(UnicodeDecodeError):
        Incoming(bad, Headers(bad["headers"]), b"")


ANSWERS = [
    [(b"Content-Length", b"3"), (b"Content-Type", b"application/json")],
    [(b"Set-Cookie", b"a=1"), (b"set-cookie", b"b=2"), (b"SET-COOKIE", b"c=3")],
    [(b"X-Caf\xe9", b"\xe9t\xe9"), (b"Connection", b"close, X-Hop")],
    [(b"RateLimit-Remaining", b"0"), (b"ratelimit-reset", b"5"), (b"Retry-After", b"")],
    [],
]


@pytest.mark.parametrize("headers", ANSWERS)
def test_answer_headers_read_as_urllib3_reads_them(headers, name_cache):
    ours = AnswerHeaders(headers)
    theirs = urllib3.HTTPHeaderDict()
    for name, value in headers:
        theirs.add(name.decode("latin1"), value.decode("latin1"))
    assert list(ours.itermerged()) == list(theirs.itermerged())
    assert len(ours) == len(theirs)
    names = [name.decode("latin1") for name, _ in headers] + ["content-length", "Missing"]
    for name in names + [n.upper() for n in names] + [n.lower() for n in names]:
        assert ours.get(name) == theirs.get(name), name
        assert (name in ours) == (name in theirs), name
