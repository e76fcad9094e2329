"""App-code API: a ``requests.Session`` bound to one datasource.

    with datasource.session() as api:
        api.get("users/me").json()

Relative URLs resolve under ``base_url`` (absolute ones must stay below it) by the proxy's own
rule (:mod:`datasources.calls.target`); redirects are never followed, so a request cannot be
sent anywhere else either; every request has a timeout (``timeout=`` per session or per call,
default ``DATASOURCES['CLIENT_TIMEOUT']``). The datasource's allowed methods, default headers and
query parameters apply as they do in the proxy. The token is placed as the datasource says,
refreshed when about to expire, and on an "expired" answer (401 unless the datasource says
otherwise) refreshed once and the request retried once, unless the token is too young to blame.
``datasource.session(end_user="u-1")`` calls with that end user's token (who connected through a
connect link): :class:`~datasources.exceptions.NotConnected` when they have none, never the
shared token instead. The datasource's opt-in retries apply as in the proxy (the same steps,
:mod:`datasources.calls.call`: method allowed, health gate, attempts); pass
``headers={"X-Datasource-Retries": "0"}`` for fewer (the header is not sent). While the
upstream's rate limit has not lifted, or its circuit breaker is open (remembered by every
process, see :mod:`datasources.calls.health`), a call raises
:class:`~datasources.exceptions.UpstreamRefused` (``status`` 429 or 503, ``retry_after``) without
being sent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import requests

from . import tokens
from .calls import binding, health, retries, target
from .calls import call as steps
from .calls.attempts import URLLIB3
from .conf import app_settings
from .exceptions import DatasourceError, UpstreamRefused
from .models.values import end_user_problem
from .security import tls

if TYPE_CHECKING:
    from .models import Datasource


class OutsideBaseUrl(DatasourceError, ValueError):
    """The URL asked for is not below the datasource's base URL."""


class MethodNotAllowed(DatasourceError, ValueError):
    """The datasource does not allow this HTTP method (see its allowed methods)."""


