"""The JOSE pieces the datasources need, on PyJWT and ``cryptography`` (no hand-written JOSE):
private keys (load, check against an algorithm, generate), public JWKs and their RFC 7638
thumbprints, self-signed certificates to register at providers that want one (Entra ID), and
signed JWTs: client assertions (RFC 7523 §2.2, OpenID Connect Core §9), JWT bearer grant
assertions (RFC 7523 §2.1) and any JWT with extra headers (e.g. a DPoP proof's ``jwk``).

Nothing here logs or puts key material in an exception message: errors say what is wrong with
a key, never what it contains.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

#: Asymmetric algorithms a builder may choose, and the key type each needs.
SIGNING_ALGORITHMS = ("RS256", "PS256", "ES256")
CLIENT_SECRET_ALGORITHM = "HS256"
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
#: Lifetime of an assertion: long enough for clock skew, short enough to be useless if leaked.
ASSERTION_LIFETIME = 60
MIN_RSA_BITS = 2048


class KeyProblem(ValueError):
    """A key or certificate cannot be used; the message says why, without key material."""


def load_private_key(pem: str) -> PrivateKey:
    """An RSA (2048 bits or more) or EC P-256 private key from PEM (PKCS#8 or traditional)."""
    text = (pem or "").strip()
    if not text:
        raise KeyProblem("No private key given.")
    if "-----BEGIN" not in text:
        raise KeyProblem(
            "This is not a PEM private key: paste the text from “-----BEGIN PRIVATE KEY-----” "
            "to “-----END PRIVATE KEY-----”."
        )
    label = text.split("-----", 2)[1]  # "BEGIN PRIVATE KEY", "BEGIN CERTIFICATE", ...
    if "ENCRYPTED" in label:
        raise KeyProblem("This private key is protected by a passphrase; paste it unencrypted.")
    if "PRIVATE KEY" not in label:
        raise KeyProblem("This is a public key or certificate; the private key is needed.")
    try:
        key = serialization.load_pem_private_key(text.encode(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise KeyProblem(
            f"The private key cannot be read: it is corrupt or incomplete ({type(err).__name__})."
        ) from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise KeyProblem(f"This RSA key has {key.key_size} bits; at least 2048 are needed.")
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise KeyProblem(
                f"This EC key is on the {key.curve.name} curve; ES256 needs P-256 (secp256r1)."
            )
        return key
    raise KeyProblem(
        f"{type(key).__name__.replace('PrivateKey', '') or 'This'} keys are not supported: "
        "use an RSA key (RS256, PS256) or an EC P-256 key (ES256)."
    )


def algorithm_for(key: PrivateKey, requested: str = "") -> str:
    """The signing algorithm: ``requested`` if the key can make it, else inferred from the key
    (RSA → RS256, EC P-256 → ES256). KeyProblem for a mismatch or an unknown algorithm."""
    rsa_key = isinstance(key, rsa.RSAPrivateKey)
    if not requested:
        return "RS256" if rsa_key else "ES256"
    if requested not in SIGNING_ALGORITHMS:
        raise KeyProblem(
            f"{requested} is not supported; choose one of {', '.join(SIGNING_ALGORITHMS)}."
        )
    if requested == "ES256" and rsa_key:
        raise KeyProblem(
            "ES256 needs an EC P-256 key, and this is an RSA key: choose RS256 or PS256."
        )
    if requested in ("RS256", "PS256") and not rsa_key:
        raise KeyProblem(f"{requested} needs an RSA key, and this is an EC key: choose ES256.")
    return requested


def generate_private_key(algorithm: str = "ES256") -> PrivateKey:
    """A new key for ``algorithm``: EC P-256 for ES256, RSA 2048 for RS256/PS256."""
    if algorithm == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm in ("RS256", "PS256"):
        return rsa.generate_private_key(public_exponent=65537, key_size=MIN_RSA_BITS)
    raise KeyProblem(f"{algorithm} is not supported.")


def private_pem(key: PrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")


def public_pem(key: PrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode("ascii")
    )


def public_jwk(key: PrivateKey, *, kid: str = "", alg: str = "") -> dict[str, Any]:
    """The public half as a JWK (RFC 7517), with ``use: sig`` and, when given, kid and alg."""
    public = key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        jwk = jwt.algorithms.RSAAlgorithm.to_jwk(public, as_dict=True)
    else:
        jwk = jwt.algorithms.ECAlgorithm.to_jwk(public, as_dict=True)
    jwk = {k: v for k, v in jwk.items() if k not in ("key_ops",)}
    jwk["use"] = "sig"
    if kid:
        jwk["kid"] = kid
    if alg:
        jwk["alg"] = alg
    return jwk


_THUMBPRINT_MEMBERS = {"RSA": ("e", "kty", "n"), "EC": ("crv", "kty", "x", "y")}


def thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url): the required members only, sorted, no
    whitespace. Used as a generated key's ``kid`` and by DPoP (``jkt``)."""
    members = _THUMBPRINT_MEMBERS[jwk["kty"]]
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    return _b64url(hashlib.sha256(canonical.encode()).digest())


def self_signed_certificate(key: PrivateKey, common_name: str, *, days: int = 730) -> str:
    """A self-signed X.509 certificate for ``key`` (PEM): what Microsoft Entra ID and others
    want uploaded instead of a bare public key."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64] or "datasource")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")


def certificate_headers(certificate_pem: str, key: PrivateKey | None = None) -> dict[str, str]:
    """``x5t`` (SHA-1, what Entra ID matches a certificate credential by) and ``x5t#S256`` for
    a certificate; KeyProblem when it is not one, or not for ``key``."""
    try:
        certificate = x509.load_pem_x509_certificate((certificate_pem or "").strip().encode())
    except ValueError:
        raise KeyProblem("The certificate is not a PEM X.509 certificate.") from None
    if key is not None and certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise KeyProblem("The certificate is not for this private key.")
    der = certificate.public_bytes(serialization.Encoding.DER)
    return {
        "x5t": _b64url(hashlib.sha1(der, usedforsecurity=False).digest()),
        "x5t#S256": _b64url(hashlib.sha256(der).digest()),
    }


@dataclass(frozen=True)
class Signer:
    """A private key with what goes in the JWS header; ``repr`` shows no key material."""

    key: PrivateKey = field(repr=False)
    algorithm: str
    kid: str = ""
    certificate: str = field(default="", repr=False)

    @classmethod
    def from_pem(
        cls, pem: str, *, algorithm: str = "", kid: str = "", certificate: str = ""
    ) -> Signer:
        key = load_private_key(pem)
        return cls(key, algorithm_for(key, algorithm), kid, certificate)

    def headers(self) -> dict[str, str]:
        headers = {"kid": self.kid} if self.kid else {}
        if self.certificate:
            headers.update(certificate_headers(self.certificate))
        return headers

    def sign(self, claims: dict[str, Any], headers: dict[str, Any] | None = None) -> str:
        return jwt.encode(
            claims,
            self.key,
            algorithm=self.algorithm,
            headers={**self.headers(), **(headers or {})},
        )


def new_jti() -> str:
    return secrets.token_urlsafe(24)


def client_assertion(
    client_id: str, audience: str, signer: Signer, *, lifetime: int = ASSERTION_LIFETIME
) -> str:
    """private_key_jwt: ``iss`` = ``sub`` = client ID, ``aud``, short ``exp``, unique ``jti``."""
    return signer.sign(_assertion_claims(client_id, client_id, audience, lifetime))


def client_secret_assertion(
    client_id: str, audience: str, secret: str, *, lifetime: int = ASSERTION_LIFETIME
) -> str:
    """client_secret_jwt: the same claims, HMAC-SHA256 with the client secret."""
    return jwt.encode(
        _assertion_claims(client_id, client_id, audience, lifetime),
        secret,
        algorithm=CLIENT_SECRET_ALGORITHM,
    )


def bearer_assertion(
    issuer: str,
    audience: str,
    signer: Signer,
    *,
    subject: str = "",
    scope: str = "",
    lifetime: int = ASSERTION_LIFETIME,
) -> str:
    """The JWT bearer grant's assertion: ``iss`` (the service account), ``sub`` only when acting
    for someone (domain-wide delegation), ``aud`` (the token URI), ``scope`` when asked."""
    claims = _assertion_claims(issuer, subject, audience, lifetime)
    if not subject:
        claims.pop("sub")
    if scope:
        claims["scope"] = scope
    return signer.sign(claims)


def _assertion_claims(issuer: str, subject: str, audience: str, lifetime: int) -> dict[str, Any]:
    now = int(time.time())
    return {
        "iss": issuer,
        "sub": subject,
        "aud": audience,
        "iat": now,
        "exp": now + lifetime,
        "jti": new_jti(),
    }


@dataclass(frozen=True)
class ServiceAccountKey:
    """The parts of a provider's JSON key file (Google's service-account format) we use."""

    client_email: str
    private_key: str = field(repr=False)
    private_key_id: str = ""
    token_uri: str = ""


def read_service_account_key(text: str) -> ServiceAccountKey:
    """Parse a JSON key file; KeyProblem naming what is missing (never echoing its content)."""
    try:
        data = json.loads(text)
    except ValueError:
        raise KeyProblem("The key file is not JSON.") from None
    if not isinstance(data, dict):
        raise KeyProblem("The key file is not a JSON object.")
    missing = [name for name in ("client_email", "private_key") if not data.get(name)]
    if missing:
        raise KeyProblem(f"The key file has no {' or '.join(missing)}.")
    values = {
        name: data.get(name) or ""
        for name in ("client_email", "private_key", "private_key_id", "token_uri")
    }
    if not all(isinstance(v, str) for v in values.values()):
        raise KeyProblem(
            "The key file's client_email, private_key, private_key_id and token_uri must be strings."
        )
    load_private_key(values["private_key"])
    return ServiceAccountKey(**values)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")
