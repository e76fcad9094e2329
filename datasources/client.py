"""App-code API: a ``requests.Session`` bound to one datasource.

    with datasource.session() as api:
        api.get("users/me").json()

Relative URLs resolve under ``base_url`` (absolute ones must stay below it); the token is
placed as the datasource says, refreshed when about to expire, and on an "expired" answer (401
unless the datasource says otherwise) refreshed once and the request retried once, unless the
token is too young to blame.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import requests

from . import tokens
from .exceptions import DatasourceError
from .upstream import place_token, resolve_upstream_url

if TYPE_CHECKING:
    from .models import Datasource


class OutsideBaseUrl(DatasourceError, ValueError):
    """The URL asked for is not below the datasource's base URL."""


class DatasourceSession(requests.Session):
    def __init__(self, datasource: Datasource, user=None) -> None:
        super().__init__()
        self.datasource = datasource
        self.user = user
        self.trust_env = False

    def request(  # type: ignore[override]
        self,
        method: str,
        url: str,
        params: Any = None,
        data: Any = None,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> requests.Response:
        target = self._target(url)
        kwargs.setdefault("timeout", 30)
        token = tokens.get_valid_token(self.datasource, user=self.user)
        response = self._send(method, target, token.access_token, params, data, headers, kwargs)
        if response.status_code in self.datasource.expiry_statuses and _replayable(data):
            retry = tokens.refresh_after_rejection(
                self.datasource, token.access_token, user=self.user
            )
            if retry is not None:
                response.close()
                response = self._send(
                    method, target, retry.access_token, params, data, headers, kwargs
                )
        return response

    def _send(self, method, url, access_token, params, data, headers, kwargs):
        url, headers = place_token(self.datasource, access_token, url, dict(headers or {}))
        return super().request(method, url, params=params, data=data, headers=headers, **kwargs)

    def _target(self, url: str) -> str:
        base = self.datasource.base_url
        if "://" in url:
            prefix = base.rstrip("/")
            if url != prefix and not url.startswith(prefix + "/"):
                raise OutsideBaseUrl("That URL is not below the datasource's base URL.")
            url = url[len(prefix) :]
        target = resolve_upstream_url(base, url.lstrip("/"))
        if target is None:
            raise OutsideBaseUrl("That path would leave the datasource's base URL.")
        return target


def _replayable(data: Any) -> bool:
    """Generators and file objects cannot be sent twice."""
    return data is None or isinstance(data, str | bytes | dict | list | tuple)