class DatasourceSession(requests.Session):
    def __init__(
        self, datasource: Datasource, user=None, timeout: Any = None, *, end_user: str = ""
    ) -> None:
        super().__init__()
        if end_user:
            problem = end_user_problem(end_user)
            if problem is not None:
                raise ValueError(f"Not an end user id: {problem}.")
            if user is not None:
                raise ValueError("A session acts for a user or for an end user, not both.")
        self.datasource = datasource
        self.user = user
        #: The end user whose token every call uses (NotConnected when they have none).
        self.end_user = end_user
        self.timeout = app_settings.CLIENT_TIMEOUT if timeout is None else timeout
        self.trust_env = False
        context = tls.context_for(datasource, api=True)
        if context is not None:  # a private CA, or the certificate tokens are bound to
            self.mount("https://", tls.ContextAdapter(context))

    def request(  # type: ignore[override]
        self,
        method: str,
        url: str,
        params: Any = None,
        data: Any = None,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> requests.Response:
        method = method.upper()
        refused = steps.method_refusal(self.datasource, method)
        if refused is not None:
            raise MethodNotAllowed(refused.detail)
        if kwargs.get("verify") is False:
            raise ValueError(
                "Server certificates are always verified; for a private CA, set the "
                "datasource's trusted CA certificates."
            )
        path_url, query = self._target(url, params)
        kwargs.setdefault("timeout", self.timeout)
        kwargs["allow_redirects"] = False
        headers = dict(headers or {})
        # With body conditions the answer must reach the attempts unread (they read its start
        # as sent, still compressed); it is then read as requests would have read it.
        stream = kwargs.get("stream", False)
        if self.datasource.expiry_body_rules:
            kwargs["stream"] = True
        if any(name.lower() == steps.END_USER_HEADER.lower() for name in headers):
            raise ValueError(
                f"{steps.END_USER_HEADER} is the proxy's header: pass end_user= to "
                "datasource.session() instead."
            )
        requested = _pop_header(headers, retries.RETRIES_HEADER)
        refused = steps.gate(self.datasource)
        if refused is not None:
            raise UpstreamRefused(
                refused.detail, status=refused.status, retry_after=refused.retry_after or 0.0
            )
        attempts = steps.attempts_for(
            self.datasource,
            tokens.get_valid_token(self.datasource, user=self.user, end_user=self.end_user),
            REQUESTS,
            method=method,
            requested_retries=requested,
            replayable=_replayable(data),
            idempotency_key=any(
                name.lower() == retries.IDEMPOTENCY_HEADER.lower() for name in headers
            ),
            observe=health.observe,
        )
        response = attempts.run(
            lambda token: self._send(
                method, path_url, query, token, data, headers, kwargs, attempts.replayable
            )
        )
        if not stream and kwargs.get("stream"):
            response.content  # noqa: B018 - loads the body, as requests does without stream
        return response

    def _send(self, method, url, query, token, data, headers, kwargs, replayable):
        """One call with ``token``; once more with a fresh DPoP proof when the server refused
        the proof (see :mod:`datasources.calls.binding`)."""
        response = self._send_once(method, url, query, token, data, headers, kwargs)
        status, answer = response.status_code, response.headers
        if binding.proof_refused(self.datasource, token, url, status, answer) and replayable:
            response.close()
            response = self._send_once(method, url, query, token, data, headers, kwargs)
            binding.proof_refused(
                self.datasource, token, url, response.status_code, response.headers
            )
        return response

    def _send_once(self, method, url, query, token, data, headers, kwargs):
        sent = dict(self.datasource.default_headers or {})
        for name, value in (headers or {}).items():
            sent = {k: v for k, v in sent.items() if k.lower() != name.lower()}
            sent[name] = value
        placed = binding.auth_headers(self.datasource, token, method, url)
        names = {name.lower() for name in placed}
        sent = {k: v for k, v in sent.items() if k.lower() not in names}
        sent.update(placed)
        access_token = token.access_token or ""
        full_url = target.with_query(url, target.build_query(self.datasource, query, access_token))
        return super().request(method, full_url, data=data, headers=sent, **kwargs)

    def _target(self, url: str, params: Any) -> tuple[str, str]:
        """(upstream URL without query, query string) for ``url`` and ``params``."""
        base = self.datasource.base_url
        url, _, fragment = url.partition("#")
        if fragment:
            raise OutsideBaseUrl("A URL fragment ('#') is not sent to an API.")
        if "://" in url:
            prefix = base.rstrip("/")
            if url != prefix and not url.startswith((prefix + "/", prefix + "?")):
                raise OutsideBaseUrl("That URL is not below the datasource's base URL.")
            url = url[len(prefix) :]
        path, _, query = url.partition("?")
        try:
            resolved = target.resolve(base, path.lstrip("/"))
        except target.InvalidPath as err:
            raise OutsideBaseUrl(
                f"That path would leave the datasource's base URL ({err.reason})."
            ) from None
        extra = _encode_params(params)
        return resolved, "&".join(part for part in (query, extra) if part)


def _encode_params(params: Any) -> str:
    if not params:
        return ""
    if isinstance(params, bytes):
        return params.decode("ascii")
    if isinstance(params, str):
        return params
    items = params.items() if hasattr(params, "items") else params
    pairs = []
    for name, value in items:
        values = value if isinstance(value, list | tuple) else [value]
        pairs.extend((name, v) for v in values if v is not None)
    return urlencode(pairs)


class _RequestsWire:
    """How requests' answers are read by :class:`~datasources.calls.attempts.Attempts`."""

    connection_errors = (requests.ConnectionError, requests.Timeout)

    @staticmethod
    def status(response: requests.Response) -> int:
        return response.status_code

    @staticmethod
    def headers(response: requests.Response) -> requests.structures.CaseInsensitiveDict:
        return response.headers

    @staticmethod
    def discard(response: requests.Response) -> None:
        response.close()

    @staticmethod
    def peek(response: requests.Response, limit: int) -> tuple[bytes | None, requests.Response]:
        """The start of an unread answer, through its urllib3 answer (:class:`.Urllib3Wire`);
        the answer then reads the same bytes."""
        body, response.raw = URLLIB3.peek(response.raw, limit)
        return body, response


REQUESTS = _RequestsWire()


def _pop_header(headers: dict[str, str], name: str) -> str | None:
    """Remove ``name`` (any case) from ``headers``; its value, if it was there."""
    value = None
    for key in [k for k in headers if k.lower() == name.lower()]:
        value = headers.pop(key)
    return value


def _replayable(data: Any) -> bool:
    """Generators and file objects cannot be sent twice."""
    return data is None or isinstance(data, str | bytes | dict | list | tuple)
