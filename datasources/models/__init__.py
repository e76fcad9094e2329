"""The app's data, one module per family; this package re-exports every name, so
``datasources.models.Datasource`` (a public contract) and the rest stay where they were.

- :mod:`.datasource`: the datasource, its configuration and the rules its values follow
  (:mod:`.values`, :mod:`.choices`, :mod:`.validation`), and the groups its settings are shown,
  exported and checked in (:mod:`.groups`);
- :mod:`.token`: tokens and their events; :mod:`.authorization`: pending authorization requests;
- :mod:`.apikey`: API keys; :mod:`.usage`: proxy counters, usage samples, upstream health and the
  call log; :mod:`.webhooks`: endpoints, deliveries and attempts.

Models import nothing above them: no HTTP client, no views, no admin (the methods that hand a
datasource to the token service or the Python client import it when called).
"""

from __future__ import annotations

from .apikey import API_KEY_PREFIX, PERMISSIONS, ApiKey
from .authorization import AuthorizationRequest
from .choices import (
    ASSERTION_AUTH_METHODS,
    MACHINE_GRANTS,
    MTLS_METHODS,
    AssertionAudience,
    ClientAuthentication,
    FailureKindChoices,
    GrantType,
    ScopeSeparator,
    SigningAlgorithm,
    TokenPlacement,
    TokenSharing,
    TokenStatus,
)
from .connect import ConnectSession
from .datasource import Datasource
from .groups import DATASOURCE_GROUPS, config_fields, write_only_fields
from .token import Token, TokenEvent
from .usage import LATENCY_BUCKETS_MS, DatasourceUsage, ProxyCall, UpstreamHealth, UsageSample
from .values import (
    DEFAULT_ALLOWED_METHODS,
    FORBIDDEN_METHODS,
    MAX_RETRIES,
    RESERVED_AUTH_PARAMS,
    RESERVED_DEFAULT_HEADERS,
    RETRYABLE_STATUSES,
    normalize_scopes,
    parse_methods,
    parse_status_codes,
    sha256_hex,
    validate_issuer,
)
from .webhooks import (
    WEBHOOK_TEST_EVENT,
    DeliveryStatus,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookEvent,
    default_webhook_events,
)

#: The settings builders type, that import accepts and export writes, in the admin's order
#: (derived from the groups: the write-only secrets and discovered values are not among them).
CONFIG_FIELDS = config_fields()
#: The secret settings: typed or imported, never shown or exported.
WRITE_ONLY_FIELDS = write_only_fields()

__all__ = [
    "API_KEY_PREFIX",
    "ASSERTION_AUTH_METHODS",
    "CONFIG_FIELDS",
    "DATASOURCE_GROUPS",
    "DEFAULT_ALLOWED_METHODS",
    "FORBIDDEN_METHODS",
    "LATENCY_BUCKETS_MS",
    "MACHINE_GRANTS",
    "MAX_RETRIES",
    "MTLS_METHODS",
    "PERMISSIONS",
    "RESERVED_AUTH_PARAMS",
    "RESERVED_DEFAULT_HEADERS",
    "RETRYABLE_STATUSES",
    "WEBHOOK_TEST_EVENT",
    "WRITE_ONLY_FIELDS",
    "ApiKey",
    "AssertionAudience",
    "AuthorizationRequest",
    "ClientAuthentication",
    "ConnectSession",
    "Datasource",
    "DatasourceUsage",
    "DeliveryStatus",
    "FailureKindChoices",
    "GrantType",
    "ProxyCall",
    "ScopeSeparator",
    "SigningAlgorithm",
    "Token",
    "TokenEvent",
    "TokenPlacement",
    "TokenSharing",
    "TokenStatus",
    "UpstreamHealth",
    "UsageSample",
    "WebhookAttempt",
    "WebhookDelivery",
    "WebhookEndpoint",
    "WebhookEvent",
    "default_webhook_events",
    "normalize_scopes",
    "parse_methods",
    "parse_status_codes",
    "sha256_hex",
    "validate_issuer",
]
