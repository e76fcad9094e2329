"""One upstream call, shared by the proxy (view and lane), the Python client and the admin's Test.

The target under ``base_url``, the upstream's health (rate limits, circuit breaker), retries,
the attempts that refresh once on an "expired" answer, and how a token is presented. May import
:mod:`datasources.tokens`, :mod:`datasources.security`, :mod:`datasources.models` and the
bottom modules (conf, exceptions, signals, tracing); never :mod:`datasources.proxy`,
:mod:`datasources.admin` or Django's request/response types.
"""
