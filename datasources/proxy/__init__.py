"""The token-attaching proxy, one job per module:

* :mod:`.view` — the thin view: maps refusals and upstream failures to JSON answers;
* :mod:`.callers` — who is calling: an API key or a signed-in user with ``use_datasource``;
* :mod:`.cache` — verified keys and current tokens kept in memory for PROXY_CACHE_SECONDS;
* :mod:`.target` — the upstream URL, built so that it cannot leave ``base_url`` (also used by the
  Python client);
* :mod:`.transport` — the keep-alive pool, request and response headers, streaming;
* :mod:`.usage` — call counters, flushed to the database in batches.
"""
