"""A datasource's signing key: generating a key pair for it, and the public half to show the
builder (what to register at the provider). The private key never leaves the encrypted field
except to sign (:func:`datasources.authserver.oauth.signer_of`)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..models import Datasource, SigningAlgorithm
from ..security import jose


@dataclass(frozen=True)
class PublicKey:
    """The public half of a datasource's key: not secret, shown to register at the provider."""

    jwk: str  # a JWKS document ({"keys": [...]}), pretty-printed
    pem: str
    certificate: str
    kid: str
    algorithm: str


def generate_key_pair(datasource: Datasource, algorithm: str = "") -> None:
    """Give ``datasource`` a new private key (the chosen algorithm's type; RS256 when none is
    chosen, as every provider accepts it), its RFC 7638 thumbprint as the key ID and a
    self-signed certificate. The caller saves."""
    algorithm = algorithm or datasource.signing_algorithm or SigningAlgorithm.RS256
    key = jose.generate_private_key(algorithm)
    datasource.private_key = jose.private_pem(key)
    datasource.private_key_id = jose.thumbprint(jose.public_jwk(key))
    datasource.signing_algorithm = algorithm
    datasource.signing_certificate = jose.self_signed_certificate(
        key, datasource.slug or datasource.name
    )


def public_key_of(datasource: Datasource) -> PublicKey | None:
    """The public half of the stored key, or None when there is none (or it cannot be read)."""
    if not datasource.private_key:
        return None
    try:
        key = jose.load_private_key(datasource.private_key)
        algorithm = jose.algorithm_for(key, datasource.signing_algorithm)
    except jose.KeyProblem:
        return None
    jwk = jose.public_jwk(key, kid=datasource.private_key_id, alg=algorithm)
    return PublicKey(
        jwk=json.dumps({"keys": [jwk]}, indent=2),
        pem=jose.public_pem(key),
        certificate=datasource.signing_certificate,
        kid=datasource.private_key_id,
        algorithm=algorithm,
    )
