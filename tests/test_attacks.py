"""The attack suite: what an attacker tries, and what actually reached the upstream.

Every proxy attack runs against a local spy upstream that records each request exactly as it
arrived (method, raw request target, headers, body); a test asserts what reached it, not only the
status code. Hostile authorization servers (oversized, trickling answers) are local sockets too.
The proxy runs with the production defaults (API keys and tokens cached, counters batched).

Covered: path escapes in every encoding (incl. ``%3F`` and ``..;``), methods, headers both ways,
CORS/CSP on browser callers, the API-key restriction lifecycle, hostile import files, oversized
and trickling authorization servers, secrets absent from HTML, logs, exports, repr and the
database, the Python client (no redirects, timeouts), logging levels; and the attacks that were
already refused (``//host``, ``@``, CRLF, smuggling, caller credentials, cookies, CSRF, state
replay, XSS in the admin), so that they stay refused.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
import tracemalloc
from datetime import timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from django.contrib.auth.models import Permission
from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.test import Client
from django.utils import timezone

from datasources.authserver import oauth
from datasources.calls import transport
from datasources.client import OutsideBaseUrl
from datasources.conf import DEFAULTS
from datasources.exceptions import TransientUpstreamError
from datasources.models import ApiKey, Datasource, Token
from datasources.proxy import cache as proxy_cache
from datasources.proxy import usage
from datasources.proxy.apikeys import create_api_key

from .conftest import CALLBACK_PATH, SECRET, make_datasource
from .helpers import ACCESS_TOKEN, REFRESH_TOKEN, body_of, connected, subprocess_env
from .spy import Answer, HostileServer

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("serving")]


@pytest.fixture(autouse=True)
def production_defaults(settings):
    settings.DATASOURCES = {
        **settings.DATASOURCES,
        "PROXY_CACHE_SECONDS": DEFAULTS["PROXY_CACHE_SECONDS"],
        "USAGE_FLUSH_INTERVAL": DEFAULTS["USAGE_FLUSH_INTERVAL"],
    }
    proxy_cache.forget()
    usage.discard()
    yield
    proxy_cache.forget()
    usage.discard()


@pytest.fixture
def hostile():
    servers: list[HostileServer] = []

    def start(behaviour: str, **kwargs) -> HostileServer:
        server = HostileServer(behaviour, **kwargs).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def key_client(datasources=None) -> tuple[Client, str]:
    _, key = create_api_key("attacker", datasources=datasources)
    return Client(HTTP_AUTHORIZATION=f"Api-Key {key}"), key


@pytest.fixture
def session_client(django_user_model):
    user = django_user_model.objects.create_user("app-user", password="x")
    user.user_permissions.add(Permission.objects.get(codename="use_datasource"))
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    return client


def proxied(datasource: Datasource, path: str = "") -> str:
    return f"/api/v1/datasources/{datasource.slug}/proxy/{path}"


# --- path escapes -----------------------------------------------------------------------------

ESCAPES = [
    # finding 1: an encoded '?' hid the dot segments from the old check
    "a%3F/../../__stats",
    "a%3f/..%2f..%2fadmin",
    "a%3F/%2e%2e/%2e%2e/etc/passwd",
    # '..;' is '..' to Tomcat and Spring
    "..;/admin",
    "a/..;/..;/admin",
    "a/..;jsessionid=1/../admin",
    "%2e%2e;/admin",
    "a%3B/../../admin",
    # '#' and encoded slashes and backslashes
    "a%23/../../admin",
    "a%2F..%2F..%2Fadmin",
    "..%5c..%5cadmin",
    "a\\..\\..\\admin",
    "%5C%5Cevil.example.com/x",
    # dot segments in every encoding and depth
    "../admin",
    "./x",
    "a/./b",
    "a/b/..",
    ".../x",
    ".%2e/admin",
    "%2e./admin",
    "%2E%2E/admin",
    "%252e%252e/admin",
    "%25252e%25252e/admin",
    "%2525252e/admin",
    "%c0%ae%c0%ae/admin",  # overlong UTF-8
    "%ef%bc%8e%ef%bc%8e/admin",  # fullwidth full stops (NFKC: '..')
    "a/%2e%20/b",
    # other hosts and schemes
    "//evil.example.com/x",
    "%2F%2Fevil.example.com/x",
    "user@evil.example.com/x",
    "%40evil.example.com/x",
    "http://evil.example.com/x",
    "https:%2F%2Fevil.example.com",
    # control characters
    "a/%00/x",
    "a%0d%0aHost:%20evil.example.com/x",
    "x/%E2%80%A8",
]


@pytest.mark.parametrize("path", ESCAPES)
def test_path_escapes_are_refused_before_any_upstream_call(spy, path):
    datasource = connected(spy)
    client, _ = key_client()
    response = client.get(proxied(datasource) + path)
    if "%0d%0a" in path:
        # A decoded CR LF never even matches the proxy's URL pattern.
        assert response.status_code in (400, 404)
    else:
        assert response.status_code == 400, (path, response.content)
        assert response.json()["error"] == "invalid_path"
    assert spy.seen == []


FORWARDED = [
    ("things/42", "/api/things/42"),
    ("a;v=1/b", "/api/a;v=1/b"),
    ("users/%C3%A9", "/api/users/%C3%A9"),
    ("files/report%202024.pdf", "/api/files/report%202024.pdf"),
    ("trailing/", "/api/trailing/"),
    ("a%2520b", "/api/a%2520b"),
    ("100%25", "/api/100%25"),
    ("", "/api/"),
    ("search?q=a%20b%23c&q=2", "/api/search?q=a%20b%23c&q=2"),
]


@pytest.mark.parametrize(("path", "reached"), FORWARDED)
def test_ordinary_paths_reach_the_upstream_exactly(spy, path, reached):
    datasource = connected(spy)
    client, _ = key_client()
    assert client.get(proxied(datasource) + path).status_code == 200
    assert spy.targets() == [reached]


PIECES = [
    "a",
    "b",
    "..",
    ".",
    "%2e",
    "%2E",
    "%252e",
    "%25",
    "2e",
    "/",
    "%2f",
    "%2F",
    "%252f",
    ";",
    "%3b",
    "?",
    "%3f",
    "%253f",
    "#",
    "%23",
    "\\",
    "%5c",
    "%c0%ae",
    "%ef%bc%8e",
    "\uff0e",
    "%00",
    " ",
    "%20",
    "@",
    ":",
    "x=1",
    "~",
]


def test_every_accepted_path_stays_under_the_base_url_however_it_is_decoded():
    """A property check, independent of the resolver's own proof: random paths built from
    dangerous pieces; whatever is accepted must stay under /api/ after 0-5 further decodings,
    with or without ;parameters, with backslashes as slashes, cut at ? or #, dot segments
    (and dot-only segments, as Windows reads them) removed."""
    import posixpath
    import random
    from urllib.parse import unquote, unquote_to_bytes

    from django.utils.encoding import repercent_broken_unicode

    from datasources.calls.target import InvalidPath, resolve

    rng = random.Random(12)
    accepted = 0
    for _ in range(5000):
        raw = "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 8)))
        # What Django hands the view: decoded once, invalid UTF-8 percent-encoded again.
        path = repercent_broken_unicode(unquote_to_bytes(raw)).decode()
        try:
            url = resolve("https://api.example.com/api/", path)
        except InvalidPath:
            continue
        accepted += 1
        assert url.startswith("https://api.example.com/api/"), (raw, url)
        current = urlsplit(url).path
        for _depth in range(6):
            for variant in (
                current,
                "/".join(seg.split(";")[0] for seg in current.split("/")),
                current.replace("\\", "/"),
            ):
                cut = variant.split("?")[0].split("#")[0]
                segments = ["" if set(seg) <= {".", " "} and seg else seg for seg in cut.split("/")]
                dots = [".." if set(seg) <= {".", " "} and seg else seg for seg in cut.split("/")]
                for candidate in ("/".join(dots), "/".join(segments)):
                    normal = posixpath.normpath(candidate)
                    assert normal == "/api" or normal.startswith("/api/"), (raw, url, variant)
            current = unquote(current)
    assert accepted > 500  # the check saw plenty of accepted paths
    with pytest.raises(InvalidPath):
        resolve("https://api.example.com/api/", "a/\udcc0/b")  # a lone surrogate


def test_python_client_refuses_the_same_escapes(spy):
    datasource = connected(spy)
    for path in ("a%3F/../../admin", "..;/admin", "a/../../admin", "%2e%2e/admin", "a\\..\\admin"):
        with pytest.raises(OutsideBaseUrl):
            datasource.session().get(path)
    with pytest.raises(OutsideBaseUrl):
        datasource.session().get("http://evil.example.com/api/x")
    assert spy.seen == []


# --- methods ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
def test_default_methods_are_forwarded(spy, method):
    datasource = connected(spy)
    client, _ = key_client()
    response = client.generic(method, proxied(datasource, "things"), b"{}", "application/json")
    assert response.status_code == 200
    assert [(seen.method, seen.target) for seen in spy.seen] == [(method, "/api/things")]


@pytest.mark.parametrize(
    "method", ["TRACE", "TRACK", "CONNECT", "PROPFIND", "MOVE", "LOCK", "PURGE", "DEBUG", "FOO"]
)
def test_other_methods_are_405_and_never_sent(spy, method):
    datasource = connected(spy)
    client, _ = key_client()
    response = client.generic(method, proxied(datasource, "things"))
    assert response.status_code == 405
    assert response.json()["error"] == "method_not_allowed"
    assert "GET" in response["Allow"] and method not in response["Allow"]
    assert spy.seen == []


def test_a_datasource_chooses_its_methods_but_never_trace(spy):
    datasource = connected(spy, allowed_methods="get, propfind")
    assert datasource.allowed_methods == "GET,PROPFIND"
    client, _ = key_client()
    assert client.generic("PROPFIND", proxied(datasource, "dav/")).status_code == 200
    assert client.post(proxied(datasource, "dav/")).status_code == 405
    assert [(seen.method, seen.target) for seen in spy.seen] == [("PROPFIND", "/api/dav/")]
    for bad in ("GET,TRACE", "CONNECT", "GET, bad method!"):
        datasource.allowed_methods = bad
        with pytest.raises(ValidationError) as err:
            datasource.full_clean()
        assert "allowed_methods" in err.value.message_dict


# --- request headers --------------------------------------------------------------------------

NEVER_FORWARDED = {
    "x-secret-hop",  # named in Connection
    "keep-alive",
    "te",
    "upgrade",
    "proxy-authorization",
    "cookie",
    "x-api-key",
    "x-csrftoken",
    "x-original-url",
    "x-rewrite-url",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-real-ip",
    "true-client-ip",
    "x-client-ip",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "forwarded",
    "connection",
}


def test_request_headers_are_filtered(spy):
    datasource = connected(spy)
    client, key = key_client()
    response = client.get(
        proxied(datasource, "things"),
        HTTP_CONNECTION="X-Secret-Hop, keep-alive",
        HTTP_X_SECRET_HOP="hop-secret",
        HTTP_KEEP_ALIVE="timeout=5",
        HTTP_TE="trailers",
        HTTP_UPGRADE="websocket",
        HTTP_PROXY_AUTHORIZATION="Basic cHJveHk6c2VjcmV0",
        HTTP_COOKIE="sessionid=caller-cookie",
        HTTP_X_API_KEY="another-key",
        HTTP_X_CSRFTOKEN="csrf",
        HTTP_X_ORIGINAL_URL="/admin",
        HTTP_X_REWRITE_URL="/admin",
        HTTP_X_HTTP_METHOD_OVERRIDE="DELETE",
        HTTP_X_HTTP_METHOD="DELETE",
        HTTP_X_METHOD_OVERRIDE="DELETE",
        HTTP_X_REAL_IP="10.0.0.1",
        HTTP_TRUE_CLIENT_IP="10.0.0.1",
        HTTP_X_CLIENT_IP="10.0.0.1",
        HTTP_X_FORWARDED_FOR="10.0.0.1",
        HTTP_X_FORWARDED_HOST="evil.example.com",
        HTTP_X_FORWARDED_PROTO="https",
        HTTP_X_FORWARDED_PORT="443",
        HTTP_X_FORWARDED_PREFIX="/admin",
        HTTP_FORWARDED="for=10.0.0.1",
        HTTP_X_CUSTOM="kept",
        HTTP_ACCEPT="application/json",
    )
    assert response.status_code == 200
    [seen] = spy.seen
    assert (seen.method, seen.target) == ("GET", "/api/things")
    assert seen.header("Authorization") == f"Bearer {ACCESS_TOKEN}"
    assert seen.header("Host") == f"127.0.0.1:{spy.port}"
    assert seen.header("X-Custom") == "kept"
    assert seen.header("Accept") == "application/json"
    assert not seen.header_names & NEVER_FORWARDED, seen.header_names & NEVER_FORWARDED
    assert seen.header_names <= {
        "host",
        "accept-encoding",
        "user-agent",
        "authorization",
        "x-custom",
        "accept",
    }
    assert key not in json.dumps(seen.headers) and "caller-cookie" not in json.dumps(seen.headers)


def test_default_headers_and_query_parameters(spy):
    datasource = connected(
        spy,
        default_headers={"X-Api-Version": "2", "Accept": "application/json"},
        default_query_params={"tenant": "acme"},
    )
    client, _ = key_client()
    client.get(proxied(datasource, "things?x=1"))
    # Defaults fill in what the caller did not send; what the caller sends wins.
    client.get(proxied(datasource, "things?tenant=other"), HTTP_X_API_VERSION="3")
    first, second = spy.seen
    assert first.target == "/api/things?x=1&tenant=acme"
    assert (first.header("X-Api-Version"), first.header("Accept")) == ("2", "application/json")
    assert second.target == "/api/things?tenant=other"
    assert second.header("X-Api-Version") == "3"
    assert first.header("Authorization") == second.header("Authorization")


def test_the_token_query_parameter_cannot_be_overridden(spy):
    datasource = connected(spy, token_placement="query", default_query_params={"tenant": "acme"})
    client, _ = key_client()
    client.get(proxied(datasource, "things?access_token=forged&access%5Ftoken=forged2&x=1"))
    [seen] = spy.seen
    query = parse_qs(urlsplit(seen.target).query)
    assert query == {"access_token": [ACCESS_TOKEN], "x": ["1"], "tenant": ["acme"]}
    assert "authorization" not in seen.header_names


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"default_headers": {"Authorization": "Bearer mine"}}, "default_headers"),
        ({"default_headers": {"cookie": "a=b"}}, "default_headers"),
        ({"default_headers": {"X-Forwarded-For": "1.2.3.4"}}, "default_headers"),
        ({"default_headers": {"Bad Name": "x"}}, "default_headers"),
        ({"default_headers": {"X-Split": "a\r\nInjected: yes"}}, "default_headers"),
        ({"default_headers": {"X-Number": 5}}, "default_headers"),
        ({"default_headers": ["not", "an", "object"]}, "default_headers"),
        (
            {"token_placement": "query", "default_query_params": {"access_token": "mine"}},
            "default_query_params",
        ),
        ({"default_query_params": {"a": "b\nc"}}, "default_query_params"),
    ],
)
def test_defaults_that_would_override_the_token_or_inject_are_refused(fields, field):
    with pytest.raises(ValidationError) as err:
        make_datasource(**fields)
    assert field in err.value.message_dict


# --- answers: inert in browsers ----------------------------------------------------------------

HOSTILE_HTML = b"<html><body><script>fetch('/admin/').then(r => r.text())</script></body></html>"
HOSTILE_HEADERS = [
    ("Content-Type", "text/html; charset=utf-8"),
    ("Access-Control-Allow-Origin", "https://evil.example"),
    ("Access-Control-Allow-Credentials", "true"),
    ("Access-Control-Expose-Headers", "*"),
    ("Clear-Site-Data", '"*"'),
    ("Set-Cookie", "sessionid=planted; Path=/"),
    ("Content-Security-Policy", "script-src *"),
    ("X-Content-Type-Options", "sniff-away"),
    ("Strict-Transport-Security", "max-age=63072000; includeSubDomains"),
    ("Alt-Svc", 'h2="evil.example:443"'),
    ("Refresh", "0; url=https://evil.example/"),
    ("Link", "<https://evil.example/x.css>; rel=stylesheet"),
    ("Service-Worker-Allowed", "/"),
    ("X-Frame-Options", "ALLOWALL"),
    ("Report-To", '{"group":"x","max_age":1,"endpoints":[{"url":"https://evil.example"}]}'),
    ("NEL", '{"report_to":"x","max_age":1}'),
    ("Connection", "X-Hop-Secret"),
    ("X-Hop-Secret", "1"),
    ("X-Upstream", "kept"),
]
STRIPPED_FOR_ALL = {
    "set-cookie",
    "strict-transport-security",
    "alt-svc",
    "report-to",
    "nel",
    "x-hop-secret",
}
STRIPPED_FOR_BROWSERS = STRIPPED_FOR_ALL | {
    "access-control-allow-origin",
    "access-control-allow-credentials",
    "access-control-expose-headers",
    "clear-site-data",
    "refresh",
    "link",
    "service-worker-allowed",
}


@pytest.mark.parametrize("size", ["small", "streamed"])
def test_browser_sessions_get_inert_answers(spy, session_client, size):
    body = HOSTILE_HTML + (b" " * 200_000 if size == "streamed" else b"")
    spy.answers["/api/page"] = Answer(headers=HOSTILE_HEADERS, body=body)
    datasource = connected(spy)
    session_cookie = session_client.cookies["sessionid"].value
    response = session_client.get(proxied(datasource, "page"))
    assert response.status_code == 200
    assert response.streaming == (size == "streamed")
    assert body_of(response) == body  # the body is not rewritten: the headers make it inert
    assert (
        response["Content-Security-Policy"] == transport.BROWSER_HEADERS["Content-Security-Policy"]
    )
    assert response["Content-Security-Policy"].startswith("sandbox;")
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response["X-Frame-Options"] == "DENY"
    assert response["Cross-Origin-Resource-Policy"] == "same-origin"
    assert response["Content-Type"] == "text/html; charset=utf-8"
    assert response["X-Upstream"] == "kept"
    present = {name.lower() for name in response.headers}
    assert not present & STRIPPED_FOR_BROWSERS, present & STRIPPED_FOR_BROWSERS
    assert session_client.cookies["sessionid"].value == session_cookie
    [seen] = spy.seen
    assert "cookie" not in seen.header_names
    assert seen.header("Authorization") == f"Bearer {ACCESS_TOKEN}"


def test_api_key_callers_get_the_body_unchanged(spy):
    spy.answers["/api/page"] = Answer(headers=HOSTILE_HEADERS, body=HOSTILE_HTML)
    datasource = connected(spy)
    client, _ = key_client()
    response = client.get(proxied(datasource, "page"))
    assert body_of(response) == HOSTILE_HTML
    assert response["Access-Control-Allow-Origin"] == "https://evil.example"  # theirs to use
    assert response["Content-Security-Policy"].startswith("sandbox;")
    assert response["X-Content-Type-Options"] == "nosniff"
    present = {name.lower() for name in response.headers}
    assert not present & STRIPPED_FOR_ALL
    assert len(spy.seen) == 1


def test_redirects_are_passed_on_not_followed(spy):
    spy.answers["/api/moved"] = Answer(
        status=302, headers=[("Location", "http://127.0.0.1:9/elsewhere")], body=b""
    )
    datasource = connected(spy)
    client, _ = key_client()
    response = client.get(proxied(datasource, "moved"))
    assert (response.status_code, response["Location"]) == (302, "http://127.0.0.1:9/elsewhere")
    assert spy.targets() == ["/api/moved"]


# --- callers ----------------------------------------------------------------------------------


def test_session_callers_need_csrf_for_unsafe_methods(spy, session_client):
    datasource = connected(spy)
    response = session_client.post(proxied(datasource, "things"), {"a": "1"})
    assert (response.status_code, response.json()["error"]) == (403, "csrf_failed")
    response = session_client.generic("PATCH", proxied(datasource, "things"), b"{}")
    assert response.status_code == 403
    assert spy.seen == []


def test_no_credentials_or_a_bad_key_reach_nothing(spy):
    datasource = connected(spy)
    assert Client().get(proxied(datasource, "things")).status_code == 401
    forged = Client(HTTP_AUTHORIZATION="Api-Key dsk_00000000_forged")
    assert forged.get(proxied(datasource, "things")).status_code == 401
    bearer = Client(HTTP_AUTHORIZATION=f"Bearer {ACCESS_TOKEN}")  # the upstream's token is no key
    assert bearer.get(proxied(datasource, "things")).status_code == 401
    assert spy.seen == []


def test_smuggled_bodies_are_refused(spy):
    datasource = connected(spy)
    client, _ = key_client()
    for encoding in ("chunked", "gzip, chunked", "identity"):
        response = client.post(
            proxied(datasource, "things"),
            b"0\r\n\r\nGET /admin HTTP/1.1\r\n\r\n",
            content_type="text/plain",
            HTTP_TRANSFER_ENCODING=encoding,
        )
        assert response.status_code == 411
    assert spy.seen == []


# --- API keys: restriction lifecycle ------------------------------------------------------------


def test_a_key_whose_datasources_were_deleted_allows_nothing(spy, staff_client):
    target = connected(spy, slug="target", name="Target")
    other = connected(spy, slug="other", name="Other")
    api_key, key = create_api_key("restricted", datasources=[target])
    client = Client(HTTP_AUTHORIZATION=f"Api-Key {key}")
    assert client.get(proxied(target, "t")).status_code == 200
    assert client.get(proxied(other, "o")).status_code == 403
    # Delete the only datasource it was restricted to, in the admin.
    response = staff_client.post(
        f"/admin/datasources/datasource/{target.pk}/delete/", {"post": "yes"}
    )
    assert response.status_code == 302
    assert client.get(proxied(other, "o")).status_code == 403
    # Edit the key in the admin: a rename alone no longer makes it unrestricted.
    response = staff_client.post(
        f"/admin/datasources/apikey/{api_key.pk}/change/", {"name": "renamed", "user": ""}
    )
    assert response.status_code == 200  # the form asks for an explicit choice
    assert "or tick “all datasources”" in response.content.decode()
    api_key.refresh_from_db()
    assert (api_key.name, api_key.all_datasources) == ("restricted", False)
    listing = staff_client.get("/admin/datasources/apikey/").content.decode()
    assert '<td class="field-scope">none</td>' in listing
    assert client.get(proxied(other, "o")).status_code == 403
    assert spy.targets() == ["/api/t"]


def test_the_admin_defaults_to_least_privilege(spy, staff_client):
    datasource = connected(spy)
    add = staff_client.get("/admin/datasources/apikey/add/").content.decode()
    at = add.index('name="all_datasources"')
    checkbox = add[add.rindex("<input", 0, at) : add.index(">", at)]
    assert "checkbox" in checkbox and "checked" not in checkbox
    assert staff_client.post("/admin/datasources/apikey/add/", {"name": "k"}).status_code == 200
    both = {"name": "k", "all_datasources": "on", "datasources": [datasource.pk], "may_proxy": "on"}
    assert staff_client.post("/admin/datasources/apikey/add/", both).status_code == 200
    assert not ApiKey.objects.exists()
    chosen = {"name": "k", "datasources": [datasource.pk], "may_proxy": "on"}
    response = staff_client.post("/admin/datasources/apikey/add/", chosen)
    created = ApiKey.objects.get()
    assert response["Location"] == f"/admin/datasources/apikey/{created.pk}/created/"
    assert not created.all_datasources
    assert list(created.datasources.all()) == [datasource]


def test_an_all_datasources_key_is_an_explicit_choice(spy, staff_client):
    first = connected(spy, slug="first", name="First")
    response = staff_client.post(
        "/admin/datasources/apikey/add/",
        {"name": "everything", "all_datasources": "on", "may_proxy": "on"},
        follow=True,  # post/redirect/get: the key is on the page the redirect leads to
    )
    html = response.content.decode()
    key = html.split('class="new-api-key"')[1].split(">", 1)[1].split("<", 1)[0]
    client = Client(HTTP_AUTHORIZATION=f"Api-Key {key}")
    second = connected(spy, slug="second", name="Second")  # added later: included
    assert client.get(proxied(first, "1")).status_code == 200
    assert client.get(proxied(second, "2")).status_code == 200
    assert spy.targets() == ["/api/1", "/api/2"]


def test_revoking_in_the_admin_applies_at_once_in_this_process(spy, staff_client):
    datasource = connected(spy)
    api_key, key = create_api_key("soon-revoked")
    client = Client(HTTP_AUTHORIZATION=f"Api-Key {key}")
    assert client.get(proxied(datasource, "before")).status_code == 200  # now cached
    staff_client.post(
        "/admin/datasources/apikey/",
        {"action": "revoke_selected", "_selected_action": [api_key.pk]},
    )
    assert client.get(proxied(datasource, "after")).status_code == 401
    assert spy.targets() == ["/api/before"]


# --- hostile import files ----------------------------------------------------------------------

VALID = {
    "name": "CRM",
    "slug": "crm",
    "base_url": "https://crm.example.com/api/",
    "grant_type": "client_credentials",
    "access_token_url": "https://crm.example.com/oauth/token",
    "client_id": "crm-client",
    "client_secret": {"env": "DATASOURCE_SECRET_CRM"},
}


def _entries(**changes) -> bytes:
    return json.dumps([{**VALID, **changes}]).encode()


HOSTILE_FILES = {
    "latin-1": (
        json.dumps([{**VALID, "name": "CRM é"}], ensure_ascii=False).encode("latin-1"),
        "not UTF-8",
    ),
    "utf-16": (json.dumps([VALID]).encode("utf-16"), "UTF-16"),
    "deeply nested": (b"[" * 100_000 + b"]" * 100_000, "nested deeper"),
    "nested field": (_entries(custom_auth_params={"a": {"b": {"c": {"d": {}}}}}), "nested deeper"),
    "name is a number": (_entries(name=5), "name: must be a string, not a whole number"),
    "boolean as string": (_entries(use_pkce="yes"), "use_pkce: must be true or false"),
    "lifetime as string": (
        _entries(token_lifetime="3600"),
        "token_lifetime: must be a whole number",
    ),
    "lifetime as boolean": (
        _entries(token_lifetime=True),
        "token_lifetime: must be a whole number",
    ),
    "NaN": (b'[{"name": "x", "token_lifetime": NaN}]', "NaN is not a JSON number"),
    "huge number": (b'[{"token_lifetime": ' + b"9" * 5000 + b"}]", "not acceptable JSON"),
    "duplicate keys": (b'[{"slug": "a", "slug": "b"}]', "appears twice"),
    "NUL": (_entries(name="CRM\u0000"), "NUL character"),
    "lone surrogate": (b'[{"name": "\\ud800", "slug": "crm"}]', "lone surrogate"),
    "FERNET_KEYS": (_entries(client_secret={"env": "FERNET_KEYS"}), "may not be read"),
    "SECRET_KEY": (_entries(client_secret={"env": "SECRET_KEY"}), "may not be read"),
    "DATABASE_URL": (_entries(client_secret={"env": "DATABASE_URL"}), "may not be read"),
    "prefix alone": (_entries(client_secret={"env": "DATASOURCE_SECRET_"}), "may not be read"),
    "not a list": (b'{"name": "x"}', "JSON list"),
    "truncated": (b'[{"name": ', "not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_FILES))
def test_hostile_import_files_are_refused_and_change_nothing(tmp_path, monkeypatch, case):
    content, expected = HOSTILE_FILES[case]
    monkeypatch.setenv("DATASOURCE_SECRET_CRM", "crm-secret")
    monkeypatch.setenv("FERNET_KEYS", "fernet-key-material-that-must-not-leak")
    existing = make_datasource()
    path = tmp_path / "datasources.json"
    path.write_bytes(content)
    started = time.monotonic()
    with pytest.raises(CommandError) as err:
        call_command("import_datasources", str(path))
    assert time.monotonic() - started < 5
    message = str(err.value)
    assert expected in message, message
    assert message.startswith("Nothing was imported")
    assert "fernet-key-material" not in message
    assert list(Datasource.objects.values_list("slug", flat=True)) == [existing.slug]


def test_a_60_mb_import_file_is_refused_at_once(tmp_path):
    path = tmp_path / "big.json"
    with open(path, "wb") as handle:
        handle.write(b"[" + b'{"name": "x"},' * (60 * 1024 * 1024 // 14) + b"{}]")
    started = time.monotonic()
    with pytest.raises(CommandError, match="is larger than 1048576 bytes"):
        call_command("import_datasources", str(path))
    assert time.monotonic() - started < 5
    assert not Datasource.objects.exists()


def test_the_env_prefix_is_a_setting(tmp_path, monkeypatch, settings):
    settings.DATASOURCES = {**settings.DATASOURCES, "IMPORT_ENV_PREFIX": "ACME_OAUTH_"}
    monkeypatch.setenv("ACME_OAUTH_CRM", "from-acme")
    monkeypatch.setenv("DATASOURCE_SECRET_CRM", "not-this-one")
    path = tmp_path / "ok.json"
    path.write_bytes(_entries(client_secret={"env": "ACME_OAUTH_CRM"}))
    call_command("import_datasources", str(path))
    assert Datasource.objects.get(slug="crm").client_secret == "from-acme"
    path.write_bytes(_entries(client_secret={"env": "DATASOURCE_SECRET_CRM"}))
    with pytest.raises(CommandError, match="ACME_OAUTH_"):
        call_command("import_datasources", str(path))


def test_hostile_import_files_exit_non_zero_with_one_line(tmp_path):
    for name, content in (
        ("utf16.json", json.dumps([VALID]).encode("utf-16")),
        ("nested.json", b"[" * 100_000 + b"]" * 100_000),
        ("fernet.json", _entries(client_secret={"env": "FERNET_KEYS"})),
    ):
        path = tmp_path / name
        path.write_bytes(content)
        result = subprocess.run(
            [sys.executable, "manage.py", "import_datasources", str(path)],
            capture_output=True,
            text=True,
            env=subprocess_env(),
            timeout=60,
        )
        assert result.returncode != 0, name
        assert "Traceback" not in result.stderr, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, (name, result.stderr)
        assert lines[0].startswith("CommandError: Nothing was imported")
    assert not Datasource.objects.exists()


# --- hostile authorization servers ---------------------------------------------------------------


def _fast_deadlines(settings, seconds: float = 1.0) -> None:
    settings.DATASOURCES = {
        **settings.DATASOURCES,
        "REFRESH_TIMEOUT": seconds,
        "HTTP_TIMEOUT": seconds,
    }


@pytest.mark.parametrize("behaviour", ["huge", "huge-chunked"])
def test_an_oversized_token_answer_is_not_read(hostile, behaviour):
    server = hostile(behaviour)
    datasource = make_datasource(access_token_url=f"{server.base}/token")
    tracemalloc.start()
    try:
        with pytest.raises(TransientUpstreamError, match="larger than 1048576 bytes"):
            oauth.refresh(datasource, REFRESH_TOKEN)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024, peak
    [request] = server.requests
    assert request.startswith(b"POST /token HTTP/1.1")
    assert b"grant_type=refresh_token" in request
    assert server.sent < 200 * 1024 * 1024


@pytest.mark.parametrize("behaviour", ["trickle-body", "trickle-headers"])
def test_a_trickling_token_endpoint_is_abandoned_at_the_deadline(hostile, settings, behaviour):
    _fast_deadlines(settings)
    server = hostile(behaviour, interval=0.1)
    datasource = make_datasource(access_token_url=f"{server.base}/token")
    started = time.monotonic()
    with pytest.raises(TransientUpstreamError, match="did not finish within 1 s") as err:
        oauth.refresh(datasource, REFRESH_TOKEN)
    elapsed = time.monotonic() - started
    assert elapsed < 2.5, elapsed
    assert err.value.outcome_unknown  # sent: the server may have acted on it
    assert server.sent > 0 and len(server.requests) == 1


@pytest.mark.parametrize("behaviour", ["huge-chunked", "trickle-body", "trickle-headers"])
def test_discovery_and_revocation_are_bounded_too(hostile, settings, behaviour):
    _fast_deadlines(settings)
    server = hostile(behaviour, interval=0.1)
    started = time.monotonic()
    with pytest.raises(oauth.DiscoveryError, match=r"larger than|within 1 s"):
        oauth.discover(server.base)
    datasource = make_datasource(revocation_url=f"{server.base}/revoke")
    with pytest.raises(TransientUpstreamError, match=r"larger than|within 1 s"):
        oauth.revoke(datasource, ACCESS_TOKEN, "access_token")
    assert time.monotonic() - started < 5
    assert [r.split(b"\r\n")[0] for r in server.requests] == [
        b"GET /.well-known/openid-configuration HTTP/1.1",
        b"POST /revoke HTTP/1.1",
    ]


def test_a_trickling_token_endpoint_makes_the_proxy_answer_503_in_time(spy, hostile, settings):
    _fast_deadlines(settings)
    server = hostile("trickle-body", interval=0.1)
    datasource = connected(spy)
    Datasource.objects.filter(pk=datasource.pk).update(access_token_url=f"{server.base}/token")
    Token.objects.filter(datasource=datasource).update(expires_at=timezone.now())
    proxy_cache.forget()
    client, _ = key_client()
    started = time.monotonic()
    response = client.get(proxied(datasource, "things"))
    assert response.status_code == 503
    assert time.monotonic() - started < 5
    assert spy.seen == []
    token = Token.objects.get(datasource=datasource)
    assert (token.access_token, token.refresh_token) == (ACCESS_TOKEN, REFRESH_TOKEN)


# --- secrets ----------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_secrets_are_absent_from_html_logs_exports_repr_and_the_database(
    spy, staff_client, caplog, capsys
):
    caplog.set_level(logging.DEBUG)
    datasource = connected(spy, token_placement="query")
    api_key, key = create_api_key("app", datasources=[datasource])
    client = Client(HTTP_AUTHORIZATION=f"Api-Key {key}")
    assert client.get(proxied(datasource, "things?x=1")).status_code == 200
    assert parse_qs(urlsplit(spy.seen[0].target).query)["access_token"] == [ACCESS_TOKEN]
    token = Token.objects.get(datasource=datasource)
    pages = [
        "/admin/datasources/datasource/",
        f"/admin/datasources/datasource/{datasource.pk}/change/",
        "/admin/datasources/token/",
        f"/admin/datasources/token/{token.pk}/change/",
        "/admin/datasources/apikey/",
        f"/admin/datasources/apikey/{api_key.pk}/change/",
        "/admin/datasources/tokenevent/",
    ]
    html = ""
    for page in pages:
        response = staff_client.get(page)
        assert response.status_code == 200, page
        html += response.content.decode()
    call_command("export_datasources")
    exported = capsys.readouterr().out
    reprs = " ".join(
        f"{obj!r} {obj}" for obj in (datasource, token, api_key, oauth.TokenResponse(ACCESS_TOKEN))
    )
    logs = (
        "\n".join(f"{record.getMessage()} {record.args}" for record in caplog.records) + caplog.text
    )
    stored = _database_text()
    for secret in (SECRET, ACCESS_TOKEN, REFRESH_TOKEN, key):
        for where, text in (
            ("admin HTML", html),
            ("export", exported),
            ("repr", reprs),
            ("logs", logs),
            ("database", stored),
        ):
            assert secret not in text, f"{secret[:12]}… found in the {where}"
    assert api_key.key_hash in stored  # the database was read


def _database_text() -> str:
    if connection.vendor == "sqlite":
        from pathlib import Path

        name = Path(connection.settings_dict["NAME"])
        parts = [name, Path(f"{name}-wal")]
        return "".join(p.read_bytes().decode("latin-1") for p in parts if p.exists())
    text = []
    with connection.cursor() as cursor:
        for table in connection.introspection.table_names():
            if table.startswith("datasources_"):
                cursor.execute(f'SELECT t::text FROM "{table}" t')
                text.extend(row[0] for row in cursor.fetchall())
    return "\n".join(text)


# --- the Python client ---------------------------------------------------------------------------


def test_the_python_client_follows_no_redirects(spy):
    spy.answers["/api/moved"] = Answer(
        status=302, headers=[("Location", f"{spy.base}/elsewhere")], body=b""
    )
    datasource = connected(spy)
    with datasource.session() as api:
        assert api.get("moved").status_code == 302
        assert api.get("moved", allow_redirects=True).status_code == 302
    assert spy.targets() == ["/api/moved", "/api/moved"]


def test_the_python_client_timeout_is_configurable(spy, settings):
    hold = threading.Event()
    spy.answers["/api/slow"] = Answer(hold=hold)
    datasource = connected(spy)
    try:
        settings.DATASOURCES = {**settings.DATASOURCES, "CLIENT_TIMEOUT": 0.3}
        started = time.monotonic()
        with pytest.raises(requests.Timeout):
            datasource.session().get("slow")
        with pytest.raises(requests.Timeout):
            datasource.session(timeout=0.2).get("slow")
        assert time.monotonic() - started < 3
    finally:
        hold.set()
    assert spy.targets() == ["/api/slow", "/api/slow"]


def test_the_python_client_applies_the_datasource_rules(spy):
    datasource = connected(
        spy, default_headers={"X-Api-Version": "2"}, default_query_params={"tenant": "acme"}
    )
    with datasource.session() as api:
        api.get("things", params={"q": "1"}, headers={"Authorization": "Bearer forged"})
        api.get("things?tenant=mine")
        with pytest.raises(ValueError, match="does not allow TRACE"):
            api.request("TRACE", "things")
    first, second = spy.seen
    assert first.target == "/api/things?q=1&tenant=acme"
    assert first.header("Authorization") == f"Bearer {ACCESS_TOKEN}"
    assert first.header("X-Api-Version") == "2"
    assert second.target == "/api/things?tenant=mine"


# --- logging --------------------------------------------------------------------------------------


def test_expected_refusals_are_logged_as_warnings(spy, caplog):
    caplog.set_level(logging.INFO, logger="django.request")
    datasource = connected(spy)
    client, _ = key_client()
    Token.objects.filter(datasource=datasource).update(expires_at=timezone.now())
    assert client.get(proxied(datasource, "things")).status_code == 503  # token endpoint down
    Token.objects.filter(datasource=datasource).update(status="needs_reauthorization")
    proxy_cache.forget()
    assert client.get(proxied(datasource, "things")).status_code == 409
    spy.answers["/api/broken"] = Answer(status=500)
    Token.objects.filter(datasource=datasource).update(
        status="active", expires_at=timezone.now() + timedelta(hours=1)
    )
    proxy_cache.forget()
    assert client.get(proxied(datasource, "broken")).status_code == 500  # the upstream's own
    records = [r for r in caplog.records if r.name == "django.request"]
    assert [r.status_code for r in records] == [503, 409, 500]
    assert all(r.levelno == logging.WARNING for r in records), [r.levelname for r in records]
    assert spy.targets() == ["/api/broken"]


# --- already refused, kept refused ---------------------------------------------------------------


def test_the_admin_escapes_hostile_names(spy, staff_client):
    datasource = connected(spy, name="<script>alert(1)</script>")
    for page in ("/admin/datasources/datasource/", datasource.get_admin_url()):
        html = staff_client.get(page).content.decode()
        assert "<script>alert(1)</script>" not in html
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_an_authorization_state_is_single_use(staff_client):
    datasource = make_datasource(slug="flow", access_token_url="http://127.0.0.1:9/token")
    start = staff_client.get(f"/admin/datasources/datasource/{datasource.pk}/authorize/")
    state = parse_qs(urlsplit(start["Location"]).query)["state"][0]
    first = staff_client.get(CALLBACK_PATH, {"code": "a-code", "state": state})
    assert first.status_code == 302  # consumed (the exchange failed: token endpoint down)
    replay = staff_client.get(CALLBACK_PATH, {"code": "a-code", "state": state})
    assert replay.status_code == 400
    assert Token.objects.get(datasource=datasource).status == "not_authorized"
