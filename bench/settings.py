"""Settings for the proxy benchmark: the project plus a naive forwarding view to compare with."""

from config.settings import *  # noqa: F403

ROOT_URLCONF = "bench.urls"
ALLOWED_HOSTS = ["*"]
DEBUG = False
