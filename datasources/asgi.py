"""The proxy's fast path for the host project's ``asgi.py``, in one import::

    from django.core.asgi import get_asgi_application

    from datasources.asgi import with_proxy_lane

    application = with_proxy_lane(get_asgi_application())

Why wrap the host's application rather than let Django serve the proxy: Django's ASGI handler
runs a sync view through one thread per process with several hops to it per request, and reads
a streamed answer whole before sending it. The wrapper sends the proxy's URLs
(``/api/v1/datasources/<slug>/proxy/...``) to the fast lane on the event loop (or to the same
view in a thread pool, bodies streamed both ways: :mod:`datasources.proxy.asgi`) and every
other request to the application it wraps. Under WSGI (gunicorn) nothing is needed: the proxy
is an ordinary view there.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

ASGIApp = Callable[
    [MutableMapping[str, Any], Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]],
    Awaitable[None],
]


def with_proxy_lane(application: ASGIApp) -> ASGIApp:
    """``application`` (the host's Django ASGI application) with the proxy's URLs served by
    the app's fast path; it also answers ASGI lifespan events (its shutdown writes the call
    counters a worker still holds, so run uvicorn with ``--lifespan on``).

    Call it with the application ``get_asgi_application()`` returned: that call sets Django up,
    and the serving code is imported here, not at the top of this module, so that importing
    this module before Django is set up is safe.
    """
    from .proxy.router import Router

    return Router(application)
