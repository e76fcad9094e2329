"""The pure pieces of talking securely, with no HTTP client and no model: JOSE (on PyJWT),
DPoP proofs, TLS contexts and certificates, and which URLs we may talk to.

May import :mod:`datasources.conf` and :mod:`datasources.exceptions` only (models for type hints).
"""
