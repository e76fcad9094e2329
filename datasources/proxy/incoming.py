"""What the fast lane reads of an incoming call, taken from the ASGI scope in one pass.

Django's :class:`~django.core.handlers.asgi.ASGIRequest` builds ``META``, then ``headers`` is
built again from ``META``; for a call that is served in about a tenth of a millisecond that was
the largest single cost. :class:`Incoming` gives the lane the same facts (method, path, query,
headers) computed the way Django computes them, and builds the real request only when Django's
own code needs one (a refusal, a logged 5xx, the first admission of a host):
``tests/test_incoming.py`` compares the two on a table of scopes.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Iterator, Mapping

from django.core.handlers.asgi import ASGIRequest, get_script_prefix

from .asgi import Scope, wsgi_path


class Headers(Mapping[str, str]):
    """A request's headers as :class:`django.http.request.HttpHeaders` has them: Title-Case
    names (``X-Api-Key``), repeated headers joined with ``,``, names with ``_`` dropped (Django
    drops them: an ``X_Api_Key`` must not pass for ``X-Api-Key``); looked up in any case, with
    ``_`` or ``-``."""

    __slots__ = ("_items", "_lower")

    def __init__(self, raw: list[tuple[bytes, bytes]] | tuple) -> None:
        items: dict[str, str] = {}
        lower: dict[str, str] = {}
        for name_bytes, value_bytes in raw:
            names = _names(name_bytes)
            if not names:
                continue
            title, lowered = names
            value = value_bytes.decode("latin1")
            found = items.get(title)
            items[title] = lower[lowered] = value if found is None else f"{found},{value}"
        self._items = items
        self._lower = lower

    def __getitem__(self, name: str) -> str:
        return self._lower[name.replace("_", "-").lower()]

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return self._lower.get(name.replace("_", "-").lower(), default)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.replace("_", "-").lower() in self._lower

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def items(self):  # type: ignore[override]
        return self._items.items()


@functools.lru_cache(maxsize=1024)
def _names(name_bytes: bytes) -> tuple[str, str] | tuple[()]:
    """(Title-Case name, lower-case name) of a raw header name, or () for a name Django drops:
    the names a proxy sees repeat on every call, so each is worked out once."""
    name = name_bytes.decode("latin1")
    if "_" in name:
        return ()
    # As ASGIRequest then HttpHeaders: upper-cased into META, Title-Cased back.
    title = name.upper().title()
    return (title, title.lower())


class Incoming:
    """One call's facts as the view would see them on ``request``; :meth:`request` is that
    request, built on first use. Raises UnicodeDecodeError where ASGIRequest would."""

    __slots__ = ("_request", "body", "headers", "method", "path", "path_info", "query", "scope")

    def __init__(self, scope: Scope, headers: Headers, body: bytes) -> None:
        self.scope = scope
        self.body = body
        self.method: str = scope["method"].upper()
        self.path: str = wsgi_path(scope)
        script_name = get_script_prefix(scope)
        self.path_info: str = self.path.removeprefix(script_name) if script_name else self.path
        query = scope.get("query_string", "")
        self.query: str = query.decode() if isinstance(query, bytes) else query
        self.headers = headers  # Headers(scope["headers"]), read once by the lane
        self._request: ASGIRequest | None = None

    def request(self) -> ASGIRequest:
        """The Django request for this call (Django's own checks and log lines take one)."""
        if self._request is None:
            scope = {**self.scope, "path": self.path}
            self._request = ASGIRequest(scope, io.BytesIO(self.body))
        return self._request
