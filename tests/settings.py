"""Test project: the real project settings plus django-oauth-toolkit as a real authorization
server and a small protected upstream API, both served by the same Django process."""

import os
from pathlib import Path

os.environ.setdefault("ENV_FILE", os.devnull)  # hermetic: ignore a developer's .env
os.environ.setdefault("SECRET_KEY", "test-secret-key-not-for-production")
# Two keys so rotation paths are exercised; the first encrypts.
os.environ.setdefault(
    "FERNET_KEYS",
    "tZ7s0hU3Dj1sH9bq9lq0mY3e3yqg2v3o6pQk2yq6X0E=,6h2Ku0m6mJ7m0bXJ8oP1gqv1Ss0v2eQm0kJwQj0bZ3A=",
)
os.environ.setdefault("DATA_DIR", str(Path(__file__).resolve().parent.parent / "var" / "test"))

from config.paths import broker_folders
from config.settings import *  # noqa: F403
from config.settings import BASE_DIR, DATA_DIR, DATABASES, INSTALLED_APPS, TEMPLATES

# The project's entry points create these (config.paths.ensure_data_dirs); pytest is not one.
for _folder in (DATA_DIR, DATA_DIR / "static", *broker_folders(DATA_DIR).values()):
    _folder.mkdir(parents=True, exist_ok=True)

INSTALLED_APPS = [*INSTALLED_APPS, "oauth2_provider"]
ROOT_URLCONF = "tests.urls"
TEMPLATES[0]["DIRS"] = [BASE_DIR / "tests" / "templates", *TEMPLATES[0]["DIRS"]]
LOGIN_URL = "/accounts/login/"
ALLOWED_HOSTS = ["*"]
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
SESSION_COOKIE_SECURE = False
CSRF_COOKIE_SECURE = False

if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # A file, not :memory:, so worker and helper processes see the same test database.
    DATABASES["default"]["TEST"] = {"NAME": str(DATA_DIR / "pytest-db.sqlite3")}


def _rsa_private_key() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


OAUTH2_PROVIDER = {
    # OpenID Connect on, so discovery runs against DOT's real metadata document.
    "OIDC_ENABLED": True,
    "OIDC_RSA_PRIVATE_KEY": _rsa_private_key(),
    "PKCE_REQUIRED": True,
    "ROTATE_REFRESH_TOKEN": True,
    "REFRESH_TOKEN_REUSE_PROTECTION": True,
    "REFRESH_TOKEN_GRACE_PERIOD_SECONDS": 0,
    "ACCESS_TOKEN_EXPIRE_SECONDS": 3600,
    "SCOPES": {"openid": "OpenID Connect", "read": "Read", "write": "Write"},
    "ALLOWED_REDIRECT_URI_SCHEMES": ["http", "https"],
}

DATASOURCES = {
    **DATASOURCES,  # noqa: F405
    "LEASE_WAIT": 20.0,
    "USAGE_FLUSH_INTERVAL": 0,
    "PROXY_CACHE_SECONDS": 0,
    "HEALTH_CACHE_SECONDS": 0,
    "CALL_LOG_FLUSH_INTERVAL": 0,
}

# The live server answers each request in a new thread; persistent connections would outlive
# those threads and keep the test database busy at teardown.
DATABASES["default"]["CONN_MAX_AGE"] = 0
