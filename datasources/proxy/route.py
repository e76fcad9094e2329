"""The proxy's URL, defined once: ``/api/v1/datasources/<slug>/proxy/<path>``.

Three places must agree on it: Django's URL patterns (:mod:`datasources.urls`, the view), the
ASGI router that sends the proxy's calls to the fast lane (:mod:`.asgi`), and the lane, which
reads the slug and path itself (:mod:`.lane`). They all build on :data:`PREFIX`, the regular
expression Django's ``path("api/v1/datasources/<slug:slug>/proxy/<path:path>")`` compiles to
(the ``slug`` converter's characters; the ``path`` converter's ``.+``), so a slug or path one
of them accepts cannot be refused, or served differently, by another. The project mounts the
app's URLs at the root (``config/urls.py``), as the contract in the README says.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

#: The slug and the ``proxy/`` that follows it, as in Django's ``<slug:slug>`` converter.
PREFIX = r"api/v1/datasources/(?P<slug>[-a-zA-Z0-9_]+)/proxy/"

#: Django's URL patterns (``re_path``): the proxy's root, and a path under it.
ROOT_PATTERN = rf"^{PREFIX}\Z"
PATH_PATTERN = rf"^{PREFIX}(?P<path>.+)\Z"

#: The fast lane: a request's full path (leading slash), with its slug and optional path.
ROUTE = re.compile(rf"^/{PREFIX}(?:(?P<path>.+))?\Z")

#: The ASGI router: whether a request's path is one of the proxy's URLs.
PROXY_PATH = re.compile(rf"^/{PREFIX}")


def app_path(scope: Mapping[str, Any]) -> str:
    """An ASGI request's path below the application's mount point (``root_path``), the path
    the patterns above are matched against."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path
