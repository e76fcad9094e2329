"""Serving the token-attaching proxy, one job per module (the call's own steps are
:mod:`datasources.calls`'):

* :mod:`.view` — the Django view: translates a request into the call's steps and their outcome
  (an upstream answer or a refusal) into a response;
* :mod:`.lane` — the ASGI fast lane, the same translation on the event loop (imports nothing
  from the view); :mod:`.router` — the ASGI application around Django's; :mod:`.asgi` — the
  thread-pool path; :mod:`.incoming`,
  :mod:`.upstream` — the lane's request facts and asyncio HTTP client;
* :mod:`.route` — the proxy's URL, defined once for urls.py, the router and the lane;
* :mod:`.answers` — refusals and relayed answers as Django responses, for both paths;
* :mod:`.callers` — who is calling: an API key or a signed-in user with ``use_datasource``;
* :mod:`.cache` — verified keys and current tokens kept in memory for PROXY_CACHE_SECONDS;
* :mod:`.usage`, :mod:`.calllog` — call counters and the call log, written in batches;
* :mod:`.apikeys` — API keys: made once, stored hashed, checked in constant time.

Serving only: may import :mod:`datasources.calls` and everything below it; nothing below imports
it (the admin reads its caches and keys, the tasks flush its call log).
"""
