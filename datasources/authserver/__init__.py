"""Every HTTP call to an authorization server: authorize URL, code exchange, refresh, client
credentials, revocation, discovery; the bounded outbound session; a datasource's signing keys.

Answers become plain data or :class:`~datasources.exceptions.OAuthError` /
:class:`~datasources.exceptions.TransientUpstreamError`. May import :mod:`datasources.security`,
:mod:`datasources.models` and the bottom modules; never tokens, calls, proxy or admin.
"""
