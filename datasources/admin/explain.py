"""Plain words for what went wrong: a builder sees "invalid_grant: …" and needs to know what to
do. Each explanation names the one action that fixes it; the raw error stays beside it."""

from __future__ import annotations

import re

#: (pattern found in the recorded error, what it means and what to do)
_EXPLANATIONS: tuple[tuple[str, str], ...] = (
    (
        r"rejected the client assertion \(private_key_jwt\)",
        "The provider rejected the client assertion signed with the private key: check that "
        "the key ID under “Client” matches the key registered at the provider, and that the "
        "public key (or certificate) registered there is the one shown on this page. Then "
        "save, and use Refresh now or Re-authorize.",
    ),
    (
        r"rejected the client assertion \(client_secret_jwt\)",
        "The provider rejected the client assertion signed with the client secret: paste the "
        "secret again under “Client” and check that the provider expects client_secret_jwt.",
    ),
    (
        r"rejected the JWT bearer assertion",
        "The provider refused the signed assertion of the service account: import its key "
        "file again (or check the client ID, key ID and private key under “Client” and "
        "“Signing key”); when acting for a user, check that the account may act for them. "
        "Then use “Get a new token now”.",
    ),
    (
        r"private key cannot be used",
        "The stored private key cannot sign: paste or upload the key again under “Client”, or "
        "generate a new key pair and register its public key at the provider.",
    ),
    (
        r"\binvalid_client\b",
        "The provider did not accept the client ID or client secret. Check both under "
        "“Client” (paste the secret again: it is never shown), save, then use Test or "
        "Refresh now.",
    ),
    (
        r"\bunauthorized_client\b",
        "The provider does not let this client use this grant type. Enable it in the app's "
        "settings at the provider, or choose the other grant type here.",
    ),
    (
        r"\bAADSTS5007[69]\b",
        "Microsoft Entra ID asks the person who authorized this datasource for multi-factor "
        "authentication again, which only they can do. Click Re-authorize and sign in with "
        "that account.",
    ),
    (
        r"\bconsent_required\b|\bAADSTS65001\b",
        "The provider needs consent again: the person who authorized this datasource (or an "
        "administrator of their organisation) withdrew it, or the scopes changed. Click "
        "Re-authorize and grant access again.",
    ),
    (
        r"\binteraction_required\b|\blogin_required\b|\baccount_selection_required\b",
        "The provider needs the person who authorized this datasource to sign in again (a new "
        "sign-in, a security check, or choosing an account), which cannot happen in the "
        "background. Click Re-authorize.",
    ),
    (
        r"\binvalid_grant\b|\bbad_refresh_token\b|\binvalid_refresh_token\b|\binvalid_code\b",
        "The provider no longer accepts the stored authorization: it was revoked, expired, "
        "or replaced by a newer one. Click Re-authorize and grant access again.",
    ),
    (
        r"\binvalid_scope\b",
        "The provider refused the requested scopes. Correct “Scope(s)” (names and separator "
        "as the provider documents them), save, then Refresh now or Re-authorize.",
    ),
    (
        r"\bunsupported_grant_type\b",
        "The provider does not support this grant type at this access token URL. Check the "
        "grant type and the access token URL.",
    ),
    (
        r"\binvalid_request\b",
        "The provider found the token request malformed: usually the client authentication "
        "method (Basic header or request body) or the audience/resource parameters. Check "
        "them under “Client” and “Advanced”.",
    ),
    (
        r"\baccess_denied\b",
        "Access was denied at the provider (the person declined, or lacks rights to grant "
        "these scopes). Authorize again with an account that may grant them.",
    ),
    (
        r"\btemporarily_unavailable\b|\bserver_error\b|HTTP 5\d\d|HTTP 429|timed? ?out|"
        r"unreachable|[Cc]onnection|did not answer",
        "The provider is having trouble right now. Nothing is lost: the token is kept and the "
        "refresh is retried automatically. Use Refresh now to try at once.",
    ),
    (
        r"HTTP 401\b",
        "The provider answered 401 Unauthorized to the token request: usually a wrong client "
        "ID or secret, or the wrong client authentication method.",
    ),
    (
        r"no refresh token|without a refresh token",
        "The provider gave no refresh token, so the token cannot be renewed without a person. "
        "Ask for one (see the hint) and Re-authorize.",
    ),
)


def explain(error: str) -> str:
    """What ``error`` (a recorded refresh or authorization error) means, in plain words; empty
    when there is nothing better to say than the error itself."""
    if not error:
        return ""
    for pattern, text in _EXPLANATIONS:
        if re.search(pattern, error):
            return text
    return ""


#: Form errors worth a plainer sentence (Django's and ours).
BODY_RULES_HINT = (
    'Write a JSON list of conditions, each an object with a "path" and its "values", in '
    'double quotes, e.g. [{"path": "error", "values": ["invalid_auth"]}]. Leave it empty '
    "for none."
)
JSON_HINT = (
    "Write a JSON object: names and values in double quotes, separated by commas, inside "
    'braces, e.g. {"prompt": "consent", "access_type": "offline"}. Leave it empty for none.'
)
