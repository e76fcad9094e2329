"""DPoP (RFC 9449): proofs that a request comes from the holder of the datasource's key.

Every datasource with DPoP on has its own key pair, made here (EC P-256, ES256); the private key
is stored encrypted and never shown, the public key travels inside each proof. A proof is a JWT
signed with PyJWT (no hand-written JOSE) over the request's method and URL, with the hash of
the access token on resource calls and the server's nonce when it asked for one.

Proofs are made on the proxy's hot path, so the parsed key and its public JWK are cached per
private key (the PEM is parsed once per process and key, not once per call) and a proof costs
one ES256 signature (``bench/dpop.py`` measures it).

Nonces (RFC 9449 §8, §9): a server may ask for a nonce by answering ``use_dpop_nonce`` with a
``DPoP-Nonce`` header, and may send a new nonce with any answer. The latest nonce is kept per
server origin in this process's memory and in Django's ``default`` cache, read once per origin
by a process without one: with a shared cache (Redis) a new process starts with the nonce
others learned instead of paying one refused call; with Django's default local-memory cache
the memory is per process. A nonce is not a secret.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import secrets
import threading
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from django.core.cache import cache
from django.views.decorators.debug import sensitive_variables

from . import jose

#: The signature algorithm of keys the app generates (RFC 9449 recommends ES256 support).
DEFAULT_ALG = "ES256"
_NONCE_CACHE_PREFIX = "datasources:dpop-nonce:"
_NONCE_CACHE_SECONDS = 24 * 3600


class DPoPKeyError(ValueError):
    """The stored DPoP key cannot be used; the message says why (never the key)."""


# --- keys ------------------------------------------------------------------------------------


def generate_private_key_pem() -> str:
    """A new EC P-256 private key as unencrypted PKCS#8 PEM (stored encrypted by the model)."""
    return jose.private_pem(jose.generate_private_key(DEFAULT_ALG))


@dataclass(frozen=True)
class Signer:
    """A loaded private key with what every proof repeats: its algorithm and public JWK."""

    key: Any
    alg: str
    jwk: dict[str, str]
    thumbprint: str

    def __repr__(self) -> str:
        return f"<Signer {self.alg} {self.thumbprint}>"


@functools.lru_cache(maxsize=512)
@sensitive_variables()
def signer(private_key_pem: str) -> Signer:
    """The key in ``private_key_pem``, parsed once per process (proofs are made per call).

    Keyed by the PEM text itself: a regenerated key is a new entry, so a rotation can never
    sign with the old key; old entries fall out of the LRU. The keys :mod:`datasources.security.jose`
    accepts (EC P-256: ES256, RSA 2048+: PS256)."""
    try:
        key = jose.load_private_key(private_key_pem)
    except jose.KeyProblem as err:
        raise DPoPKeyError(f"The DPoP private key cannot be used ({err}); regenerate it.") from None
    alg = "PS256" if isinstance(key, rsa.RSAPrivateKey) else DEFAULT_ALG
    # Only the public members: the proof's jwk header names the key, nothing else.
    public = {
        k: v for k, v in jose.public_jwk(key).items() if k in ("kty", "crv", "x", "y", "n", "e")
    }
    return Signer(key=key, alg=alg, jwk=public, thumbprint=jose.thumbprint(public))


def public_jwk_json(private_key_pem: str) -> str:
    """The public JWK, for showing and registering at a provider."""
    return json.dumps(signer(private_key_pem).jwk, indent=2, sort_keys=True)


# --- proofs ----------------------------------------------------------------------------------


@sensitive_variables()
def proof(
    private_key_pem: str,
    method: str,
    url: str,
    *,
    access_token: str | None = None,
    nonce: str | None = None,
) -> str:
    """A DPoP proof JWT for one request (RFC 9449 §4.2). ``url`` without query or fragment
    (``htu``); ``access_token`` on resource calls (``ath``); a fresh ``jti`` every time, so a
    proof is never reused."""
    key = signer(private_key_pem)
    claims: dict[str, Any] = {
        "jti": secrets.token_urlsafe(16),
        "htm": method,
        "htu": htu(url),
        "iat": int(time.time()),
    }
    if access_token:
        claims["ath"] = _b64(hashlib.sha256(access_token.encode("ascii")).digest())
    if nonce:
        claims["nonce"] = nonce
    return jwt.encode(
        claims, key.key, algorithm=key.alg, headers={"typ": "dpop+jwt", "jwk": key.jwk}
    )


