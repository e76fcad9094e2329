"""Where a call to a datasource goes: ``base_url`` + the caller's path and query, never outside.

Shared by the proxy view and the Python client, so both apply one rule.

The caller's path arrives percent-decoded once (by the WSGI server). It is split into segments
and every segment is checked against each decoding an upstream, or a server in front of it, might
still apply: percent-decoding at any depth (``%252e``), strict UTF-8 (overlong ``%c0%ae``), Unicode
compatibility forms (fullwidth dots), ``;`` path parameters (Tomcat and Spring read ``..;`` as
``..``), encoded ``?``, ``#``, ``/`` and ``\\``, control characters. Anything ambiguous is refused
with a reason. The checked segments are then percent-encoded again and joined under the base path,
so the upstream receives exactly the segments that were checked, and the result is verified once
more: after every decoding, with or without path parameters and with backslashes read as
slashes, removing dot segments (RFC 3986 §5.2.4) leaves it under the base path.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, quote, unquote_to_bytes, urlencode, urlsplit

from django.utils.encoding import repercent_broken_unicode

if TYPE_CHECKING:
    from ..models import Datasource

#: More levels of percent-encoding than this is refused rather than followed.
MAX_DECODE_DEPTH = 4
#: Characters a segment is sent with unencoded: RFC 3986 ``pchar`` minus ``@`` and ``%``.
_SEGMENT_SAFE = "!$&'()*+,;=:-._~"
#: Characters a query is sent with unencoded (existing ``%XX`` escapes are kept as they are).
_QUERY_SAFE = "!$&'()*+,;=:@/?-._~%"
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.\-]*:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class InvalidPath(ValueError):
    """The path could leave the base URL, or could be read differently by the upstream."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


def caller_path(raw: bytes) -> str:
    """The path a caller sent (the raw bytes of its request line) decoded once, as Django's WSGI
    handler receives it from a WSGI server: percent escapes decoded, the bytes read as UTF-8,
    and bytes that are not UTF-8 percent-encoded again (so the checks below see them, rather
    than the U+FFFD an ASGI server decodes them to). Raw non-ASCII bytes are UTF-8 like any
    other (``〱`` sent as it is or as ``%E3%80%B1`` is the same path), so every serving path
    hands :func:`resolve` the same string for the same request."""
    if b"%" not in raw and raw.isascii():
        return raw.decode("ascii")  # nothing to decode (the common case)
    return repercent_broken_unicode(unquote_to_bytes(raw)).decode()


def path_problem(path: str) -> str | None:
    """Why ``path`` (percent-decoded once) may not be appended to a base URL, or None."""
    try:
        _segments(path)
    except InvalidPath as err:
        return err.reason
    return None


@functools.lru_cache(maxsize=4096)
def resolve(base_url: str, path: str) -> str:
    """The upstream URL (no query) for ``path`` under ``base_url``; InvalidPath if it could
    leave it. A pure function of its two strings, cached because API calls repeat paths."""
    segments = _segments(path)
    base = base_url if base_url.endswith("/") else base_url + "/"
    target = base + "/".join(quote(segment, safe=_SEGMENT_SAFE) for segment in segments)
    base_parts, target_parts = urlsplit(base), urlsplit(target)
    if (
        base_parts.scheme != target_parts.scheme
        or base_parts.netloc != target_parts.netloc
        or target_parts.query
        or target_parts.fragment
        or not _stays_under(base_parts.path, target_parts.path)
    ):
        raise InvalidPath("it would leave the base URL")
    return target


def resolve_upstream_url(base_url: str, path: str) -> str | None:
    """``resolve`` returning None instead of raising."""
    try:
        return resolve(base_url, path)
    except InvalidPath:
        return None


def _segments(path: str) -> list[str]:
    if path == "":
        return []
    segments = path.split("/")
    for index, segment in enumerate(segments):
        if segment == "" and index == len(segments) - 1:
            continue  # a trailing slash: "things/" is a path many APIs use
        _check_segment(segment, first=index == 0)
    return segments


