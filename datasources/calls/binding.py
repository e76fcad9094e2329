"""How an access token is presented to the upstream API, in one place for the proxy, the Python
client and the admin's Test: the header that carries it and, for a DPoP-bound token, the proof
that goes with it (RFC 9449 §7), and what an answer means for the proof.

A datasource with DPoP on asks for DPoP-bound tokens. A token the server returned as
``token_type: DPoP`` is sent as ``Authorization: DPoP <token>`` with a fresh proof (``ath`` =
hash of the token; the server's latest nonce). A server that ignores DPoP answers
``token_type: Bearer``: that token is not bound, and is sent as a bearer token (with the
datasource's header prefix) and without a proof, as it would be with DPoP off; the admin shows
the stored token type.

A resource server that refuses the proof rather than the token (``use_dpop_nonce`` with a new
nonce, or ``invalid_dpop_proof``, e.g. a proof it saw already) gets the call once more with a
fresh proof; that answer is never taken for an expired token (no refresh is started for it).
A DPoP challenge with ``invalid_token`` may mean either (oidc-provider answers a replayed proof
so): the call is sent once more with a fresh proof, and only if that is refused too do the
token rules apply (refresh once, retry once).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.views.decorators.debug import sensitive_variables

from ..security import dpop
from . import challenge, target

if TYPE_CHECKING:
    from ..models import Datasource, Token


def dpop_bound(datasource: Datasource, token: Token) -> bool:
    """Whether ``token`` goes with DPoP proofs: DPoP on, and the server issued a DPoP token."""
    return (
        datasource.use_dpop
        and bool(datasource.dpop_private_key)
        and (token.token_type or "").lower() == "dpop"
    )


@sensitive_variables()
def auth_headers(datasource: Datasource, token: Token, method: str, url: str) -> dict[str, str]:
    """The headers carrying ``token`` for ``method url`` ({} when it goes in the query).
    ``url`` is the upstream URL; its query, if any, is not part of the proof."""
    if dpop_bound(datasource, token):
        access_token = token.access_token or ""
        return {
            "Authorization": f"DPoP {access_token}",
            "DPoP": dpop.proof(
                datasource.dpop_private_key,
                method,
                url,
                access_token=access_token,
                nonce=dpop.nonce_for(url),
            ),
        }
    placed = target.token_header(datasource, token.access_token or "")
    return {} if placed is None else {placed[0]: placed[1]}


def proof_refused(
    datasource: Datasource, token: Token, url: str, status: int, headers: dpop.Headers
) -> bool:
    """After an upstream answer to a DPoP call: keep any nonce it carries; True when the
    server refused the proof (not the token) and the call should be sent once more with a
    fresh proof."""
    if not dpop_bound(datasource, token):
        return False
    dpop.remember_nonce(url, headers.get("DPoP-Nonce"))
    return dpop.resource_refusal(status, headers) is not dpop.Refusal.NONE


def token_rejected(
    datasource: Datasource, status: int, headers: dpop.Headers, body_says_expired: bool = False
) -> bool:
    """Whether the answer says the token expired (refresh once and retry): what
    :func:`.challenge.read_answer` reads from its ``WWW-Authenticate`` challenge, else one of
    the datasource's "expired" statuses or body conditions (``body_says_expired``: one matched,
    :func:`.challenge.body_says_expired`); never a refusal of the DPoP proof alone (a nonce
    wanted, a proof refused) nor a lack of scope."""
    reading = challenge.read_answer(
        status, headers.get("WWW-Authenticate"), datasource.expiry_statuses, body_says_expired
    )
    if reading.verdict is not challenge.Verdict.EXPIRED:
        return False
    return not datasource.use_dpop or not dpop.resource_refusal(status, headers).proof_only
