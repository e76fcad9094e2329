"""Benchmark: the cost of one DPoP proof on the proxy's hot path.

Compares, interleaved round by round (so machine noise hits all alike):

(a) ours: ``binding.auth_headers`` for a DPoP-bound token — the key parsed once per process
    and cached per PEM, a fresh jti, ath of the token, the server's nonce from process memory;
(b) baseline: what a straightforward implementation does per call — parse the PEM, build the
    public JWK, ``jwt.encode`` the same claims (PyJWT + cryptography, ES256);
(c) floor: the ES256 signature alone (``cryptography``'s ``sign`` over a 200-byte message);

and, for datasources without DPoP or mutual TLS, the per-call checks added by #15 against the
one header call made before.

Prints µs per proof (median of the rounds) and the ratios.

    python bench/dpop.py [--rounds 7] [--proofs 2000]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--proofs", type=int, default=2000)
    args = parser.parse_args()

    import django

    django.setup()
    import jwt
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from datasources.calls import binding
    from datasources.models import Datasource, Token
    from datasources.security import dpop

    pem = dpop.generate_private_key_pem()
    datasource = Datasource(
        slug="bench", base_url="https://api.example/", use_dpop=True, dpop_private_key=pem
    )
    token = Token(access_token="a" * 43, token_type="DPoP")
    url = "https://api.example/v1/things/42"
    dpop._nonces[dpop.origin(url)] = "server-nonce-0123456789"

    def ours() -> None:
        binding.auth_headers(datasource, token, "GET", url)

    def baseline() -> None:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
        jwk = jwt.algorithms.ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
        claims = {
            "jti": secrets.token_urlsafe(16),
            "htm": "GET",
            "htu": url,
            "iat": int(time.time()),
            "ath": jwt.utils.base64url_encode(
                hashlib.sha256(token.access_token.encode()).digest()
            ).decode(),
            "nonce": "server-nonce-0123456789",
        }
        jwt.encode(claims, key, algorithm="ES256", headers={"typ": "dpop+jwt", "jwk": jwk})

    signing_key = serialization.load_pem_private_key(pem.encode(), password=None)
    message = b"x" * 200

    def floor() -> None:
        signing_key.sign(message, ec.ECDSA(hashes.SHA256()))

    # The per-call work added for datasources WITHOUT DPoP or mutual TLS (most of them): the
    # token header through binding.auth_headers, the TLS-context check and the proof-refusal
    # check, against the single call made before (target.token_header).
    from requests.structures import CaseInsensitiveDict

    from datasources.calls import target
    from datasources.security import tls

    plain = Datasource(slug="plain", base_url="https://api.example/")
    bearer = Token(access_token="a" * 43, token_type="Bearer")
    answer = CaseInsensitiveDict({"Content-Type": "application/json"})

    def plain_now() -> None:
        binding.auth_headers(plain, bearer, "GET", url)
        tls.context_for(plain, api=True)
        binding.proof_refused(plain, bearer, url, 200, answer)
        binding.token_rejected(plain, 200, answer)

    def plain_before() -> None:
        target.token_header(plain, bearer.access_token)
        _ = 200 in plain.expiry_statuses

    contenders = {
        "ours": ours,
        "baseline (PEM parsed per proof)": baseline,
        "ES256 sign only": floor,
        "no DPoP: header + checks now": plain_now,
        "no DPoP: header before #15": plain_before,
    }
    for fn in contenders.values():  # warm up (and fill our key cache once)
        for _ in range(50):
            fn()
    results: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, fn in contenders.items():
            started = time.perf_counter()
            for _ in range(args.proofs):
                fn()
            results[name].append((time.perf_counter() - started) / args.proofs * 1e6)

    medians = {name: statistics.median(values) for name, values in results.items()}
    print(f"DPoP proof cost, {args.rounds} interleaved rounds of {args.proofs} proofs (median):")
    for name, value in medians.items():
        spread = f"{min(results[name]):.1f}-{max(results[name]):.1f}"
        print(f"  {name:34s} {value:8.1f} µs/proof  (rounds {spread})")
    print(f"  baseline / ours: {medians['baseline (PEM parsed per proof)'] / medians['ours']:.2f}x")
    print(f"  ours / sign only: {medians['ours'] / medians['ES256 sign only']:.2f}x")
    added = medians["no DPoP: header + checks now"] - medians["no DPoP: header before #15"]
    print(f"  added per call without DPoP: {added:.2f} µs")


if __name__ == "__main__":
    main()
