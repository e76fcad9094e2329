"""The project's ASGI application around Django's: the proxy's URLs (:mod:`.route`) to the fast
lane (:mod:`.lane`) or, with PROXY_FAST_LANE off, to the thread-pool handler
(:class:`.asgi.ProxyHandler`); everything else to the Django application it wraps; and the
lifespan events (a worker's shutdown writes the counters it still holds).

Its own module, above both serving paths, so that the lane and the handler import each other's
pieces in one direction only.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable

from ..conf import app_settings
from .asgi import ProxyHandler, Receive, Scope, Send
from .route import PROXY_PATH, app_path


class Router:
    """The project's ASGI application: the proxy's URLs to its fast lane (:mod:`.lane`, which
    hands what it does not serve to :class:`ProxyHandler`; only the latter with
    PROXY_FAST_LANE off), Django for everything else."""

    def __init__(self, django_app: Callable, proxy: Callable | None = None) -> None:
        self.django = django_app
        self._proxy = proxy
        self._lock = threading.Lock()

    @property
    def proxy(self) -> Callable:
        if self._proxy is None:
            with self._lock:
                if self._proxy is None:
                    if app_settings.PROXY_FAST_LANE:
                        from .lane import Lane

                        self._proxy = Lane()
                    else:
                        self._proxy = ProxyHandler()
        return self._proxy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            if PROXY_PATH.match(app_path(scope)):
                await self.proxy(scope, receive, send)
            else:
                await self.django(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        else:
            raise ValueError(f"Django can only handle ASGI/HTTP connections, not {kind}.")

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        from . import usage

        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await asyncio.get_running_loop().run_in_executor(
                    None, functools.partial(usage.write_held, "shutdown")
                )
                await send({"type": "lifespan.shutdown.complete"})
                return