def _check_segment(segment: str, *, first: bool) -> None:
    for decoded in _decodings(segment):
        for form in {decoded, unicodedata.normalize("NFKC", decoded)}:
            if "\\" in form:
                raise InvalidPath("backslashes are not allowed")
            if "/" in form:
                raise InvalidPath("encoded slashes are not allowed")
            if "?" in form or "#" in form:
                raise InvalidPath("encoded '?' or '#' is not allowed in the path")
            if _CONTROL.search(form):
                raise InvalidPath("control characters are not allowed")
            if "@" in form:
                raise InvalidPath("'@' is not allowed")
            name = form.split(";", 1)[0]
            if name == "":
                raise InvalidPath("empty path segments are not allowed")
            if name.strip(". ") == "":
                raise InvalidPath("dot segments (., .., ..;) are not allowed")
            if first and _SCHEME.match(form):
                raise InvalidPath("absolute URLs are not allowed")


def _decodings(text: str) -> list[str]:
    """``text`` and each further percent-decoding of it, until nothing changes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidPath("characters that are not valid Unicode are not allowed") from None
    forms = [text]
    for _ in range(MAX_DECODE_DEPTH):
        try:
            decoded = unquote_to_bytes(forms[-1]).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidPath("percent-encoded bytes that are not UTF-8 are not allowed") from None
        if decoded == forms[-1]:
            return forms
        forms.append(decoded)
    raise InvalidPath("the path is percent-encoded too many times")


def _stays_under(base_path: str, path: str) -> bool:
    """Whether ``path`` stays under ``base_path`` however an upstream reads it."""
    current = path
    for _ in range(MAX_DECODE_DEPTH + 2):
        for variant in (current, _without_parameters(current), current.replace("\\", "/")):
            variant = re.split(r"[?#]", variant, maxsplit=1)[0]
            if not _remove_dot_segments(variant).startswith(base_path):
                return False
        decoded = unquote_to_bytes(current).decode("utf-8", "replace")
        if decoded == current:
            return True
        current = decoded
    return False


def _without_parameters(path: str) -> str:
    return "/".join(segment.split(";", 1)[0] for segment in path.split("/"))


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4, also treating segments of dots and spaces as ``..`` (as Windows does)."""
    output: list[str] = []
    segments = path.split("/")
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment.strip(". ") == "" and "." in segment:
            if segment != "." and len(output) > 1:
                output.pop()
            if last:
                output.append("")
            continue
        output.append(segment)
    return "/".join(output) or "/"


# --- query -----------------------------------------------------------------------------------


def build_query(datasource: Datasource, query: str, access_token: str | None = None) -> str:
    """The query string sent upstream: the caller's (re-encoded where needed), the datasource's
    default parameters the caller did not send, and the token when it goes in the query (any
    caller value for that parameter is dropped)."""
    query = quote(query, safe=_QUERY_SAFE) if query else ""
    defaults = datasource.default_query_params or {}
    token_param = (
        (datasource.query_param_name or "access_token")
        if access_token is not None and datasource.token_placement == "query"
        else None
    )
    if not defaults and token_param is None:
        return query
    pairs = parse_qsl(query, keep_blank_values=True) if query else []
    names = {name for name, _ in pairs}
    extra = [(name, value) for name, value in defaults.items() if name not in names]
    if token_param is None:
        return "&".join(part for part in (query, urlencode(extra)) if part)
    kept = [(name, value) for name, value in pairs if name != token_param]
    extra = [(name, value) for name, value in extra if name != token_param]
    return urlencode([*kept, *extra, (token_param, access_token)])


def with_query(url: str, query: str) -> str:
    return f"{url}?{query}" if query else url


# --- the token -------------------------------------------------------------------------------


def token_header(datasource: Datasource, access_token: str) -> tuple[str, str] | None:
    """The header carrying the token, or None when it goes in the query string."""
    if datasource.token_placement == "query":
        return None
    return "Authorization", f"{datasource.effective_header_prefix} {access_token}"
