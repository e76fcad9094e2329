"""One upstream call, shared by the proxy (view and lane), the Python client and the admin's Test.

:mod:`.call` holds the steps every entry point runs (token, target, health gate, attempts, a
failure as an answer), each entry point only translating its own request and answer types.
The target under ``base_url``, the upstream's health (rate limits, circuit breaker), retries,
the attempts that refresh once on an "expired" answer, and how a token is presented. May import
:mod:`datasources.tokens`, :mod:`datasources.security`, :mod:`datasources.models` and the
bottom modules (conf, exceptions, signals, tracing); never :mod:`datasources.proxy`,
:mod:`datasources.admin` or Django's request/response types.
"""
