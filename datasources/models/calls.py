"""The datasource's call settings: how the proxy, the Python client and Test call the API (what
means "expired", which methods and default headers, retries)."""

from __future__ import annotations

from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.utils.translation import gettext_lazy as _

from .values import (
    DEFAULT_ALLOWED_METHODS,
    MAX_RETRIES,
    RETRYABLE_STATUSES,
    parse_methods,
    parse_status_codes,
)


class CallSettings(models.Model):
    """Abstract: fields of :class:`~datasources.models.Datasource` (one table)."""

    expiry_status_codes = models.CharField(
        _("expired-token status codes"),
        max_length=100,
        default="401",
        blank=True,
        help_text=_(
            "HTTP statuses with which this API says the access token is no longer valid, "
            "comma separated (usually 401; some APIs use 403). On such an answer the token is "
            "refreshed once and the call retried once. Empty: never."
        ),
    )
    expiry_body_rules = models.JSONField(
        _("expired-token body conditions"),
        default=list,
        blank=True,
        help_text=_(
            "For APIs that say the token expired in the body of their answer rather than (only) "
            "with a status: a JSON list of conditions, each a dotted path into the JSON answer "
            'and the values that mean "expired". Slack: '
            '[{"path": "error", "values": ["invalid_auth", "token_expired"]}]; a number picks '
            'a list element and * any element ("*.errorCode"). Only small JSON answers are '
            "read (EXPIRY_BODY_MAX_BYTES). On a match the token is refreshed once and the call "
            "retried once, as for an expired status. Empty: none."
        ),
    )
    allowed_methods = models.CharField(
        _("allowed methods"),
        max_length=200,
        default=DEFAULT_ALLOWED_METHODS,
        blank=True,
        help_text=_(
            "HTTP methods the proxy forwards to this API, comma separated; any other method is "
            "answered 405. Empty: GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS. TRACE, TRACK "
            "and CONNECT are never forwarded."
        ),
    )
    default_headers = models.JSONField(
        _("default headers"),
        default=dict,
        blank=True,
        help_text=_(
            "Headers sent with every call unless the caller sends the same header, as a JSON "
            'object of strings, e.g. {"Accept": "application/json", "X-Api-Version": "2"}. '
            "The header that carries the token cannot be set here. Not for secrets: these "
            "values are shown in the admin and exported."
        ),
    )
    default_query_params = models.JSONField(
        _("default query parameters"),
        default=dict,
        blank=True,
        help_text=_(
            "Query parameters added to every call unless the caller sends the same parameter, "
            'as a JSON object of strings, e.g. {"api-version": "2024-01-01"}. The parameter '
            "that carries the token cannot be set here. Not for secrets: these values are "
            "shown in the admin and exported."
        ),
    )
    retry_count = models.PositiveSmallIntegerField(
        _("retries"),
        default=0,
        validators=[MaxValueValidator(MAX_RETRIES)],
        help_text=_(
            "How many times a failed call is sent again (0: never). Only idempotent methods "
            "(GET, HEAD, OPTIONS, PUT, DELETE) or calls with an Idempotency-Key header, and only "
            "when the request body could be kept in memory. A caller may ask for fewer with the "
            "X-Datasource-Retries header."
        ),
    )
    retry_statuses = models.CharField(
        _("retry on statuses"),
        max_length=50,
        default="429,502,503,504",
        blank=True,
        help_text=_(
            "Upstream statuses after which a call is retried, comma separated: any of 429, 502, "
            "503, 504. The server's Retry-After is honoured; otherwise exponential backoff with "
            "jitter."
        ),
    )
    retry_on_connection_errors = models.BooleanField(
        _("retry on connection errors"),
        default=True,
        help_text=_("Also retry when the connection is refused, reset or times out."),
    )
    retry_budget = models.PositiveSmallIntegerField(
        _("retry budget (seconds)"),
        default=10,
        validators=[MinValueValidator(1), MaxValueValidator(300)],
        help_text=_(
            "The longest a call may take with its retries and waits: a retry whose wait would "
            "end later is not made, and the last answer is passed on."
        ),
    )

    class Meta:
        abstract = True

    @property
    def expiry_statuses(self) -> frozenset[int]:
        """The upstream statuses that mean "token expired" (see ``expiry_status_codes``)."""
        try:
            return parse_status_codes(self.expiry_status_codes)
        except ValueError:
            return frozenset({401})

    @property
    def retry_status_set(self) -> frozenset[int]:
        """The upstream statuses retried (see ``retry_statuses``); never anything else."""
        try:
            return parse_status_codes(self.retry_statuses) & RETRYABLE_STATUSES
        except ValueError:
            return frozenset()

    @property
    def allowed_method_set(self) -> frozenset[str]:
        """The methods the proxy forwards (see ``allowed_methods``)."""
        try:
            return parse_methods(self.allowed_methods) or parse_methods(DEFAULT_ALLOWED_METHODS)
        except ValueError:
            return parse_methods(DEFAULT_ALLOWED_METHODS)
