"""Building requests to a datasource's upstream API: the SSRF guard and token placement.

Shared by the proxy view and the Python client so both apply one rule: a request never leaves
the datasource's ``base_url``.
"""

from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

if TYPE_CHECKING:
    from .models import Datasource

_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.\-]*:")
_PATH_SAFE = "/:@!$&'()*+,;=-._~"


def path_problem(path: str) -> str | None:
    """Why ``path`` (already percent-decoded once) may not be appended to a base URL."""
    for candidate in (path, unquote(path)):  # also catch double-encoded tricks
        if "\\" in candidate:
            return "backslashes are not allowed"
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in candidate):
            return "control characters are not allowed"
        if candidate.startswith("/") or "//" in candidate:
            return "empty path segments are not allowed"
        if "@" in candidate:
            return "'@' is not allowed"
        if _SCHEME.match(candidate):
            return "absolute URLs are not allowed"
        segments = candidate.split("?")[0].split("/")
        if any(segment in (".", "..") for segment in segments):
            return "dot segments are not allowed"
    return None


@functools.lru_cache(maxsize=4096)
def resolve_upstream_url(base_url: str, path: str) -> str | None:
    """``base_url`` + ``path`` (percent-encoded again), or None if ``path`` would escape it.

    A pure function of its two strings, cached because API calls repeat the same few paths.
    """
    if path_problem(path):
        return None
    base = base_url if base_url.endswith("/") else base_url + "/"
    target = base + quote(path, safe=_PATH_SAFE.replace("@", ""))
    base_parts, target_parts = urlsplit(base), urlsplit(target)
    if (
        base_parts.scheme != target_parts.scheme
        or base_parts.netloc != target_parts.netloc
        or not target_parts.path.startswith(base_parts.path)
    ):
        return None
    return target


def place_token(
    datasource: Datasource, access_token: str, url: str, headers: dict[str, str]
) -> tuple[str, dict[str, str]]:
    """Attach the token as configured: ``Authorization: <prefix> <token>`` or a query parameter."""
    if datasource.token_placement == "query":
        name = datasource.query_param_name or "access_token"
        parts = urlsplit(url)
        query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != name]
        query.append((name, access_token))
        return urlunsplit(parts._replace(query=urlencode(query))), headers
    headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
    headers["Authorization"] = f"{datasource.effective_header_prefix} {access_token}"
    return url, headers