@functools.lru_cache(maxsize=4096)
def htu(url: str) -> str:
    """The URL without query and fragment (RFC 9449 §4.2)."""
    end = len(url)
    for mark in ("?", "#"):
        found = url.find(mark)
        if found != -1:
            end = min(end, found)
    return url[:end]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


# --- nonces ----------------------------------------------------------------------------------

_nonces: dict[str, str | None] = {}
_nonces_lock = threading.Lock()


@functools.lru_cache(maxsize=1024)
def origin(url: str) -> str:
    """scheme://host[:port] of a URL, lowercased: the key nonces are kept under."""
    scheme, _, rest = url.partition("://")
    host = rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    return f"{scheme.lower()}://{host.lower()}"


def nonce_for(url: str) -> str | None:
    """The latest nonce the server of ``url`` gave, if any (process memory first, then the
    shared cache once per origin and process)."""
    key = origin(url)
    try:
        return _nonces[key]
    except KeyError:
        pass
    value = cache.get(_NONCE_CACHE_PREFIX + key)
    with _nonces_lock:
        _nonces.setdefault(key, value)
    return value


def remember_nonce(url: str, nonce: str | None) -> None:
    """Keep a ``DPoP-Nonce`` the server of ``url`` sent (ignored when empty or unchanged)."""
    if not nonce or len(nonce) > 512:
        return
    key = origin(url)
    if _nonces.get(key) == nonce:
        return
    with _nonces_lock:
        _nonces[key] = nonce
    cache.set(_NONCE_CACHE_PREFIX + key, nonce, _NONCE_CACHE_SECONDS)


def forget_nonces() -> None:
    """Clear this process's memory of nonces (tests; the cache entries expire on their own)."""
    with _nonces_lock:
        _nonces.clear()


# --- what a server's answer means -------------------------------------------------------------


class Headers(Protocol):
    def get(self, name: str, default: Any = None) -> Any: ...


class Refusal(Enum):
    """What a resource server's 401 says about a DPoP call."""

    NONE = "none"  # not about the proof: the answer stands (the token rules apply to it)
    NONCE = "use_dpop_nonce"  # send a new proof with the nonce it gave
    PROOF = "invalid_dpop_proof"  # the proof was refused (replayed, clock, htu …): a fresh one
    #: ``invalid_token`` in a DPoP challenge: the token, or the proof (oidc-provider answers a
    #: replayed proof so, RFC 9449 §7.1 would say invalid_dpop_proof): one fresh proof first,
    #: then, if refused again, the token rules (refresh once).
    TOKEN_OR_PROOF = "invalid_token"

    @property
    def proof_only(self) -> bool:
        """The answer is about the proof alone: never a reason to refresh the token."""
        return self in (Refusal.NONCE, Refusal.PROOF)


def resource_refusal(status: int, headers: Headers) -> Refusal:
    """What a resource server's answer says about our proof (RFC 9449 §7.1, §9), from a 401's
    ``WWW-Authenticate: DPoP`` challenge: ``error="use_dpop_nonce"`` (with a ``DPoP-Nonce``),
    ``error="invalid_dpop_proof"`` or ``error="invalid_token"``. Anything else is ``NONE``."""
    if status != 401:
        return Refusal.NONE
    challenge = headers.get("WWW-Authenticate") or ""
    if not challenge.lower().lstrip().startswith("dpop") and ", dpop " not in challenge.lower():
        return Refusal.NONE
    error = _challenge_error(challenge)
    if error == "use_dpop_nonce":
        return Refusal.NONCE if headers.get("DPoP-Nonce") else Refusal.NONE
    if error == "invalid_dpop_proof":
        return Refusal.PROOF
    if error == "invalid_token":
        return Refusal.TOKEN_OR_PROOF
    return Refusal.NONE


def _challenge_error(challenge: str) -> str:
    lowered = challenge.lower()
    start = lowered.find("error=")
    if start == -1:
        return ""
    value = challenge[start + len("error=") :].lstrip()
    if value.startswith('"'):
        return value[1:].split('"', 1)[0]
    return value.split(",", 1)[0].strip()
