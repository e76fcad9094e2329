"""What a datasource's settings may hold: scopes, status codes, methods and headers
parsed and bounded, the parameters the flow reserves. Pure functions; the model, the forms and
the proxy all ask them.
"""

from __future__ import annotations

import functools
import hashlib
import re

_SCOPE_SPLIT = re.compile(r"[\s,]+")


def normalize_scopes(value: str) -> str:
    """Accept commas and/or whitespace between scopes; store them space-delimited (RFC 6749 §3.3)."""
    seen: dict[str, None] = {}
    for scope in _SCOPE_SPLIT.split(value or ""):
        if scope:
            seen.setdefault(scope, None)
    return " ".join(seen)


@functools.lru_cache(maxsize=256)
def parse_status_codes(value: str) -> frozenset[int]:
    """``"401, 403"`` → {401, 403}; ValueError saying what is wrong. Cached: the proxy asks on
    every call."""
    codes = set()
    for part in re.split(r"[\s,]+", value or ""):
        if not part:
            continue
        if not part.isdigit() or not 400 <= int(part) <= 599:
            raise ValueError(
                f"{part!r} is not an HTTP error status (400-599); separate codes with commas."
            )
        codes.add(int(part))
    return frozenset(codes)


#: The most retries a datasource may ask for.
MAX_RETRIES = 10
#: Statuses a datasource may retry on (mirrors datasources.calls.retries.RETRYABLE_STATUSES).
RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})

#: Methods the proxy forwards unless a datasource says otherwise.
DEFAULT_ALLOWED_METHODS = "GET,HEAD,POST,PUT,PATCH,DELETE,OPTIONS"
#: Methods never forwarded: TRACE/TRACK echo the request (with the token) back to the caller,
#: CONNECT opens a tunnel.
FORBIDDEN_METHODS = frozenset({"TRACE", "TRACK", "CONNECT"})
_METHOD = re.compile(r"^[A-Z][A-Z0-9_-]{0,31}$")
#: RFC 9110 field names (tokens) and values without control characters.
HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,100}$")
HEADER_VALUE = re.compile(r"^[\t\x20-\x7e\x80-\xff]{0,4000}$")
#: Headers a datasource's default headers may not set: the caller's identity, what the
#: transport sets itself, and the proxy and override headers the proxy strips from callers.
RESERVED_DEFAULT_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "dpop",
        "cookie",
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "expect",
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-original-url",
        "x-rewrite-url",
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
    }
)


@functools.lru_cache(maxsize=256)
def parse_methods(value: str) -> frozenset[str]:
    """``"get, post"`` → {"GET", "POST"}; ValueError saying what is wrong."""
    methods = set()
    for part in re.split(r"[\s,]+", value or ""):
        if not part:
            continue
        method = part.upper()
        if not _METHOD.match(method):
            raise ValueError(f"{part!r} is not an HTTP method; separate methods with commas.")
        if method in FORBIDDEN_METHODS:
            raise ValueError(
                f"{method} is never forwarded (TRACE echoes the access token back, CONNECT "
                "opens a tunnel)."
            )
        methods.add(method)
    return frozenset(methods)


def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


#: Authorization parameters that custom parameters may not override (the authorization-code
#: flow sets them itself). Here, not in the authorization-server client, so that the models do
#: not import the HTTP client.
RESERVED_AUTH_PARAMS = frozenset(
    {
        "response_type",
        "client_id",
        "redirect_uri",
        "state",
        "code_challenge",
        "code_challenge_method",
    }
)


def validate_issuer(value: str) -> str | None:
    from ..security.policy import transport_problem

    problem = transport_problem(value)
    return f"The issuer {problem}." if problem else None


#: The longest end-user id an application may choose.
END_USER_MAX_LENGTH = 255


def end_user_problem(value: object) -> str | None:
    """Why ``value`` is not an end-user id (None when it is): 1 to 255 printable characters,
    with no space at either end (an id is compared exactly; a stray space would be another
    user)."""
    if not isinstance(value, str) or not value:
        return "an end user id is a non-empty string"
    if len(value) > END_USER_MAX_LENGTH:
        return f"an end user id has at most {END_USER_MAX_LENGTH} characters"
    if not value.isprintable() or value != value.strip():
        return "an end user id has printable characters only, and no space at either end"
    return None


def parse_return_urls(value: str) -> list[str]:
    """The datasource's allowed return URLs, one per line (blank lines ignored); ValueError
    saying which line is wrong. Each is an origin (``https://app.example.com``: any path on it)
    or a URL prefix (``https://app.example.com/settings/``), with no query or fragment."""
    from urllib.parse import urlsplit

    entries = []
    for line in (value or "").splitlines():
        entry = line.strip()
        if not entry:
            continue
        parts = urlsplit(entry)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError(f"{entry[:200]!r} is not an http(s) URL.")
        if parts.query or parts.fragment or "#" in entry or parts.username or parts.password:
            raise ValueError(f"{entry[:200]!r} has a query, fragment or user: give a prefix.")
        entries.append(entry)
    return entries


def return_url_allowed(url: str, allowed: list[str]) -> bool:
    """Whether a connect session may send the person back to ``url``: its origin equals an
    allowed origin's, or it starts with an allowed prefix at a path boundary (the prefix
    ``https://a.example/app`` allows ``/app``, ``/app/…``, ``/app?…`` but not ``/apple``).
    Compared on the parsed URL, so ``https://a.example@evil.example`` or a different port never
    matches. Nothing is allowed by default."""
    from urllib.parse import urlsplit

    try:
        target = urlsplit(url)
        target_port = target.port
    except ValueError:
        return False
    if target.scheme not in ("https", "http") or not target.hostname:
        return False
    if target.username or target.password or "\\" in url or any(ord(c) < 0x21 for c in url):
        return False
    for entry in allowed:
        rule = urlsplit(entry)
        same_origin = (
            rule.scheme == target.scheme
            and rule.hostname == target.hostname
            and (rule.port or _default_port(rule.scheme))
            == (target_port or _default_port(target.scheme))
        )
        if not same_origin:
            continue
        prefix = rule.path
        if prefix in ("", "/"):
            return True
        path = target.path
        if path == prefix or path.startswith(prefix if prefix.endswith("/") else prefix + "/"):
            return True
    return False


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80
