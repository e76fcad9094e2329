"""Work the admin hands to Celery instead of doing inside a request: bulk refreshes and the
revocation of a deleted datasource's tokens (one token-endpoint call per row would hold the
admin page for as long as the slowest provider takes).

A deleted datasource's row is gone when its task runs, so what the revocation needs (endpoint,
client credentials, tokens) travels in the message, encrypted with the app's Fernet keys: the
broker never holds a secret in plain text.
"""

from __future__ import annotations

import json
import logging

from django.views.decorators.debug import sensitive_variables

from ..authserver import oauth
from ..exceptions import DatasourceError
from ..models import Datasource, Token

logger = logging.getLogger(__name__)


#: What ``oauth.revoke`` needs to authenticate the client, whatever the method (a signed
#: assertion needs the key, its settings and the URLs its audience may name).
_REVOCATION_FIELDS = (
    "slug",
    "revocation_url",
    "client_id",
    "client_secret",
    "client_authentication",
    "access_token_url",
    "issuer",
    "private_key",
    "private_key_id",
    "signing_algorithm",
    "signing_certificate",
    "assertion_audience",
    # mutual TLS: the certificate authenticates, or the token is bound to it
    "tls_client_certificate",
    "tls_client_key",
    "tls_ca_bundle",
)


def _fernet():
    return Datasource._meta.get_field("client_secret").fernet


@sensitive_variables()
def revocation_payload(datasource: Datasource) -> str | None:
    """The encrypted message that lets a worker revoke ``datasource``'s tokens after the row is
    deleted, or None when there is nothing to revoke."""
    if not datasource.revocation_url:
        return None
    values = []
    for token in Token.objects.filter(datasource=datasource):
        values += [
            [value, hint]
            for value, hint in (
                (token.refresh_token, "refresh_token"),
                (token.access_token, "access_token"),
            )
            if value
        ]
    if not values:
        return None
    data = {name: getattr(datasource, name) for name in _REVOCATION_FIELDS}
    data["tokens"] = values
    return _fernet().encrypt(json.dumps(data).encode()).decode()


@sensitive_variables()
def revoke_from_payload(payload: str) -> list[str]:
    """Revoke every token in ``payload``; returns the problems met (secret-free)."""
    data = json.loads(_fernet().decrypt(payload.encode()))
    # Payloads queued before a field was added lack it: the model default applies.
    datasource = Datasource(**{name: data[name] for name in _REVOCATION_FIELDS if name in data})
    problems = []
    for value, hint in data["tokens"]:
        try:
            oauth.revoke(datasource, value, hint)
        except DatasourceError as err:
            problems.append(f"Revoking a {hint.replace('_', ' ')} of {data['slug']} failed: {err}")
    for problem in problems:
        logger.warning("%s", problem)
    return problems
