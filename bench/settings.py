"""Settings for the proxy benchmark: the project plus a naive forwarding view to compare with."""

import os

from config.settings import *  # noqa: F403

ROOT_URLCONF = "bench.urls"
ALLOWED_HOSTS = ["*"]
DEBUG = False

if os.environ.get("BENCH_FEATURES") == "off":
    # bench/proxy.py --features: the baseline without the call log and the shared upstream
    # health (rate-limit memory, circuit breaker); its datasource has no retries configured.
    DATASOURCES = {**DATASOURCES, "CALL_LOG": False, "UPSTREAM_HEALTH": False}  # noqa: F405
