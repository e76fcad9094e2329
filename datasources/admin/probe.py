"""The admin's **Test** button: one call to the upstream API, sent the way the proxy sends it
(the proxy's target resolution, transport and steps: same URL rule, headers, token placement,
pool, timeouts, refresh-once on an "expired" answer, a failure worded from the proxy's own
answer, :mod:`datasources.calls.call`), reported with its status, latency and the first
bytes of the answer, with every secret of the datasource redacted."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from django.views.decorators.debug import sensitive_variables

from .. import tokens
from ..calls import binding, health, target, transport
from ..calls import call as steps
from ..calls import challenge as challenges
from ..calls.attempts import URLLIB3
from ..calls.call import Refused
from ..exceptions import (
    DatasourceError,
    NotAuthorized,
    ReauthorizationRequired,
    TransientUpstreamError,
)
from ..models import Datasource
from .explain import explain

#: How much of the answer is shown.
PREVIEW_BYTES = 2048
#: Methods offered (no request body is sent); those the datasource allows.
METHODS = ("GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE")
REDACTED = "[redacted]"


@dataclass
class ProbeResult:
    method: str
    path: str
    status: int | None = None
    reason: str = ""
    latency_ms: float | None = None
    content_type: str = ""
    preview: str = ""
    truncated: bool = False
    error: str = ""
    explanation: str = ""
    refreshed: bool = False
    retries: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status is not None and self.status < 400


def methods_for(datasource: Datasource) -> list[str]:
    allowed = datasource.allowed_method_set
    return [method for method in METHODS if method in allowed]


@sensitive_variables()
def run(datasource: Datasource, method: str, path: str, *, user=None) -> ProbeResult:
    """Send ``method path`` (path relative to base_url, may carry a query) upstream."""
    method = method.upper()
    path, _, query = path.strip().lstrip("/").partition("?")
    result = ProbeResult(method, path + (f"?{query}" if query else ""))
    if method not in methods_for(datasource):
        result.error = f"{method} is not among this datasource's allowed methods."
        return result
    try:
        url = target.resolve(datasource.base_url, path)
    except target.InvalidPath as err:
        result.error = f"The proxy would refuse this path: {err.reason}."
        return result
    secrets_seen = [datasource.client_secret]
    try:
        token = tokens.get_valid_token(datasource, user=user)
    except (NotAuthorized, ReauthorizationRequired, TransientUpstreamError) as err:
        result.error = f"No access token to call with: {err}"
        result.explanation = explain(str(err)) or (
            "Authorize the datasource first." if isinstance(err, NotAuthorized) else ""
        )
        return result
    secrets_seen += [token.access_token, token.refresh_token]
    started = time.perf_counter()
    try:
        attempts = steps.attempts_for(
            datasource,
            token,
            URLLIB3,
            method=method,
            on_token=lambda fresh: secrets_seen.extend([fresh.access_token, fresh.refresh_token]),
            observe=health.observe,  # not gated: the Test may be the call that shows recovery
        )
        upstream = attempts.run(lambda token: _send(datasource, method, url, query, token))
        result.refreshed, result.retries = attempts.refreshed, attempts.retries
        try:
            body = upstream.read(PREVIEW_BYTES + 1, decode_content=True) or b""
        finally:
            upstream.close()
    except (NotAuthorized, ReauthorizationRequired, TransientUpstreamError) as err:
        # The API said "expired" and the refresh that followed failed (Entra's MFA, a revoked
        # grant, a provider down): the same report as when no token could be had at the start.
        result.error = _no_new_token(err)
        result.explanation = explain(str(err))
        return result
    except Exception as err:
        refused = steps.upstream_refusal(err)  # what the proxy would answer, as a sentence
        if refused is None:
            raise
        result.error = _reported(refused)
        return result
    result.latency_ms = (time.perf_counter() - started) * 1000
    result.status = upstream.status
    result.reason = upstream.reason or ""
    result.content_type = upstream.headers.get("Content-Type", "")
    result.truncated = len(body) > PREVIEW_BYTES
    result.preview = redact(body[:PREVIEW_BYTES].decode("utf-8", "replace"), secrets_seen)
    if upstream.status in (401, 403):
        result.notes.extend(_refusal_notes(datasource, upstream.headers, secrets_seen))
    return result


def _no_new_token(err: DatasourceError) -> str:
    """The Test's sentence when the API rejected the token and renewing it failed. A temporary
    failure (the proxy answers it 503 token_unavailable) says so, and when to try again, so
    that nobody re-authorizes a datasource because its authorization server was down."""
    if not isinstance(err, TransientUpstreamError):
        return f"The API rejected the token and no new one could be had: {err}"
    wait = f"in {max(1, round(err.retry_after))} s" if err.retry_after else "shortly"
    return (
        "The API rejected the token and the authorization server could not renew it just now "
        f"(a temporary failure, not a reason to re-authorize); try again {wait}. ({err})"
    )


def _refusal_notes(
    datasource: Datasource, headers: Mapping[str, str], secrets_seen: list[str | None]
) -> list[str]:
    """What to check when the API refused the token (401, 403): scopes, audience, DPoP."""
    challenge = headers.get("WWW-Authenticate", "")
    error, scope = challenges.token_challenge(challenge) if challenge else (None, "")
    if error == "insufficient_scope":
        # RFC 6750 §3.1: the token is fine but lacks a scope; a refresh keeps the granted ones.
        needed = redact(scope[:200], secrets_seen)
        notes = [
            "The API says the token lacks a scope"
            + (f": it asks for {needed}" if needed else "")
            + ". Add it under “Scope(s)”, save, then Re-authorize (a refresh keeps the "
            "scopes that were granted)."
        ]
    else:
        notes = [
            "The API refused the token: check the scopes (and that the token is meant for this "
            "API: audience/resource), then Re-authorize."
        ]
    if datasource.use_dpop and challenge.lower().startswith("dpop"):
        notes.append(
            "The API answered with a DPoP challenge ("
            + redact(challenge[:300], secrets_seen)
            + "), after a fresh proof too: a token bound to an earlier DPoP key is refused "
            "(Regenerate DPoP key replaces the tokens; Refresh now gets a new one), and "
            "the server must accept ES256 proofs."
        )
    return notes


def _reported(refused: Refused) -> str:
    """The proxy's answer to a failed call, told to the builder with the status it would get
    (the detail is the proxy's own, so the Test and the proxy say the same thing)."""
    if refused.error == "dpop_key_unusable":
        return refused.detail  # nothing was sent, whatever the status
    text = refused.detail.removesuffix(".")
    if refused.error == "upstream_unreachable" and text.endswith(")"):
        return f"{text[:-1]}; the proxy would answer {refused.status})."
    return f"{text} (the proxy would answer {refused.status})."


@sensitive_variables()
def _send(datasource: Datasource, method: str, url: str, query: str, token):
    def headers_for(token) -> dict[str, str]:
        return transport.request_headers(
            datasource,
            {"Accept": "application/json, */*;q=0.5", "User-Agent": "datasources-admin-test"},
            binding.auth_headers(datasource, token, method, url),
            0,
        )

    return transport.send_for_token(method, datasource, url, query, token, headers_for, None, True)


@sensitive_variables()
def redact(text: str, secrets: list[str | None]) -> str:
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, REDACTED)
    return text
