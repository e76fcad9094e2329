"""Local fake OAuth2 providers shaped like documented real ones, for the provider-quirks suite.

One small threaded HTTP server on 127.0.0.1 plays authorization server *and* resource API:

* ``GET /authorize`` answers 302 straight to the ``redirect_uri`` with a ``code`` and the
  ``state`` (the resource owner always consents), and remembers the PKCE challenge;
* ``POST /token`` serves the authorization_code, refresh_token and client_credentials grants,
  checks client authentication, redirect URI and PKCE verifier, and answers in the profile's
  wire shape (form-encoded, errors with HTTP 200, ``expires_in`` as a string, JWTs, ...);
* ``/api/...`` is a resource API that accepts only access tokens it issued and has not seen
  expire or revoked, and records what it received.

Why a fake rather than django-oauth-toolkit (which the rest of the suite uses): real providers
differ from RFC 6749 in ways DOT cannot be told to imitate, and a test must be able to switch
the token endpoint down and up, make it hang, or lose an answer after rotating, at runtime.
The server decides token expiry itself, so a test can check that what we stored matches what
the provider meant, and it counts every call, so single-flight and storm bounds are measured at
the provider, not inferred from our own bookkeeping.

A profile (:class:`Profile`, :data:`PROFILES`) describes a provider's documented behaviour; a
test can change ``provider.profile`` at runtime (``dataclasses.replace``), inject failures with
:meth:`FakeProvider.fail` and hangs with :meth:`FakeProvider.hang`.

The module also holds the builder's journey used by the quirks and recovery tests: create a
datasource pointing at the provider, authorize it through the admin, call the proxy.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

import pytest
import requests

from .conftest import CALLBACK_PATH, SECRET, make_datasource
from .helpers import body_of

T = TypeVar("T")

#: Longest a hung request waits for :meth:`FakeProvider.release` (a safety net for teardown).
HANG_MAX = 60.0
#: The one client registered at every fake provider, as ``make_datasource`` configures it.
CLIENT_ID = "client-basic"

# --- profiles --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """A provider's documented token-endpoint and API behaviour.

    ``lifetime`` is the access-token lifetime the provider *enforces* (None: never expires);
    ``expires_in`` is what it *says*: ``"int"``, ``"str"`` ("3599"), ``"float-str"``
    ("3599.0"), ``"absent"``, or a literal value sent as is (0, -5, 10**12, "soon", None).
    """

    name: str
    lifetime: float | None = 3600
    expires_in: Any = "int"
    #: Refresh token in the first code exchange for a client (first consent).
    refresh_on_code: bool = True
    #: ... and in later code exchanges (re-consent). Google: only with prompt=consent.
    refresh_on_reconsent: bool = True
    #: Refresh grant: "none" (no refresh_token in the answer; the old one stays valid),
    #: "same" (the same one echoed), "rotate" (a new one; the old one stays valid for a while),
    #: "strict" (a new one; the old one dies the moment the new one is issued), "grace" (a new
    #: one, with reuse detection and a grace period: see :data:`GRACE_DOCS` and ``reuse_grace``).
    rotation: str = "none"
    #: rotation="grace": seconds the refresh token a rotation replaced may be presented again
    #: (Okta's grace period, its "leeway", default 30; Auth0's reuse interval). 0: reuse
    #: detection at once.
    reuse_grace: float = 30.0
    #: rotation="grace": what a reuse within the grace period answers: "new-pair" (another new
    #: access and refresh token, Auth0 and Clerk) or "same" (the answer the rotation gave, again).
    reuse_answer: str = "new-pair"
    token_type: str = "Bearer"
    #: HTTP status of OAuth errors (RFC 6749: 400; GitHub, Slack, Zoho: 200).
    error_status: int = 400
    #: "rfc" ({"error", "error_description"}) or "slack" ({"ok": false, "error"}).
    error_shape: str = "rfc"
    #: Error codes for a dead refresh token and for a bad authorization code.
    dead_refresh_error: str = "invalid_grant"
    bad_code_error: str = "invalid_grant"
    #: Form-encoded answers unless the client's Accept asks for JSON (GitHub), or always.
    form_unless_json_accept: bool = False
    form_always: bool = False
    #: Access tokens are JWTs (HS256) with ``exp`` = the enforced expiry.
    jwt_access: bool = False
    access_prefix: str = "at_"
    refresh_prefix: str = "rt_"
    #: Scope string in the answer; None: echo the requested scope.
    granted_scope: str | None = None
    #: Provider-specific extra fields, from (now, issued token) -> dict.
    extra: Callable[[float, Issued], dict[str, Any]] | None = None
    #: How the API answers an unknown, expired or revoked token.
    api_reject_status: int = 401
    api_reject_body: Any = field(default_factory=lambda: {"error": "invalid_token"})
    #: The headers sent with that answer. None: RFC 6750 §3.1's ``WWW-Authenticate: Bearer
    #: error="invalid_token"`` with a 401 and nothing with another status (a generic
    #: RFC 6750 resource server); ``()``: no header at all (Salesforce).
    api_reject_headers: tuple[tuple[str, str], ...] | None = None
    api_ok_envelope: dict[str, Any] = field(default_factory=dict)


def _salesforce_extra(now: float, issued: Issued) -> dict[str, Any]:
    return {
        "issued_at": str(int(now * 1000)),  # milliseconds, as a string
        "instance_url": "https://example.my.salesforce.com",
        "id": "https://login.salesforce.com/id/00Dx0000000BV7z/005x00000012Q9P",
        "signature": base64.b64encode(secrets.token_bytes(32)).decode(),
    }


def _strava_extra(now: float, issued: Issued) -> dict[str, Any]:
    assert issued.expires_at is not None
    return {"expires_at": int(issued.expires_at), "athlete": {"id": 134815}}


def _microsoft_extra(now: float, issued: Issued) -> dict[str, Any]:
    # Azure AD v1 sends every number as a string.
    assert issued.expires_at is not None
    left = str(int(issued.expires_at - now))
    return {"ext_expires_in": left, "expires_on": str(int(issued.expires_at))}


def _intuit_extra(now: float, issued: Issued) -> dict[str, Any]:
    return {"x_refresh_token_expires_in": 8726400}


def _zoho_extra(now: float, issued: Issued) -> dict[str, Any]:
    return {"api_domain": "https://www.zohoapis.com"}


def _dropbox_extra(now: float, issued: Issued) -> dict[str, Any]:
    return {"account_id": "dbid:AAH4f99T0taONIb-OurWxbNQ6ywGRopQngc", "uid": "12345"}


#: RFC 6750 §3.1: what a resource server says about an expired, revoked or unknown token.
RFC6750_INVALID_TOKEN = 'Bearer error="invalid_token"'
#: Microsoft Graph's 401 to an expired or revoked token: a challenge that names the authority
#: and Graph's application id, without an ``error`` parameter, and the InvalidAuthenticationToken
#: body (learn.microsoft.com/graph/errors).
GRAPH_CHALLENGE = (
    'Bearer realm="", '
    'authorization_uri="https://login.microsoftonline.com/common/oauth2/authorize", '
    'client_id="00000003-0000-0000-c000-000000000000"'
)
GRAPH_INVALID_TOKEN = {
    "error": {
        "code": "InvalidAuthenticationToken",
        "message": "Access token has expired or is not yet valid.",
        "innerError": {
            "date": "2024-05-21T09:14:58",
            "request-id": "5e1b3d0a-6c9f-4b0e-9a51-2f0c7d6a8e11",
            "client-request-id": "5e1b3d0a-6c9f-4b0e-9a51-2f0c7d6a8e11",
        },
    }
}

#: Shaped on each provider's documentation (token endpoint answers and API error bodies).
PROFILES: dict[str, Profile] = {
    # RFC 6749 as written, with refresh-token rotation: the baseline.
    "rfc": Profile(name="rfc", rotation="rotate"),
    # GitHub OAuth app: tokens never expire; no expires_in, no refresh token; errors with
    # HTTP 200; form-encoded unless Accept: application/json; comma-separated scope.
    "github": Profile(
        name="github",
        lifetime=None,
        expires_in="absent",
        refresh_on_code=False,
        refresh_on_reconsent=False,
        token_type="bearer",
        error_status=200,
        bad_code_error="bad_verification_code",
        dead_refresh_error="bad_refresh_token",
        form_unless_json_accept=True,
        access_prefix="gho_",
        granted_scope="repo,gist",
        api_reject_body={
            "message": "Bad credentials",
            "documentation_url": "https://docs.github.com/rest",
            "status": "401",
        },
    ),
    # Slack with token rotation: {"ok": ...} envelope, errors with HTTP 200, 12 h tokens,
    # rotating refresh tokens; its Web API answers HTTP 200 {"ok": false} to a bad token.
    "slack": Profile(
        name="slack",
        lifetime=43200,
        rotation="rotate",
        token_type="bot",
        error_status=200,
        error_shape="slack",
        dead_refresh_error="invalid_refresh_token",
        bad_code_error="invalid_code",
        access_prefix="xoxe.xoxb-1-",
        refresh_prefix="xoxe-1-",
        extra=lambda now, issued: {
            "ok": True,
            "app_id": "A0KRD7HC3",
            "team": {"id": "T9TK3CUKW", "name": "Slack Softball Team"},
            "is_enterprise_install": False,
        },
        api_reject_status=200,
        api_reject_body={"ok": False, "error": "invalid_auth"},
        api_ok_envelope={"ok": True},
    ),
    # Salesforce: no expires_in (session timeout set per org), refresh token never rotated
    # and not sent on refresh, issued_at in ms; the API's 401 body is a list.
    "salesforce": Profile(
        name="salesforce",
        lifetime=7200,
        expires_in="absent",
        rotation="none",
        access_prefix="00Dx0000000BV7z!",
        refresh_prefix="5Aep861",
        granted_scope="refresh_token api",
        extra=_salesforce_extra,
        api_reject_body=[
            {"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}
        ],
        api_reject_headers=(),  # no WWW-Authenticate: only the status and the body say it
    ),
    # Google: 3599 s, refresh token only on the first consent (again only with prompt=consent),
    # never on refresh.
    "google": Profile(
        name="google",
        lifetime=3599,
        refresh_on_reconsent=False,
        rotation="none",
        access_prefix="ya29.",
        refresh_prefix="1//0g",
        api_reject_body={
            "error": {
                "code": 401,
                "message": "Request had invalid authentication credentials.",
                "status": "UNAUTHENTICATED",
            }
        },
    ),
    # Microsoft identity platform (v1 shape): numbers as strings, rotating refresh tokens whose
    # predecessors stay valid.
    "microsoft": Profile(
        name="microsoft",
        lifetime=3599,
        expires_in="str",
        rotation="rotate",
        access_prefix="EwB4A8l6BAAU",
        refresh_prefix="M.C5",
        extra=_microsoft_extra,
        api_reject_body=GRAPH_INVALID_TOKEN,
        api_reject_headers=(("WWW-Authenticate", GRAPH_CHALLENGE),),
    ),
    # Dropbox short-lived tokens: 4 h, no refresh token on refresh.
    "dropbox": Profile(
        name="dropbox",
        lifetime=14400,
        rotation="none",
        token_type="bearer",
        access_prefix="sl.",
        extra=_dropbox_extra,
        api_reject_body={
            "error_summary": "expired_access_token/",
            "error": {".tag": "expired_access_token"},
        },
    ),
    # Zoho: no refresh token on refresh; errors with HTTP 200 ({"error": "invalid_code"} for a
    # bad code and a dead refresh token alike).
    "zoho": Profile(
        name="zoho",
        lifetime=3600,
        rotation="none",
        error_status=200,
        dead_refresh_error="invalid_code",
        bad_code_error="invalid_code",
        access_prefix="1000.",
        refresh_prefix="1000.",
        extra=_zoho_extra,
        api_reject_body={
            "code": "INVALID_TOKEN",
            "details": {},
            "message": "invalid oauth token",
            "status": "error",
        },
    ),
    # Strava: expires_at (epoch) next to expires_in; the refresh token changes on refresh.
    "strava": Profile(
        name="strava",
        lifetime=21600,
        rotation="rotate",
        extra=_strava_extra,
        api_reject_body={
            "message": "Authorization Error",
            "errors": [{"resource": "Athlete", "field": "access_token", "code": "invalid"}],
        },
    ),
    # Intuit (QuickBooks): strict rotation, x_refresh_token_expires_in.
    "intuit": Profile(
        name="intuit",
        lifetime=3600,
        rotation="strict",
        token_type="bearer",
        refresh_prefix="AB1",
        extra=_intuit_extra,
    ),
    # Okta with refresh token rotation (a custom authorization server): JWT access tokens, one
    # hour; a rotated refresh token stays usable for the grace period (default 30 s), then
    # reuse detection revokes the family. See GRACE_DOCS.
    "okta": Profile(
        name="okta",
        lifetime=3600,
        rotation="grace",
        reuse_grace=30.0,
        jwt_access=True,
        api_reject_body={"errorCode": "invalid_token", "errorSummary": "Invalid token"},
    ),
    # Auth0 with refresh token rotation and automatic reuse detection; the reuse interval is the
    # tenant's choice (0 here: the first reuse revokes the family). See GRACE_DOCS.
    "auth0": Profile(
        name="auth0",
        lifetime=86400,
        rotation="grace",
        reuse_grace=0.0,
        jwt_access=True,
        api_reject_body={"error": "invalid_token", "error_description": "Invalid token"},
    ),
    # Xero: strict rotation, JWT access tokens with exp, 30 min.
    "xero": Profile(
        name="xero",
        lifetime=1800,
        rotation="strict",
        jwt_access=True,
        api_reject_body={
            "Type": None,
            "Title": "Unauthorized",
            "Status": 401,
            "Detail": "TokenExpired: token expired",
        },
    ),
}


#: What rotation="grace" models, and from which documentation (read 2026-12):
#:
#: * Okta, "Refresh token rotation" (developer.okta.com/docs/guides/refresh-tokens/
#:   refresh-token-rotation/): as soon as new tokens are issued the refresh token sent is
#:   invalidated; "if a previously used refresh token is used again ... Okta immediately
#:   invalidates the most recently issued refresh token and all access tokens issued since the
#:   user authenticated". The grace period exists because "new tokens issued by Okta might not
#:   reach the client app": "after the refresh token is rotated, the previous token remains valid
#:   for the configured amount of time to allow clients to get the new token". An app's
#:   refresh-token ``leeway`` (Okta SDK docs, OpenIdConnectApplicationSettingsRefreshToken)
#:   is that period in seconds, default 30 ("a
#:   leeway of 0 doesn't necessarily mean that the previous token is immediately invalidated": it
#:   is once the new token is returned). The pages read give no range (Amazon Cognito's
#:   RetryGracePeriodSeconds, the same idea, is 0-60). Okta does not say whether a reuse within
#:   the period returns the same tokens or another pair.
#: * Auth0, "Configure Refresh Token Rotation" (auth0.com/docs/secure/tokens/refresh-tokens/
#:   configure-refresh-token-rotation): within the reuse interval ("Rotation Overlap Period")
#:   "breach detection features don't apply and a new rotating refresh token is issued. Only the
#:   previous token can be reused; if the second-to-last one is exchanged, breach detection will
#:   be triggered". "Refresh Token Rotation" (auth0.com/docs/secure/tokens/refresh-tokens/
#:   refresh-token-rotation), automatic reuse detection: a previously-used refresh token
#:   "immediately invalidates the refresh token family", the most recent one included, and the
#:   next refresh with any of them is denied: the person must authenticate again.
#: * Clerk's changelog (2026-12-04, "Grace period for OAuth refresh token retries") says the same
#:   of a retry after a dropped answer: "accepts the previous refresh token once more and returns
#:   a new pair of tokens"; older refresh tokens still count as reuse and revoke access. Clerk
#:   accepts it only once; the fake, like Auth0's text, as often as the period lasts.
#:
#: Modelled: a grant's refresh tokens form a *family* with a current token and the previous one
#: (the one the latest rotation consumed). Presenting the current one rotates. Presenting the
#: previous one within ``reuse_grace`` seconds of its rotation answers 200 with another new pair
#: (``reuse_answer="new-pair"``: Auth0, Clerk; that pair's refresh token becomes the current one,
#: so the refresh token of the lost answer is superseded) or with the rotation's own answer again
#: (``reuse_answer="same"``: one reading of Okta's "to allow clients to get the new token").
#: Anything else (the previous one after the period, an older one, a superseded one) is reuse
#: detection: ``invalid_grant`` (``dead_refresh_error``) and the whole family revoked, every
#: refresh token of it and every access token issued from it. ``reuse_grace=0``: strict reuse
#: detection (the refresh token is single-use and a second use kills the grant).
GRACE_DOCS = (
    "https://developer.okta.com/docs/guides/refresh-tokens/refresh-token-rotation/",
    "https://auth0.com/docs/secure/tokens/refresh-tokens/configure-refresh-token-rotation",
    "https://auth0.com/docs/secure/tokens/refresh-tokens/refresh-token-rotation",
    "https://clerk.com/changelog/2026-12-04-oauth-refresh-token-grace-period",
)


# --- what the provider issued and saw --------------------------------------------------------


@dataclass
class Issued:
    """An access token as the provider sees it."""

    access_token: str
    client_id: str
    scope: str
    issued_at: float
    expires_at: float | None  # the provider's truth; None: never
    revoked: bool = False
    family: str | None = None  # the refresh token family it was issued from (rotation="grace")

    def valid(self, now: float) -> bool:
        return not self.revoked and (self.expires_at is None or now < self.expires_at)


@dataclass
class RefreshGrant:
    token: str
    client_id: str
    scope: str
    alive: bool = True
    uses: int = 0
    family: str | None = None  # rotation="grace": the family it belongs to


@dataclass
class Family:
    """rotation="grace": the refresh tokens descending from one authorization (Auth0's word)."""

    id: str
    current: str  # the refresh token to present next
    previous: str | None = None  # the one the latest rotation consumed
    rotated_at: float | None = None  # when ``previous`` was rotated (time.time())
    rotation_answer: dict[str, Any] | None = None  # what that rotation answered
    revoked: bool = False
    reuses: int = 0  # reuses accepted within the grace period


@dataclass
class Code:
    client_id: str
    redirect_uri: str
    scope: str
    challenge: str | None
    challenge_method: str | None
    params: dict[str, str]
    used: bool = False


@dataclass
class TokenCall:
    """One request to /token, recorded when it arrives (before any hang)."""

    grant_type: str
    form: dict[str, str]
    headers: dict[str, str]
    at: float  # time.monotonic()
    received_at: float = field(default_factory=time.time)  # wall clock, when it arrived
    status: int | None = None  # HTTP status answered; None while pending or when dropped
    outcome: str = "pending"  # issued, error:<code>, failure:<name>, dropped, lost, pending
    answer: dict[str, Any] | None = None  # the token answer's fields, when one was issued

    @property
    def refresh_token_sent(self) -> str | None:
        return self.form.get("refresh_token")


@dataclass
class ApiCall:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    token: str | None
    status: int
    at: float


@dataclass(frozen=True)
class Failure:
    """A canned token-endpoint failure: ``respond`` with a status and body, or ``close`` the
    connection without an answer (a network error at the client)."""

    name: str
    action: str = "respond"
    status: int = 503
    body: bytes = b""
    content_type: str = "text/html"
    headers: tuple[tuple[str, str], ...] = ()


def oauth_error(
    code: str,
    *,
    status: int = 400,
    description: str = "",
    shape: str = "rfc",
    headers: tuple[tuple[str, str], ...] = (),
) -> Failure:
    """An RFC 6749 §5.2 error answer (or Slack's ``{"ok": false}``) with the given HTTP status."""
    if shape == "slack":
        payload: dict[str, Any] = {"ok": False, "error": code}
    else:
        payload = {"error": code}
        if description:
            payload["error_description"] = description
    return Failure(
        name=f"{code}@{status}",
        status=status,
        body=json.dumps(payload).encode(),
        content_type="application/json",
        headers=headers,
    )


#: Named failure shapes of the token endpoint.
FAILURES: dict[str, Failure] = {
    "503-html": Failure(
        "503-html", status=503, body=b"<html><body><h1>503 Service Unavailable</h1></body></html>"
    ),
    "500-json": Failure(
        "500-json", status=500, body=b'{"error": "server_error"}', content_type="application/json"
    ),
    "502": Failure("502", status=502, body=b"Bad Gateway", content_type="text/plain"),
    "429": Failure(
        "429",
        status=429,
        body=b'{"error": "rate_limited"}',
        content_type="application/json",
        headers=(("Retry-After", "120"),),
    ),
    "close": Failure("close", action="close"),
    "html-200": Failure(
        "html-200", status=200, body=b"<!doctype html><html><body>Sign in</body></html>"
    ),
    "truncated-json": Failure(
        "truncated-json",
        status=200,
        body=b'{"access_token": "abc", "token_ty',
        content_type="application/json",
    ),
    "empty-200": Failure("empty-200", status=200, body=b"", content_type="application/json"),
    "bare-401": Failure(
        "bare-401",
        status=401,
        body=b"Unauthorized",
        content_type="text/plain",
        headers=(("WWW-Authenticate", 'Basic realm="token"'),),
    ),
}

#: Microsoft Entra ID's words for "a person must do multi-factor authentication" (AADSTS50076)
#: and "must register for it" (AADSTS50079), answered to a refresh grant.
ENTRA_MFA_MESSAGES = {
    50076: "Due to a configuration change made by your administrator, or because you moved to "
    "a new location, you must use multi-factor authentication to access "
    "'00000003-0000-0000-c000-000000000000'.",
    50079: "Due to a configuration change made by your administrator, or because you moved to "
    "a new location, you must enroll in multi-factor authentication to access "
    "'00000003-0000-0000-c000-000000000000'.",
}


def entra_interaction_required(code: int = 50076) -> Failure:
    """Entra's answer to a refresh grant when Conditional Access wants MFA again: HTTP 400
    with the identity platform's documented error shape (learn.microsoft.com/entra/
    identity-platform/reference-error-codes): ``interaction_required``, an ``AADSTS``
    description with trace and correlation ids, ``error_codes``, ``suberror`` and the claims
    challenge to pass to the next authorization request."""
    trace, correlation = (
        "0d2b5c8e-1f4a-4c7e-9b1a-3e2f6d7c8b00",
        "a6f0c2d4-7b3e-4f19-8d5a-9c1e2b3f4a55",
    )
    stamp = "2024-05-21 09:14:58Z"
    payload = {
        "error": "interaction_required",
        "error_description": f"AADSTS{code}: {ENTRA_MFA_MESSAGES[code]} Trace ID: {trace} "
        f"Correlation ID: {correlation} Timestamp: {stamp}",
        "error_codes": [code],
        "timestamp": stamp,
        "trace_id": trace,
        "correlation_id": correlation,
        "error_uri": f"https://login.microsoftonline.com/error?code={code}",
        "suberror": "basic_action",
        "claims": '{"access_token":{"capolids":{"essential":true,"values":['
        '"b3f4a55c-1e2b-4c9d-8a7f-6e5d4c3b2a10"]}}}',
    }
    return Failure(
        name=f"entra-AADSTS{code}",
        status=400,
        body=json.dumps(payload).encode(),
        content_type="application/json; charset=utf-8",
    )


# --- the provider ----------------------------------------------------------------------------


def make_jwt(claims: dict[str, Any], key: bytes = b"fake-provider-signing-key") -> str:
    """An HS256 JWT (a real signature; our code must not need to check it)."""

    def segment(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")

    header = segment(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    payload = segment(json.dumps(claims, separators=(",", ":")).encode())
    signature = hmac.new(key, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{segment(signature)}"


def _s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


@dataclass
class _Reply:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)
    close: bool = False  # drop the connection without answering


class FakeProvider:
    """Authorization server + resource API. Thread-safe; every mutable field under ``_lock``."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.clients: dict[str, str] = {CLIENT_ID: SECRET}
        self.issued: dict[str, Issued] = {}
        self.refresh_grants: dict[str, RefreshGrant] = {}
        self.families: dict[str, Family] = {}
        self.codes: dict[str, Code] = {}
        self.consents: dict[str, int] = {}  # client id -> completed code exchanges
        self.token_calls: list[TokenCall] = []
        self.api_calls: list[ApiCall] = []
        self.authorize_requests: list[dict[str, str]] = []
        self._failure: Failure | None = None
        self._failure_times: int | None = None
        self._hang_times = 0
        self._hang_after_issue = False
        self._gates: list[threading.Event] = []
        self._hanging = 0
        self._api_override: tuple[int, Any, tuple[tuple[str, str], ...] | None] | None = None
        self._end_sessions = 0  # refreshed sessions ended at once (Salesforce's policy)
        self._refresh_failure: Failure | None = None  # refresh grants only (Entra's MFA)
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.provider = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    # --- lifecycle -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeProvider:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    # --- runtime switches ------------------------------------------------------------------

    def fail(self, failure: Failure | str, *, times: int | None = None) -> None:
        """Answer token requests with ``failure`` (a :class:`Failure` or a :data:`FAILURES`
        name): the next ``times`` requests, or every one until :meth:`recover`."""
        with self._lock:
            self._failure = FAILURES[failure] if isinstance(failure, str) else failure
            self._failure_times = times

    def recover(self) -> None:
        """The token endpoint works again."""
        with self._lock:
            self._failure = None
            self._failure_times = None

    def hang(self, *, times: int = 1, after_issue: bool = False) -> None:
        """Hold the next ``times`` token requests until :meth:`release`. With ``after_issue``
        the request is processed first (a refresh token rotated, a code used) and only the
        answer is held back: if the client has gone meanwhile, the answer is lost."""
        with self._lock:
            self._hang_times = times
            self._hang_after_issue = after_issue

    def release(self) -> None:
        """Let every held request go on."""
        with self._lock:
            gates, self._gates = self._gates, []
            self._hang_times = 0
        for gate in gates:
            gate.set()

    @property
    def hanging(self) -> int:
        """How many token requests are being held right now."""
        with self._lock:
            return self._hanging

    def api_always(
        self, status: int, body: Any, *, headers: tuple[tuple[str, str], ...] | None = None
    ) -> None:
        """The API answers every call with ``status`` (a wrong base path, a missing scope) and
        ``headers`` (None: the profile's :attr:`Profile.api_reject_headers`)."""
        if headers is None:
            headers = self.profile.api_reject_headers
        with self._lock:
            self._api_override = (status, body, headers)

    def end_sessions_after_refresh(self, times: int = 1) -> None:
        """Salesforce's session policy (or an administrator) ends a session right after it was
        issued: the access tokens of the next ``times`` refresh grants are issued, then revoked
        at once, so the API's first answer to them is the rejection."""
        with self._lock:
            self._end_sessions = times

    def require_interaction(self, failure: Failure | None = None) -> None:
        """Conditional Access wants the person again (Entra: MFA): refresh grants answer
        ``failure`` (default :func:`entra_interaction_required`) until the person signs in, i.e.
        until an authorization code is exchanged."""
        with self._lock:
            self._refresh_failure = failure or entra_interaction_required()

    def expire_access_tokens(self) -> None:
        """Every access token issued so far expires now, as the provider sees it."""
        now = time.time()
        with self._lock:
            for issued in self.issued.values():
                issued.expires_at = now - 1

    def revoke_access_tokens(self) -> None:
        """The resource owner revoked the app: every access token is rejected from now on."""
        with self._lock:
            for issued in self.issued.values():
                issued.revoked = True

    def revoke_refresh_tokens(self) -> None:
        """Every refresh token issued so far is dead (revoked at the provider, or expired)."""
        with self._lock:
            for grant in self.refresh_grants.values():
                grant.alive = False

    # --- views for assertions --------------------------------------------------------------

    def calls(self, grant_type: str | None = None) -> list[TokenCall]:
        with self._lock:
            return [c for c in self.token_calls if grant_type in (None, c.grant_type)]

    def refresh_calls(self) -> list[TokenCall]:
        return self.calls("refresh_token")

    def api(self) -> list[ApiCall]:
        with self._lock:
            return list(self.api_calls)

    def live_refresh_tokens(self) -> list[str]:
        with self._lock:
            return [g.token for g in self.refresh_grants.values() if g.alive]

    def family_of(self, refresh_token: str | None) -> Family | None:
        """rotation="grace": the family ``refresh_token`` belongs to."""
        with self._lock:
            grant = self.refresh_grants.get(refresh_token or "")
            return self.families.get(grant.family or "") if grant else None

    def is_live_refresh_token(self, value: str | None) -> bool:
        with self._lock:
            grant = self.refresh_grants.get(value or "")
            return bool(grant and grant.alive)

    def accepts(self, access_token: str | None) -> bool:
        """Whether the API would accept ``access_token`` now."""
        with self._lock:
            issued = self.issued.get(access_token or "")
            return bool(issued and issued.valid(time.time()))

    def issued_token(self, access_token: str | None) -> Issued | None:
        with self._lock:
            return self.issued.get(access_token or "")

    # --- request handling (called from handler threads) ------------------------------------

    def handle(self, handler: _Handler, method: str) -> None:
        parts = urlsplit(handler.path)
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length > 0 else b""
        headers = {k: v for k, v in handler.headers.items()}
        path = parts.path
        if path == "/authorize" and method == "GET":
            reply = self._authorize(_flat(parts.query))
        elif path == "/token" and method == "POST":
            self._token(handler, headers, body)
            return
        elif path.startswith("/api/"):
            reply = self._api(method, path[len("/api/") :], parts.query, headers, body)
        else:
            reply = _Reply(404, b'{"error": "not_found"}')
        _write(handler, reply)

    def _authorize(self, query: dict[str, str]) -> _Reply:
        with self._lock:
            self.authorize_requests.append(dict(query))
            client_id = query.get("client_id", "")
            redirect_uri = query.get("redirect_uri", "")
            if client_id not in self.clients or not redirect_uri:
                return _Reply(400, b"<html>unknown client or redirect_uri</html>", "text/html")
            if query.get("response_type") != "code":
                return _redirect(
                    redirect_uri,
                    {"error": "unsupported_response_type", "state": query.get("state", "")},
                )
            code = secrets.token_urlsafe(24)
            self.codes[code] = Code(
                client_id=client_id,
                redirect_uri=redirect_uri,
                scope=query.get("scope", ""),
                challenge=query.get("code_challenge"),
                challenge_method=query.get("code_challenge_method"),
                params=dict(query),
            )
        params = {"code": code}
        if "state" in query:
            params["state"] = query["state"]
        return _redirect(redirect_uri, params)

    def _token(self, handler: _Handler, headers: dict[str, str], body: bytes) -> None:
        form = _flat(body.decode("utf-8", "replace"))
        call = TokenCall(
            grant_type=form.get("grant_type", ""), form=form, headers=headers, at=time.monotonic()
        )
        gate: threading.Event | None = None
        with self._lock:
            self.token_calls.append(call)
            failure = self._failure
            if failure is not None and self._failure_times is not None:
                self._failure_times -= 1
                if self._failure_times <= 0:
                    self._failure, self._failure_times = None, None
            if failure is None and call.grant_type == "refresh_token":
                failure = self._refresh_failure
            if self._hang_times > 0:
                self._hang_times -= 1
                gate = threading.Event()
                self._gates.append(gate)
            hang_after_issue = self._hang_after_issue
        if gate is not None and not hang_after_issue:
            self._hold(gate)
        if failure is not None:
            reply = _Reply(
                failure.status,
                failure.body,
                failure.content_type,
                list(failure.headers),
                close=failure.action == "close",
            )
            call.outcome = f"failure:{failure.name}"
        else:
            reply = self._grant(call, headers, form)
        if gate is not None and hang_after_issue:
            self._hold(gate)
        call.status = None if reply.close else reply.status
        if not _write(handler, reply):
            call.outcome = f"lost ({call.outcome})"
        elif reply.close:
            call.outcome = "dropped"

    def _hold(self, gate: threading.Event) -> None:
        with self._lock:
            self._hanging += 1
        try:
            gate.wait(HANG_MAX)
        finally:
            with self._lock:
                self._hanging -= 1

    def _grant(self, call: TokenCall, headers: dict[str, str], form: dict[str, str]) -> _Reply:
        profile = self.profile
        client_id = self._authenticate_client(headers, form)
        if client_id is None:
            call.outcome = "error:invalid_client"
            if profile.error_status == 400:  # RFC 6749 §5.2: 401 for failed client auth
                return _Reply(
                    401,
                    json.dumps({"error": "invalid_client"}).encode(),
                    headers=[("WWW-Authenticate", 'Basic realm="token"')],
                )
            return self._error(call, headers, "invalid_client")
        grant_type = form.get("grant_type", "")
        now = time.time()
        with self._lock:
            if grant_type == "authorization_code":
                code = self.codes.get(form.get("code", ""))
                if (
                    code is None
                    or code.used
                    or code.client_id != client_id
                    or code.redirect_uri != form.get("redirect_uri")
                    or not _pkce_ok(code, form.get("code_verifier"))
                ):
                    return self._error(call, headers, profile.bad_code_error, "bad code")
                code.used = True
                self._refresh_failure = None  # the person signed in (and did MFA) again
                consents = self.consents.get(client_id, 0)
                self.consents[client_id] = consents + 1
                with_refresh = (
                    profile.refresh_on_code
                    if consents == 0
                    else (
                        profile.refresh_on_reconsent
                        or (code.params.get("prompt") == "consent" and profile.refresh_on_code)
                    )
                )
                refresh = self._issue_refresh(client_id, code.scope) if with_refresh else None
                family = self.refresh_grants[refresh].family if refresh else None
                issued = self._issue_access(client_id, code.scope, now, family=family)
            elif grant_type == "refresh_token":
                grant = self.refresh_grants.get(form.get("refresh_token", ""))
                if profile.rotation == "grace" and grant is not None and grant.family:
                    return self._grace_refresh(call, headers, grant, client_id, now)
                if grant is None or not grant.alive or grant.client_id != client_id:
                    return self._error(
                        call, headers, profile.dead_refresh_error, "refresh token is not valid"
                    )
                grant.uses += 1
                issued = self._issue_access(client_id, grant.scope, now)
                if self._end_sessions > 0:
                    self._end_sessions -= 1
                    issued.revoked = True  # issued, and ended by the session policy at once
                refresh = None
                if profile.rotation == "same":
                    refresh = grant.token
                elif profile.rotation in ("rotate", "strict", "grace"):
                    refresh = self._issue_refresh(client_id, grant.scope)
                    if profile.rotation == "strict":
                        grant.alive = False
            elif grant_type == "client_credentials":
                issued = self._issue_access(client_id, form.get("scope", ""), now)
                refresh = None
            else:
                return self._error(call, headers, "unsupported_grant_type")
        answer = self._answer(issued, refresh, now)
        call.outcome = "issued"
        call.answer = answer
        return self._encode(headers, answer, 200)

    def _grace_refresh(
        self,
        call: TokenCall,
        headers: dict[str, str],
        grant: RefreshGrant,
        client_id: str,
        now: float,
    ) -> _Reply:
        """A refresh grant under rotation="grace" (see :data:`GRACE_DOCS`); under ``_lock``."""
        profile = self.profile
        family = self.families[grant.family or ""]
        if family.revoked or grant.client_id != client_id:
            return self._error(call, headers, profile.dead_refresh_error, "refresh token revoked")
        grant.uses += 1
        if grant.token == family.current:
            issued = self._issue_access(client_id, grant.scope, now, family=family.id)
            refresh = self._issue_refresh(client_id, grant.scope, family=family.id)
            grant.alive = False
            family.previous, family.rotated_at, family.current = grant.token, now, refresh
            answer = self._answer(issued, refresh, now)
            family.rotation_answer = answer
        elif (
            grant.token == family.previous
            and family.rotated_at is not None
            and now - family.rotated_at <= profile.reuse_grace
        ):
            family.reuses += 1
            if profile.reuse_answer == "same" and family.rotation_answer is not None:
                answer = dict(family.rotation_answer)
            else:
                issued = self._issue_access(client_id, grant.scope, now, family=family.id)
                refresh = self._issue_refresh(client_id, grant.scope, family=family.id)
                self.refresh_grants[family.current].alive = False  # superseded
                family.current = refresh
                answer = self._answer(issued, refresh, now)
        else:  # reuse detection: the whole family dies
            family.revoked = True
            for other in self.refresh_grants.values():
                if other.family == family.id:
                    other.alive = False
            for issued in self.issued.values():
                if issued.family == family.id:
                    issued.revoked = True
            return self._error(
                call, headers, profile.dead_refresh_error, "refresh token reuse detected"
            )
        call.outcome = "issued"
        call.answer = answer
        return self._encode(headers, answer, 200)

    def _authenticate_client(self, headers: dict[str, str], form: dict[str, str]) -> str | None:
        auth = headers.get("Authorization", "")
        if auth[:6].lower() == "basic ":
            try:
                raw = base64.b64decode(auth[6:]).decode()
            except ValueError:
                return None
            client_id, _, secret = raw.partition(":")
            client_id, secret = (
                unquote(client_id.replace("+", " ")),
                unquote(secret.replace("+", " ")),
            )
        else:
            client_id, secret = form.get("client_id", ""), form.get("client_secret", "")
        expected = self.clients.get(client_id)
        if expected is None or not hmac.compare_digest(expected.encode(), secret.encode()):
            return None
        return client_id

    def _issue_access(
        self, client_id: str, scope: str, now: float, *, family: str | None = None
    ) -> Issued:
        lifetime = self.profile.lifetime
        expires_at = None if lifetime is None else now + lifetime
        if self.profile.jwt_access:
            claims: dict[str, Any] = {
                "iss": self.url,
                "sub": "resource-owner",
                "client_id": client_id,
                "scope": scope,
                "iat": int(now),
                "jti": secrets.token_hex(8),
            }
            if expires_at is not None:
                claims["exp"] = int(expires_at)
            value = make_jwt(claims)
        else:
            value = self.profile.access_prefix + secrets.token_urlsafe(24)
        issued = Issued(value, client_id, scope, now, expires_at, family=family)
        self.issued[value] = issued
        return issued

    def _issue_refresh(self, client_id: str, scope: str, *, family: str | None = None) -> str:
        """A new refresh token; under rotation="grace" in ``family``, or a new family (a code
        exchange)."""
        value = self.profile.refresh_prefix + secrets.token_urlsafe(32)
        if self.profile.rotation == "grace" and family is None:
            family = secrets.token_hex(8)
            self.families[family] = Family(family, current=value)
        self.refresh_grants[value] = RefreshGrant(value, client_id, scope, family=family)
        return value

    def _answer(self, issued: Issued, refresh: str | None, now: float) -> dict[str, Any]:
        profile = self.profile
        answer: dict[str, Any] = {
            "access_token": issued.access_token,
            "token_type": profile.token_type,
        }
        lifetime = None if issued.expires_at is None else round(issued.expires_at - now)
        shape = profile.expires_in
        if shape == "int":
            if lifetime is not None:
                answer["expires_in"] = lifetime
        elif shape == "str":
            if lifetime is not None:
                answer["expires_in"] = str(lifetime)
        elif shape == "float-str":
            if lifetime is not None:
                answer["expires_in"] = f"{lifetime}.0"
        elif shape != "absent":
            answer["expires_in"] = shape  # a literal odd value: 0, -5, 10**12, "soon", None
        if refresh is not None:
            answer["refresh_token"] = refresh
        scope = profile.granted_scope if profile.granted_scope is not None else issued.scope
        if scope:
            answer["scope"] = scope
        if profile.extra is not None:
            answer.update(profile.extra(now, issued))
        return answer

    def _error(
        self, call: TokenCall, headers: dict[str, str], code: str, description: str = ""
    ) -> _Reply:
        call.outcome = f"error:{code}"
        if self.profile.error_shape == "slack":
            payload: dict[str, Any] = {"ok": False, "error": code}
        else:
            payload = {"error": code}
            if description:
                payload["error_description"] = description
        return self._encode(headers, payload, self.profile.error_status)

    def _encode(self, headers: dict[str, str], payload: dict[str, Any], status: int) -> _Reply:
        profile = self.profile
        wants_json = "json" in headers.get("Accept", "").lower()
        if profile.form_always or (profile.form_unless_json_accept and not wants_json):
            flat = {k: v for k, v in payload.items() if not isinstance(v, dict | list)}
            return _Reply(
                status,
                urlencode({k: str(v) for k, v in flat.items()}).encode(),
                "application/x-www-form-urlencoded; charset=utf-8",
            )
        return _Reply(status, json.dumps(payload).encode(), "application/json; charset=utf-8")

    def _api(
        self, method: str, path: str, query: str, headers: dict[str, str], body: bytes
    ) -> _Reply:
        auth = headers.get("Authorization", "")
        scheme, _, value = auth.partition(" ")
        params = _flat(query)
        token = (
            value.strip() if scheme.lower() in ("bearer", "token") else params.get("access_token")
        )
        now = time.time()
        profile = self.profile
        with self._lock:
            issued = self.issued.get(token or "")
            override = self._api_override
            extra: tuple[tuple[str, str], ...] | None = None
            if override is not None:
                status, payload, extra = override
            elif issued is None or not issued.valid(now):
                status, payload = profile.api_reject_status, profile.api_reject_body
                extra = profile.api_reject_headers
            else:
                status = 200
                payload = {
                    **profile.api_ok_envelope,
                    "method": method,
                    "path": path,
                    "query": {k: v for k, v in params.items() if k != "access_token"},
                    "client_id": issued.client_id,
                    "scope": issued.scope,
                }
            self.api_calls.append(
                ApiCall(method, path, params, headers, body, token, status, time.monotonic())
            )
        if extra is None:
            extra = (("WWW-Authenticate", RFC6750_INVALID_TOKEN),) if status == 401 else ()
        return _Reply(status, json.dumps(payload).encode(), headers=list(extra))


class _Server(ThreadingHTTPServer):
    """A listen backlog for many callers at once (socketserver's default is 5: under a storm of
    proxied calls the kernel would drop connections and the client retry them a second later,
    which is the fake's slowness, not the proxy's)."""

    request_queue_size = 256


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.0: one request per connection, so a provider switched down or stopped never
    leaves a half-used keep-alive connection in a client's pool."""

    server: ThreadingHTTPServer

    def _dispatch(self, method: str) -> None:
        self.server.provider.handle(self, method)  # type: ignore[attr-defined]

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: pytest shows failures, not access logs


def _write(handler: _Handler, reply: _Reply) -> bool:
    """Send ``reply``; False when the client is gone (the answer is lost)."""
    handler.close_connection = True
    if reply.close:
        return True  # the server closes the socket without a word
    try:
        handler.send_response(reply.status)
        handler.send_header("Content-Type", reply.content_type)
        handler.send_header("Content-Length", str(len(reply.body)))
        handler.send_header("Cache-Control", "no-store")
        for name, value in reply.headers:
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(reply.body)
        handler.wfile.flush()
    except OSError:
        return False
    return True


def _redirect(uri: str, params: dict[str, str]) -> _Reply:
    separator = "&" if urlsplit(uri).query else "?"
    return _Reply(302, b"", "text/plain", [("Location", uri + separator + urlencode(params))])


def _pkce_ok(code: Code, verifier: str | None) -> bool:
    if not code.challenge:
        return True
    if not verifier:
        return False
    if (code.challenge_method or "plain") == "S256":
        return hmac.compare_digest(_s256(verifier), code.challenge)
    return hmac.compare_digest(verifier, code.challenge)


def _flat(query: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(query, keep_blank_values=True).items()}


# --- the fixture -----------------------------------------------------------------------------


@pytest.fixture
def fake_provider() -> Iterator[Callable[..., FakeProvider]]:
    """Start fake providers: ``fake_provider("google")`` or ``fake_provider(Profile(...))``,
    with keyword overrides of the profile's fields. All are stopped (and any held request
    released) when the test ends."""
    started: list[FakeProvider] = []

    def start(profile: Profile | str = "rfc", **overrides: Any) -> FakeProvider:
        base = PROFILES[profile] if isinstance(profile, str) else profile
        provider = FakeProvider(replace(base, **overrides) if overrides else base).start()
        started.append(provider)
        return provider

    yield start
    for provider in started:
        provider.stop()


# --- the builder's journey -------------------------------------------------------------------


def provider_datasource(provider: FakeProvider, **fields: Any):
    """A datasource configured for ``provider`` the way a builder fills the admin form."""
    defaults: dict[str, Any] = dict(
        base_url=f"{provider.url}/api/",
        authorization_url=f"{provider.url}/authorize",
        access_token_url=f"{provider.url}/token",
        client_id=CLIENT_ID,
        client_secret=SECRET,
        scopes="read write",
    )
    defaults.update(fields)
    return make_datasource(**defaults)


_browser = threading.local()


def browser() -> requests.Session:
    """A plain HTTP client playing the resource owner's browser at the provider."""
    session = getattr(_browser, "session", None)
    if session is None:
        session = requests.Session()
        session.trust_env = False
        _browser.session = session
    return session


def authorize_through_admin(staff_client, datasource):
    """Click Authorize in the admin, consent at the provider, land on the callback. Returns the
    callback's response (302 back to the admin on success)."""
    start = staff_client.get(f"/admin/datasources/datasource/{datasource.pk}/authorize/")
    assert start.status_code == 302, start.content[:500]
    at_provider = browser().get(start["Location"], allow_redirects=False, timeout=10)
    assert at_provider.status_code == 302, at_provider.text[:500]
    location = urlsplit(at_provider.headers["Location"])
    assert location.path == CALLBACK_PATH, at_provider.headers["Location"]
    return staff_client.get(CALLBACK_PATH, _flat(location.query))


def connect(provider: FakeProvider, staff_client, **fields: Any):
    """Create and authorize a datasource at ``provider``; returns it."""
    datasource = provider_datasource(provider, **fields)
    response = authorize_through_admin(staff_client, datasource)
    assert response.status_code == 302, response.content[:1000]
    return datasource


def api_key_client(datasource=None):
    """A Django test client that calls the proxy with a fresh API key."""
    from django.test import Client

    from datasources.proxy.apikeys import create_api_key

    _, key = create_api_key("quirks-app", datasources=[datasource] if datasource else None)
    return Client(HTTP_AUTHORIZATION=f"Api-Key {key}")


def proxy_url(datasource, path: str = "me") -> str:
    return f"/api/v1/datasources/{datasource.slug}/proxy/{quote(path, safe='/?=&')}"


def body_json(response) -> Any:
    raw = body_of(response)
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")


def assert_token_unavailable(response) -> None:
    """The proxy's answer while no token can be had from a provider that is down: 503
    ``token_unavailable`` with a ``Retry-After`` of at least a second."""
    assert response.status_code == 503, body_json(response)
    assert body_json(response)["error"] == "token_unavailable"
    retry_after = response.get("Retry-After")
    assert retry_after is not None and retry_after.isdigit() and int(retry_after) >= 1


def wait_until(
    predicate: Callable[[], T], timeout: float, *, interval: float = 0.02, what: str = ""
) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)
