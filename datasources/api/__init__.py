"""The management JSON API (``/api/v1/…``) for application code that is not the proxy.

API keys with the ``manage`` permission read datasources (status, token state, upstream health;
never a secret); keys with the ``token`` permission read a fresh access token (every use is
recorded). Every error is JSON with a stable ``error`` code; the OpenAPI 3.1 document is
generated from the code and served at ``/api/v1/openapi.json``.

Built on django-ninja: Pydantic schemas validate what comes in and describe what goes out, and
the same schemas generate the OpenAPI document, so it cannot drift from the code (Django REST
framework with drf-spectacular would do the same with two packages and OpenAPI 3.0 by default).

Layer: serving, beside :mod:`datasources.proxy` and :mod:`datasources.authorize`; it reaches
tokens through :mod:`datasources.tokens` like every other entry point.

* :mod:`.auth` — the API key, its permissions and its datasource scope;
* :mod:`.errors` — the error answers;
* :mod:`.schemas` — what goes in and out;
* :mod:`.endpoints` — the calls.
"""
