"""Every HTTP call to an authorization server lives here, and only here.

Built on oauthlib's client classes (request bodies, PKCE, token-response validation) with our own
``requests`` transport, because requests-oauthlib's ``OAuth2Session`` logs request and response
bodies (client secret, code, refresh token, access token) at DEBUG level and needs process-wide
environment variables for loopback http:// and changed scopes. Here:

* every URL passes :mod:`datasources.security.policy` first (https, or http on loopback only);
* every request has a total deadline (not only a per-read timeout), a size cap on the answer,
  our User-Agent and no redirect following (:mod:`datasources.authserver.outbound`);
* failures come back as :class:`OAuthError` (the server answered with an RFC 6749 error code,
  whatever the HTTP status, including errors inside a 200 answer) or
  :class:`TransientUpstreamError` (network, timeout, 5xx, 429, garbage: retry later); what an
  error code means for the token is decided in ``datasources.tokens.failures.classify``;
* no exception message or log line contains a secret or the response body.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import requests
import urllib3
from django.views.decorators.debug import sensitive_variables
from oauthlib.common import add_params_to_uri
from oauthlib.oauth2 import (
    BackendApplicationClient,
    Client,
    MissingTokenError,
    OAuth2Error,
    WebApplicationClient,
)

from ..conf import app_settings
from ..exceptions import DatasourceError, OAuthError, TransientUpstreamError
from ..models.values import RESERVED_AUTH_PARAMS
from ..security import dpop, jose, tls
from ..security.policy import check_transport
from . import outbound
from .outbound import parse_retry_after

if TYPE_CHECKING:
    from ..models import Datasource

logger = logging.getLogger(__name__)

_ERROR_CODE = re.compile(r"^[\x20\x21\x23-\x5b\x5d-\x7e]{1,100}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

_local = threading.local()
#: Client authentication by the TLS client certificate (RFC 8705 §2).
MTLS_CLIENT_AUTH = frozenset({"tls_client_auth", "self_signed_tls_client_auth"})


@dataclass(frozen=True)
class TokenResponse:
    """A successful token response. Secrets are kept out of ``repr``."""

    access_token: str = field(repr=False)
    token_type: str = "Bearer"
    #: As sent (a number or a string, possibly 0, negative or absurd); interpreted by
    #: ``datasources.tokens.expiry``.
    expires_in: Any = None
    refresh_token: str | None = field(default=None, repr=False)
    scope: str = ""
    #: OpenID Connect: the ID token, as sent (read by :mod:`.identity`).
    id_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class PkcePair:
    verifier: str = field(repr=False)
    challenge: str


def http_session() -> requests.Session:
    """One pooled session per thread, with our User-Agent and connections that a call's total
    deadline can end (:mod:`datasources.authserver.outbound`). Deadlines are set on every call."""
    session = getattr(_local, "session", None)
    if session is None:
        session = requests.Session()
        session.headers["User-Agent"] = app_settings.USER_AGENT
        # Uncompressed answers: the size cap then counts what the server sent.
        session.headers["Accept-Encoding"] = "identity"
        session.trust_env = False
        session.mount("https://", outbound.BoundedAdapter())
        session.mount("http://", outbound.BoundedAdapter())
        _local.session = session
    return session


def _tls_session(context: ssl.SSLContext) -> requests.Session:
    """Like :func:`http_session`, connecting with ``context`` (a datasource's CA bundle and
    client certificate, :mod:`datasources.security.tls`); one per context and thread."""
    sessions = getattr(_local, "tls_sessions", None)
    if sessions is None:
        sessions = _local.tls_sessions = {}
    session = sessions.get(id(context))
    if session is None or session.tls_context is not context:
        session = requests.Session()
        session.headers.update(http_session().headers)
        session.trust_env = False
        session.mount("https://", _TLSBoundedAdapter(context))
        session.mount("http://", outbound.BoundedAdapter())
        session.tls_context = context
        sessions[id(context)] = session
    return session


class _TLSBoundedAdapter(tls.ContextAdapterMixin, outbound.BoundedAdapter):
    pass


def _bounded_request(
    method: str,
    url: str,
    timeout: float,
    *,
    context: ssl.SSLContext | None = None,
    **kwargs: Any,
) -> requests.Response:
    """A call ending within ``timeout`` seconds in all, its answer read up to
    HTTP_MAX_RESPONSE_BYTES. Raises outbound.DeadlineExceeded / outbound.TooLarge too."""
    return outbound.request(
        http_session() if context is None else _tls_session(context),
        method,
        url,
        timeout=timeout,
        max_bytes=app_settings.HTTP_MAX_RESPONSE_BYTES,
        **kwargs,
    )


@sensitive_variables()
def fetch_userinfo(datasource: Datasource, url: str, access_token: str) -> Any:
    """GET ``url`` with the access token (a provider's "who am I" call: GitHub ``/user``, Slack
    ``auth.test``, Graph ``/me``): its JSON, or TransientUpstreamError saying why not (the
    status or the failure's name; never the body)."""
    check_transport(url)
    host = urlsplit(url).hostname
    try:
        response = _bounded_request(
            "GET",
            url,
            app_settings.HTTP_TIMEOUT,
            context=tls.context_for(datasource, api=True),
            headers={"Authorization": f"Bearer {access_token}", "Accept": "application/json"},
            allow_redirects=False,
        )
    except (
        tls.TLSConfigError,
        outbound.DeadlineExceeded,
        outbound.TooLarge,
        requests.RequestException,
    ) as err:
        raise _send_failure(
            err, "userinfo request", datasource.slug, host, app_settings.HTTP_TIMEOUT
        ) from None
    if response.status_code != 200:
        raise TransientUpstreamError(f"{host} answered HTTP {response.status_code} to userinfo.")
    try:
        return response.json()
    except ValueError:
        raise TransientUpstreamError(f"{host}'s userinfo answer is not JSON.") from None


def new_pkce_pair() -> PkcePair:
    client = Client(client_id="")
    verifier = client.create_code_verifier(64)
    return PkcePair(verifier=verifier, challenge=client.create_code_challenge(verifier, "S256"))


def build_authorization_url(
    datasource: Datasource, *, state: str, redirect_uri: str, code_challenge: str | None
) -> str:
    """The provider URL to send the user to (RFC 6749 §4.1.1 + PKCE + custom parameters).
    With a PAR endpoint (RFC 9126) the parameters are pushed there first and the URL carries
    only ``client_id`` and the ``request_uri`` the server returned."""
    check_transport(datasource.authorization_url)
    params = authorization_params(
        datasource, state=state, redirect_uri=redirect_uri, code_challenge=code_challenge
    )
    if datasource.pushed_authorization_request_url:
        request_uri = push_authorization_request(datasource, params)
        params = [("client_id", datasource.client_id), ("request_uri", request_uri)]
    return add_params_to_uri(datasource.authorization_url, params)


def authorization_params(
    datasource: Datasource, *, state: str, redirect_uri: str, code_challenge: str | None
) -> list[tuple[str, str]]:
    params: list[tuple[str, str]] = [
        (key, value)
        for key, value in (datasource.custom_auth_params or {}).items()
        if key not in RESERVED_AUTH_PARAMS
    ]
    params += [
        ("response_type", "code"),
        ("client_id", datasource.client_id),
        ("redirect_uri", redirect_uri),
        ("state", state),
    ]
    if datasource.scopes:
        params.append(("scope", datasource.scope_param))
    if code_challenge:
        params += [("code_challenge", code_challenge), ("code_challenge_method", "S256")]
    params += _extra_token_params(datasource)
    if datasource.use_dpop and datasource.dpop_jkt:
        # RFC 9449 §10: the code is bound to the DPoP key; only its holder can redeem it.
        params.append(("dpop_jkt", datasource.dpop_jkt))
    return params


@sensitive_variables()
def push_authorization_request(datasource: Datasource, params: list[tuple[str, str]]) -> str:
    """RFC 9126 §2: POST the authorization parameters (with client authentication) and return
    the ``request_uri`` to send the browser with."""
    url = datasource.pushed_authorization_request_url
    check_transport(url)
    fields = [(k, v) for k, v in params if k != "client_id"]

    def prepare(include_client_id: bool, client_id: str, client_secret: str | None = None) -> str:
        body = list(fields)
        if include_client_id:
            body.append(("client_id", client_id))
        if client_secret:
            body.append(("client_secret", client_secret))
        return urlencode(body)

    what = "pushed authorization request"
    response = _post_token(
        datasource,
        lambda: _with_client_auth(datasource, prepare, endpoint=url, force_client_id=True),
        what,
        url=url,
        timeout=app_settings.HTTP_TIMEOUT,
    )
    if response.status_code not in (200, 201):
        _raise_for_error_response(
            response, datasource, secrets=_client_secrets(datasource), what=what
        )
        raise TransientUpstreamError(f"The PAR endpoint answered HTTP {response.status_code}.")
    payload = _json_or_none(response.text)
    request_uri = payload.get("request_uri") if isinstance(payload, dict) else None
    if not isinstance(request_uri, str) or not request_uri or len(request_uri) > 2000:
        raise TransientUpstreamError("The PAR endpoint's answer has no request_uri.")
    return request_uri


@sensitive_variables()
def exchange_code(
    datasource: Datasource, *, code: str, redirect_uri: str, code_verifier: str | None
) -> TokenResponse:
    """Authorization code grant (RFC 6749 §4.1.3), with the PKCE verifier when one was sent."""
    client = WebApplicationClient(datasource.client_id)
    extra: dict[str, Any] = dict(_extra_token_params(datasource))
    if code_verifier:
        extra["code_verifier"] = code_verifier

    def build() -> tuple[str, dict[str, str]]:
        return _with_client_auth(
            datasource,
            lambda client_id, **auth: client.prepare_request_body(  # client_id: the client's own
                code=code, redirect_uri=redirect_uri, **auth, **extra
            ),
        )

    try:
        return _token_request(
            datasource,
            client,
            build,
            secrets=[code, code_verifier],
            what="code exchange",
        )
    except OAuthError as err:
        if err.error != "invalid_grant" or not datasource.use_dpop:
            raise
        hint = (
            "with DPoP the code is bound to the DPoP key it was requested with (dpop_jkt): "
            "if the key was regenerated meanwhile, authorize again"
        )
        raise type(err)(
            "invalid_grant",
            f"{err.description}; {hint}"[:400] if err.description else hint,
            status=err.status,
        ) from None


@sensitive_variables()
def refresh(datasource: Datasource, refresh_token: str) -> TokenResponse:
    """Refresh token grant (RFC 6749 §6). Client credentials are always sent as configured."""
    client = WebApplicationClient(datasource.client_id)
    extra = dict(_extra_token_params(datasource))

    def build() -> tuple[str, dict[str, str]]:
        return _with_client_auth(
            datasource,
            lambda **auth: client.prepare_refresh_body(
                refresh_token=refresh_token, **auth, **extra
            ),
        )

    return _token_request(datasource, client, build, secrets=[refresh_token], what="refresh")


@sensitive_variables()
def client_credentials(datasource: Datasource) -> TokenResponse:
    """Client credentials grant (RFC 6749 §4.4)."""
    client = BackendApplicationClient(datasource.client_id)
    extra = dict(_extra_token_params(datasource))
    scope = datasource.scope_param or None

    def build() -> tuple[str, dict[str, str]]:
        return _with_client_auth(
            datasource, lambda **auth: client.prepare_request_body(scope=scope, **auth, **extra)
        )

    return _token_request(datasource, client, build, secrets=[], what="client credentials grant")


@sensitive_variables()
def jwt_bearer(datasource: Datasource) -> TokenResponse:
    """JWT bearer grant (RFC 7523 §2.1): a fresh signed assertion (``iss`` the service account,
    ``sub`` the user acted for, if any, ``aud`` the token URL) for each request. The client
    authenticates only when configured to (a secret or a client assertion); Google and
    Salesforce need none: the assertion identifies the client."""
    client = BackendApplicationClient(datasource.client_id)
    assertions: list[str | None] = []  # each attempt signs a new one (unique jti)
    authenticated = bool(
        datasource.client_secret or datasource.client_authentication in _ASSERTION_METHODS
    )

    def build() -> tuple[str, dict[str, str]]:
        assertion = jose.bearer_assertion(
            datasource.client_id,
            datasource.access_token_url,
            signer_of(datasource),
            subject=datasource.assertion_subject,
            scope=datasource.scope_param,
        )
        assertions.append(assertion)
        params = [("grant_type", jose.JWT_BEARER_GRANT), ("assertion", assertion)]
        if datasource.scope_param:
            params.append(("scope", datasource.scope_param))
        params += _extra_token_params(datasource)
        if not authenticated:
            return urlencode(params), dict(_FORM_HEADERS)

        def prepare(include_client_id: bool, client_id: str, client_secret: str | None = None):
            body = list(params)
            if include_client_id:
                body.append(("client_id", client_id))
            if client_secret:
                body.append(("client_secret", client_secret))
            return urlencode(body)

        return _with_client_auth(datasource, prepare)

    try:
        return _token_request(
            datasource, client, build, secrets=assertions, what="JWT bearer grant"
        )
    except OAuthError as err:
        if err.error != "invalid_grant":
            raise
        said = f" It said: {err.description}" if err.description else ""
        raise OAuthError(
            "invalid_grant",
            "The provider rejected the JWT bearer assertion: check the client ID (the service "
            "account's email), the key ID and the key registered for it, and, when acting "
            f"for a user, that delegation is allowed.{said}"[:400],
            status=err.status,
        ) from None


@sensitive_variables()
def revoke(datasource: Datasource, token: str, token_type_hint: str) -> None:
    """RFC 7009 revocation. Raises like the token calls; callers decide whether to go on."""
    check_transport(datasource.revocation_url)

    def prepare(include_client_id: bool, client_id: str, client_secret: str | None = None) -> str:
        params = [("token", token), ("token_type_hint", token_type_hint)]
        if include_client_id:
            params.append(("client_id", client_id))
        if client_secret:
            params.append(("client_secret", client_secret))
        return urlencode(params)

    body, headers = _with_client_auth(datasource, prepare, endpoint=datasource.revocation_url)
    response = _post(
        datasource.revocation_url,
        body,
        headers,
        datasource,
        "revocation",
        app_settings.HTTP_TIMEOUT,
    )
    if response.status_code == 200:
        return
    _raise_for_error_response(response, datasource, secrets=[token], what="revocation")
    raise TransientUpstreamError(f"Revocation endpoint answered HTTP {response.status_code}.")


@dataclass(frozen=True)
class ServerMetadata:
    """What discovery found (RFC 8414 / OpenID Connect Discovery)."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    revocation_endpoint: str
    pkce_s256: bool
    returns_iss: bool
    pushed_authorization_request_endpoint: str = ""
    require_pushed_authorization_requests: bool = False
    #: As listed by the server (RFC 8414 §2); empty when it lists none.
    token_endpoint_auth_methods_supported: tuple[str, ...] = ()
    #: RFC 9449 §5.1: the server does DPoP with these algorithms (empty: no DPoP advertised).
    dpop_signing_alg_values_supported: tuple[str, ...] = ()
    #: RFC 8705 §5: endpoints to use instead when calling with a TLS client certificate.
    mtls_endpoint_aliases: dict[str, str] = field(default_factory=dict)
    #: RFC 8705 §3.3: the server can bind tokens to the client certificate.
    tls_client_certificate_bound_access_tokens: bool = False


class DiscoveryError(DatasourceError):
    """Discovery failed; the message says why and names the URL tried."""


def discover(issuer: str, *, ca_bundle: str = "") -> ServerMetadata:
    """Fetch the issuer's metadata: OpenID Connect first, then RFC 8414. The ``issuer`` in the
    document must equal the one asked for (RFC 8414 §3.3), or the document is refused.
    ``ca_bundle``: a datasource's private CA certificates, trusted besides the system's."""
    check_transport(issuer)
    context = tls.ssl_context("", "", ca_bundle) if ca_bundle else None
    wanted = issuer.rstrip("/")
    parts = urlsplit(wanted)
    candidates = [
        f"{wanted}/.well-known/openid-configuration",
        f"{parts.scheme}://{parts.netloc}/.well-known/oauth-authorization-server{parts.path}",
    ]
    tried = []
    for url in candidates:
        tried.append(url)
        response = _fetch_metadata(url, context)
        if response.status_code == 404:
            continue
        if response.status_code != 200:
            raise DiscoveryError(f"{url} answered HTTP {response.status_code}.")
        document = _json_or_none(response.text)
        if not isinstance(document, dict):
            raise DiscoveryError(f"{url} did not answer with a JSON object.")
        found = str(document.get("issuer") or "")
        if found.rstrip("/") != wanted:
            raise DiscoveryError(
                f"The metadata at {url} names the issuer {found[:200]!r}, not {issuer!r}; "
                "refusing it (RFC 8414 §3.3)."
            )
        return _server_metadata(document, url)
    raise DiscoveryError("No metadata found at " + " or ".join(tried) + ".")


def _fetch_metadata(url: str, context) -> requests.Response:
    """One metadata document's answer; a DiscoveryError that says why when none came."""
    try:
        response = _bounded_request(
            "GET",
            url,
            app_settings.HTTP_TIMEOUT,
            context=context,
            headers={"Accept": "application/json"},
        )
    except outbound.DeadlineExceeded:
        raise DiscoveryError(
            f"The issuer's metadata at {url} did not arrive within {app_settings.HTTP_TIMEOUT:g} s."
        ) from None
    except outbound.TooLarge as err:
        raise DiscoveryError(
            f"The issuer's metadata at {url} is larger than {err.limit} bytes."
        ) from None
    except requests.exceptions.SSLError as err:
        raise DiscoveryError(
            f"The issuer's metadata at {url} was not fetched: "
            f"{tls.failure_reason(err) or 'TLS failed'}; if its certificate is issued by a "
            "private CA, add that CA under “Trusted CA certificates”."
        ) from None
    except requests.RequestException as err:
        raise DiscoveryError(
            f"The issuer's metadata at {url} is unreachable ({type(err).__name__})."
        ) from None
    return response


def _server_metadata(document: dict[str, Any], url: str) -> ServerMetadata:
    """The parts of a metadata document we use, each checked for its type."""
    endpoints = {}
    for key in (
        "authorization_endpoint",
        "token_endpoint",
        "revocation_endpoint",
        "pushed_authorization_request_endpoint",
    ):
        value = document.get(key) or ""
        if value and not isinstance(value, str):
            raise DiscoveryError(f"{url}: {key} is not a string.")
        endpoints[key] = value
    if not endpoints["token_endpoint"]:
        raise DiscoveryError(f"{url} has no token_endpoint.")
    methods = document.get("code_challenge_methods_supported") or []
    auth_methods = document.get("token_endpoint_auth_methods_supported") or []
    return ServerMetadata(
        issuer=str(document.get("issuer") or ""),
        pkce_s256=isinstance(methods, list) and "S256" in methods,
        returns_iss=document.get("authorization_response_iss_parameter_supported") is True,
        require_pushed_authorization_requests=(
            document.get("require_pushed_authorization_requests") is True
        ),
        token_endpoint_auth_methods_supported=tuple(
            m for m in auth_methods if isinstance(m, str) and _ERROR_CODE.match(m)
        )
        if isinstance(auth_methods, list)
        else (),
        dpop_signing_alg_values_supported=_names(document.get("dpop_signing_alg_values_supported")),
        mtls_endpoint_aliases=_mtls_aliases(document.get("mtls_endpoint_aliases"), url),
        tls_client_certificate_bound_access_tokens=(
            document.get("tls_client_certificate_bound_access_tokens") is True
        ),
        **endpoints,
    )


def _names(value: Any) -> tuple[str, ...]:
    """A metadata list of short names (algorithms, methods); anything else: empty."""
    if not isinstance(value, list):
        return ()
    return tuple(v for v in value if isinstance(v, str) and _ERROR_CODE.match(v))[:50]


#: The aliases (RFC 8705 §5) this app uses: the endpoints it calls with the client certificate.
MTLS_ALIASED = (
    "token_endpoint",
    "revocation_endpoint",
    "pushed_authorization_request_endpoint",
)


def _mtls_aliases(value: Any, url: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise DiscoveryError(f"{url}: mtls_endpoint_aliases is not an object.")
    aliases = {}
    for key in MTLS_ALIASED:
        alias = value.get(key)
        if alias is None:
            continue
        if not isinstance(alias, str) or not alias.startswith("https://") or len(alias) > 2000:
            raise DiscoveryError(f"{url}: mtls_endpoint_aliases.{key} is not an https URL.")
        aliases[key] = alias
    return aliases


# --- internals -------------------------------------------------------------------------------


def _extra_token_params(datasource: Datasource) -> list[tuple[str, str]]:
    params = []
    if datasource.audience:
        params.append(("audience", datasource.audience))
    if datasource.resource:
        params.append(("resource", datasource.resource))
    return params


_FORM_HEADERS = {
    "Content-Type": "application/x-www-form-urlencoded",
    "Accept": "application/json",
}
_ASSERTION_METHODS = frozenset({"private_key_jwt", "client_secret_jwt"})


@sensitive_variables()
def signer_of(datasource: Datasource) -> jose.Signer:
    """The datasource's private key, algorithm, kid and certificate, ready to sign. A stored
    key that no longer loads is a configuration error (DatasourceError), not a crash."""
    try:
        return jose.Signer.from_pem(
            datasource.private_key or "",
            algorithm=datasource.signing_algorithm,
            kid=datasource.private_key_id,
            certificate=datasource.signing_certificate,
        )
    except jose.KeyProblem as err:
        # A configuration error (kept token, shown prominently, retried with backoff).
        raise OAuthError(
            "invalid_request", f"The datasource's private key cannot be used: {err}"
        ) from None


def assertion_audience(datasource: Datasource, endpoint: str | None = None) -> str:
    """The ``aud`` of a client assertion, as the datasource's setting says."""
    if datasource.assertion_audience == "issuer" and datasource.issuer:
        return datasource.issuer
    if datasource.assertion_audience == "endpoint" and endpoint:
        return endpoint
    return datasource.access_token_url


@sensitive_variables()
def _client_assertion(datasource: Datasource, endpoint: str | None) -> str:
    audience = assertion_audience(datasource, endpoint)
    if datasource.client_authentication == "client_secret_jwt":
        if not datasource.client_secret:
            raise OAuthError("invalid_request", "client_secret_jwt needs a client secret.")
        return jose.client_secret_assertion(
            datasource.client_id, audience, datasource.client_secret
        )
    return jose.client_assertion(datasource.client_id, audience, signer_of(datasource))


def _client_secrets(datasource: Datasource) -> list[str]:
    return [datasource.client_secret] if datasource.client_secret else []


@sensitive_variables()
def _with_client_auth(
    datasource: Datasource, prepare, *, endpoint: str | None = None, force_client_id: bool = False
) -> tuple[str, dict[str, str]]:
    """Apply the datasource's client authentication (RFC 6749 §2.3.1, RFC 7523 §2.2) to a
    request to ``endpoint`` (the token endpoint when not given). ``force_client_id``: the
    request names the client in its body whatever the method (PAR, RFC 9126 §2.1)."""
    headers = dict(_FORM_HEADERS)
    secret = datasource.client_secret or ""
    client_id = datasource.client_id
    if datasource.client_authentication in MTLS_CLIENT_AUTH:
        # RFC 8705 §2: the TLS client certificate authenticates; client_id names the client.
        body = prepare(include_client_id=True, client_id=client_id)
    elif datasource.client_authentication in _ASSERTION_METHODS:
        body = prepare(include_client_id=True, client_id=client_id)
        assertion = _client_assertion(datasource, endpoint)
        body += "&" + urlencode(
            [("client_assertion_type", jose.CLIENT_ASSERTION_TYPE), ("client_assertion", assertion)]
        )
    elif datasource.client_authentication == "basic" and secret:
        # Both parts are form-urlencoded before base64, as §2.3.1 requires.
        raw = f"{quote(client_id, safe='')}:{quote(secret, safe='')}"
        headers["Authorization"] = "Basic " + base64.b64encode(raw.encode()).decode("ascii")
        body = prepare(include_client_id=force_client_id, client_id=client_id)
    elif secret:
        body = prepare(include_client_id=True, client_id=client_id, client_secret=secret)
    else:  # public client: identify ourselves in the body
        body = prepare(include_client_id=True, client_id=client_id)
    return body, headers


def _send_failure(
    err: Exception, what: str, slug: str, host: str | None, timeout: float
) -> TransientUpstreamError:
    """What a request to the authorization server that got no usable answer becomes: logged
    (host and reason, never the body), and an error that says whether the server may have
    acted on it (``outcome_unknown``: a refresh token may have rotated)."""
    if isinstance(err, tls.TLSConfigError):
        return TransientUpstreamError(f"The {what} was not sent: {err}")
    if isinstance(err, outbound.DeadlineExceeded):
        logger.warning(
            "%s for datasource %s: %s did not finish its answer within %g s",
            what,
            slug,
            host,
            timeout,
        )
        return TransientUpstreamError(
            f"The {what} request to {host} did not finish within {timeout:g} s; the server "
            "may have acted on it.",
            outcome_unknown=True,
        )
    if isinstance(err, outbound.TooLarge):
        logger.warning(
            "%s for datasource %s: %s answered more than %d bytes", what, slug, host, err.limit
        )
        return TransientUpstreamError(
            f"The answer of {host} to the {what} is larger than {err.limit} bytes.",
            outcome_unknown=True,
        )
    if isinstance(err, requests.exceptions.SSLError):
        reason = tls.failure_reason(err) or "TLS failed"
        logger.warning("%s for datasource %s: %s: %s", what, slug, host, reason)
        hint = (
            "; if it is issued by a private CA, add that CA under “Trusted CA certificates”"
            if "not trusted" in reason
            else ""
        )
        return TransientUpstreamError(f"The {what} request to {host} was not sent: {reason}{hint}.")
    unknown = _answer_lost(err)
    timed_out = isinstance(err, requests.Timeout)
    logger.warning(
        "%s for datasource %s: %s %s (%s)",
        what,
        slug,
        host,
        "did not answer in time" if timed_out else "unreachable",
        type(err).__name__,
    )
    text = "timed out" if timed_out else f"failed: {type(err).__name__}"
    return TransientUpstreamError(
        f"The {what} request to {host} {text}"
        + (" after it was sent; the server may have acted on it." if unknown else "."),
        outcome_unknown=unknown,
    )


def _post(
    url: str,
    body: str,
    headers: dict[str, str],
    datasource: Datasource,
    what: str,
    timeout: float,
) -> requests.Response:
    check_transport(url)
    host = urlsplit(url).hostname
    started = time.monotonic()
    try:
        context = tls.context_for(datasource, api=False)
        response = _bounded_request(
            "POST", url, timeout, context=context, data=body, headers=headers
        )
    except (
        tls.TLSConfigError,
        outbound.DeadlineExceeded,
        outbound.TooLarge,
        requests.RequestException,
    ) as err:
        raise _send_failure(err, what, datasource.slug, host, timeout) from None
    logger.info(
        "%s for datasource %s: %s answered HTTP %s in %.0f ms",
        what,
        datasource.slug,
        host,
        response.status_code,
        (time.monotonic() - started) * 1000,
    )
    return response


@sensitive_variables()
def _post_token(
    datasource: Datasource,
    build: Callable[[], tuple[str, dict[str, str]]],
    what: str,
    *,
    url: str | None = None,
    timeout: float | None = None,
) -> requests.Response:
    """POST to the token endpoint (or ``url``: the PAR endpoint, RFC 9449 §10.1); with DPoP,
    a fresh proof per attempt, and once more with the server's nonce when it answers
    ``use_dpop_nonce`` (RFC 9449 §8: the server refuses before acting on the grant, so the
    code or refresh token is still good)."""
    url = url or datasource.access_token_url
    timeout = app_settings.REFRESH_TIMEOUT if timeout is None else timeout
    if not datasource.use_dpop:
        body, headers = build()
        return _post(url, body, headers, datasource, what, timeout)
    for attempt in (1, 2):
        body, headers = build()
        try:
            proof = dpop.proof(
                datasource.dpop_private_key or "", "POST", url, nonce=dpop.nonce_for(url)
            )
        except dpop.DPoPKeyError as err:
            # A configuration error (kept token, shown prominently, retried with backoff).
            raise OAuthError("invalid_request", str(err)) from None
        response = _post(url, body, {**headers, "DPoP": proof}, datasource, what, timeout)
        dpop.remember_nonce(url, response.headers.get("DPoP-Nonce"))
        if attempt == 2 or not _asks_for_nonce(response):
            return response
        logger.info(
            "%s for datasource %s: the server asked for a DPoP nonce", what, datasource.slug
        )
    raise AssertionError("unreachable")


def _asks_for_nonce(response: requests.Response) -> bool:
    if response.status_code not in (400, 401) or not response.headers.get("DPoP-Nonce"):
        return False
    payload = _json_or_none(response.text)
    return isinstance(payload, dict) and payload.get("error") == "use_dpop_nonce"


def _answer_lost(err: requests.RequestException) -> bool:
    """Whether the request may have reached the server (its answer was lost): a read timeout or
    a connection dropped mid-answer, as opposed to a connection that was never made."""
    if isinstance(err, requests.ConnectTimeout):
        return False
    if isinstance(err, requests.Timeout):
        return True
    if isinstance(err, requests.ConnectionError):
        reason = getattr(err.args[0], "reason", None) if err.args else None
        never_connected = (
            urllib3.exceptions.NewConnectionError,
            urllib3.exceptions.NameResolutionError,
            urllib3.exceptions.ConnectTimeoutError,
        )
        return not isinstance(reason, never_connected)
    return False


@sensitive_variables()
def _token_request(
    datasource: Datasource,
    client: Client,
    build: Callable[[], tuple[str, dict[str, str]]],
    *,
    secrets: list[str | None],
    what: str,
) -> TokenResponse:
    """``build`` makes the request's body and headers; called again for a second attempt
    (a DPoP nonce), so that one-time client and grant assertions are never sent twice."""
    response = _post_token(datasource, build, what)
    all_secrets = [s for s in [*secrets, datasource.client_secret] if s]
    if response.status_code != 200:
        try:
            _raise_for_error_response(response, datasource, secrets=all_secrets, what=what)
        except OAuthError as err:
            raise _with_certificate_named(datasource, err) from None
        raise TransientUpstreamError(
            f"The token endpoint answered HTTP {response.status_code} to the {what}."
        )
    content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    params = _token_params(response.text, content_type)
    if params is None:
        raise TransientUpstreamError(
            f"The token endpoint's answer to the {what} is not a JSON object"
            f"{' (' + content_type + ')' if content_type else ''}."
        )
    # expires_in is interpreted by us (strings, 0, huge values); oauthlib would int() it.
    expires_in = params.pop("expires_in", None)
    try:
        token = client.parse_request_body_response(
            json.dumps(params), scope=datasource.scope_list or None
        )
    except Warning as warning:  # granted scope differs from the requested one: that's allowed
        token = warning.token
    except MissingTokenError:
        raise TransientUpstreamError(
            f"The token endpoint's answer to the {what} has no access_token."
        ) from None
    except OAuth2Error as err:
        raise _classified(err.error, err.description, all_secrets, 200) from None
    except (ValueError, TypeError):
        raise TransientUpstreamError(
            f"The token endpoint's answer to the {what} is malformed."
        ) from None
    scope = token.get("scope") or ""
    if isinstance(scope, list | tuple):
        scope = " ".join(scope)
    return TokenResponse(
        access_token=str(token["access_token"]),
        token_type=str(token.get("token_type") or "Bearer"),
        expires_in=expires_in,
        refresh_token=(str(token["refresh_token"]) if token.get("refresh_token") else None),
        scope=str(scope),
        id_token=str(token["id_token"]) if isinstance(token.get("id_token"), str) else None,
    )


def _raise_for_error_response(
    response: requests.Response, datasource: Datasource, *, secrets: list[str], what: str
) -> None:
    """Raise the classified error for a non-200 answer; return if it has no recognisable shape."""
    status = response.status_code
    if status == 429:
        raise TransientUpstreamError(
            f"The authorization server is rate limiting the {what} (HTTP 429).",
            retry_after=parse_retry_after(response.headers.get("Retry-After")),
        )
    if status >= 500:
        raise TransientUpstreamError(f"The authorization server answered HTTP {status}.")
    if 300 <= status < 400:
        raise TransientUpstreamError(
            f"The authorization server answered the {what} with a redirect (HTTP {status}); "
            "check the URL."
        )
    payload = _json_or_none(response.text)
    if isinstance(payload, dict) and isinstance(payload.get("error"), str):
        error = _classified(payload["error"], payload.get("error_description"), secrets, status)
    elif status == 401:
        error = OAuthError(
            "invalid_client",
            "The authorization server rejected the client credentials (HTTP 401).",
            status=401,
        )
    else:
        return
    method = datasource.client_authentication
    if error.error == "invalid_client" and method in _ASSERTION_METHODS:
        # Same code (the grant is dead until fixed); the description names the likely cause.
        check = (
            "the key ID and the public key registered there"
            if method == "private_key_jwt"
            else "the client secret"
        )
        said = f" It said: {error.description}" if error.description else ""
        error = type(error)(
            "invalid_client",
            f"The provider rejected the client assertion ({method}): check {check}.{said}"[:400],
            status=error.status,
        )
    raise error


def _with_certificate_named(datasource: Datasource, err: OAuthError) -> OAuthError:
    """An ``invalid_client`` to a client authenticating with its TLS certificate: say which
    certificate the server refused (servers rarely say why; the subject is not a secret)."""
    if err.error != "invalid_client" or datasource.client_authentication not in MTLS_CLIENT_AUTH:
        return err
    try:
        subject = tls.certificate_info(datasource.tls_client_certificate or "").subject
    except tls.TLSConfigError:
        subject = "unreadable"
    refused = f"the server did not accept the client certificate {subject}"
    if datasource.client_authentication == "self_signed_tls_client_auth":
        refused += " (register it, or its key as a JWK with x5c, at the provider)"
    else:
        refused += " (check the registered subject DN and that the provider trusts its CA)"
    description = f"{err.description}; {refused}" if err.description else refused
    return OAuthError(err.error, description[:400], status=err.status)


def _classified(error: Any, description: Any, secrets: list[str], status: int) -> OAuthError:
    code = str(error) if isinstance(error, str) and _ERROR_CODE.match(error) else "invalid_response"
    return OAuthError(code, sanitize_description(description, secrets), status=status)


def _token_params(text: str, content_type: str) -> dict[str, Any] | None:
    """The token answer as a dict: a JSON object, or a form-encoded body (GitHub answers so
    unless asked for JSON, and some servers label JSON wrongly)."""
    payload = _json_or_none(text)
    if isinstance(payload, dict):
        return payload
    if payload is None and content_type in ("application/x-www-form-urlencoded", "text/plain"):
        pairs = parse_qsl(text.strip(), keep_blank_values=True)
        if pairs and all(key for key, _ in pairs):
            return dict(pairs)
    return None


def sanitize_description(description: Any, secrets: list[str]) -> str:
    """A provider's error_description, shortened, stripped of control characters and secrets."""
    if not isinstance(description, str):
        return ""
    text = _CONTROL.sub(" ", description)
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "[redacted]")
    return text[:200]


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None
