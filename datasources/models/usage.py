"""What the proxy records: counters, usage snapshots, upstream health and the call log."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from .apikey import ApiKey
from .datasource import Datasource

#: Upper bounds (ms) of the proxy latency histogram's buckets (DatasourceUsage.latency_le_*).
LATENCY_BUCKETS_MS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)


class DatasourceUsage(models.Model):
    """Proxy call counters, flushed from each process at most once a second."""

    datasource = models.OneToOneField(
        Datasource, on_delete=models.CASCADE, primary_key=True, related_name="usage"
    )
    calls = models.PositiveBigIntegerField(_("proxied calls"), default=0)
    errors = models.PositiveBigIntegerField(
        _("errors"), default=0, help_text=_("Calls answered with a 5xx or not forwarded.")
    )
    total_duration_ms = models.PositiveBigIntegerField(default=0)
    last_status = models.PositiveSmallIntegerField(_("last status"), null=True, blank=True)
    last_called_at = models.DateTimeField(_("last called"), null=True, blank=True)
    # Latency histogram (calls per bucket, not cumulative; above the last: calls minus the sum).
    latency_le_5 = models.PositiveBigIntegerField(default=0, editable=False)
    latency_le_10 = models.PositiveBigIntegerField(default=0, editable=False)
    latency_le_25 = models.PositiveBigIntegerField(default=0, editable=False)
    latency_le_50 = models.PositiveBigIntegerField(default=0, editable=False)
    latency_le_100 = models.PositiveBigIntegerField(default=0, editable=False)
    latency_le_250 = models.PositiveBigIntegerField(default=0, editable=False)
    latency_le_500 = models.PositiveBigIntegerField(default=0, editable=False)
    latency_le_1000 = models.PositiveBigIntegerField(default=0, editable=False)
    latency_le_2500 = models.PositiveBigIntegerField(default=0, editable=False)
    latency_le_5000 = models.PositiveBigIntegerField(default=0, editable=False)
    latency_le_10000 = models.PositiveBigIntegerField(default=0, editable=False)

    class Meta:
        verbose_name = _("datasource usage")
        verbose_name_plural = _("datasource usage")

    def __str__(self) -> str:
        return f"Usage of {self.datasource_id}"


class UsageSample(models.Model):
    """A snapshot of a datasource's proxy counters (:class:`DatasourceUsage`), taken every few
    minutes by the ``sample_usage`` task; differences between snapshots give the calls, errors
    and latency per hour that the admin charts."""

    datasource = models.ForeignKey(
        Datasource,
        on_delete=models.CASCADE,
        related_name="usage_samples",
        verbose_name=_("datasource"),
    )
    taken_at = models.DateTimeField(_("taken at"), default=timezone.now)
    calls = models.PositiveBigIntegerField(_("proxied calls"), default=0)
    errors = models.PositiveBigIntegerField(_("errors"), default=0)
    total_duration_ms = models.PositiveBigIntegerField(_("total duration (ms)"), default=0)

    class Meta:
        verbose_name = _("usage sample")
        verbose_name_plural = _("usage samples")
        ordering = ["taken_at"]
        indexes = [models.Index(fields=["datasource", "taken_at"], name="ds_usage_sample_time")]

    def __str__(self) -> str:
        return f"Usage of {self.datasource_id} at {self.taken_at:%Y-%m-%d %H:%M}"


class UpstreamHealth(models.Model):
    """The database's copy of an upstream's shared health (rate limit, circuit breaker), used
    when no Redis is configured; see :mod:`datasources.calls.limits`. One row per datasource
    that has something to remember, changed under a row lock."""

    datasource = models.OneToOneField(
        Datasource, on_delete=models.CASCADE, primary_key=True, related_name="upstream_health"
    )
    rate_limited_until = models.DateTimeField(_("rate-limited until"), null=True, blank=True)
    failures = models.PositiveIntegerField(_("consecutive failures"), default=0)
    first_failure_at = models.DateTimeField(_("first failure of the run"), null=True, blank=True)
    open_until = models.DateTimeField(_("circuit open until"), null=True, blank=True)
    opened_at = models.DateTimeField(_("circuit opened at"), null=True, blank=True)
    probe_until = models.DateTimeField(_("probe under way until"), null=True, blank=True)

    class Meta:
        verbose_name = _("upstream health")
        verbose_name_plural = _("upstream health")

    def __str__(self) -> str:
        return f"Upstream health of {self.datasource_id}"


class ProxyCall(models.Model):
    """One proxied call, for the call log: who called which datasource, what method and path
    (never the query string, headers or bodies), the outcome and its cost. Written in batches
    (:mod:`datasources.proxy.calllog`), pruned after CALL_LOG_RETENTION_DAYS."""

    called_at = models.DateTimeField(_("time"), db_index=True)
    # No database constraints: the log outlives deleted datasources, keys and users (rows age
    # out with the retention), and deleting a datasource does not walk millions of log rows.
    # No index of its own either: ds_call_recent (below) starts with it, and every index is
    # written for every logged call.
    datasource = models.ForeignKey(
        Datasource,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        db_index=False,
        null=True,
        related_name="+",
        verbose_name=_("datasource"),
    )
    api_key = models.ForeignKey(
        ApiKey,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        null=True,
        blank=True,
        related_name="+",
        verbose_name=_("API key"),
    )
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        null=True,
        blank=True,
        related_name="+",
        verbose_name=_("user"),
        help_text=_("The signed-in user, or the user the API key acts for."),
    )
    end_user = models.CharField(
        _("end user"),
        max_length=255,
        blank=True,
        default="",
        help_text=_(
            "The end user of an application whose token served the call "
            "(X-Datasource-End-User); empty: the shared or a user's token."
        ),
    )
    method = models.CharField(_("method"), max_length=16)
    path = models.CharField(
        _("path"), max_length=1000, help_text=_("Below the base URL; never the query string.")
    )
    status = models.PositiveSmallIntegerField(_("status"))
    error = models.CharField(
        _("refused as"),
        max_length=40,
        blank=True,
        help_text=_(
            "The proxy's own answer (e.g. rate_limited, upstream_timeout); empty: the upstream's."
        ),
    )
    latency_ms = models.PositiveIntegerField(_("latency (ms)"))
    request_bytes = models.PositiveBigIntegerField(_("request bytes"), default=0)
    response_bytes = models.PositiveBigIntegerField(_("response bytes"), default=0)
    retries = models.PositiveSmallIntegerField(_("retries"), default=0)
    refreshed = models.BooleanField(
        _("refreshed"),
        default=False,
        help_text=_("The token was refreshed after an expired answer."),
    )

    class Meta:
        verbose_name = _("proxy call")
        verbose_name_plural = _("call log")
        ordering = ["-called_at", "-id"]
        indexes = [models.Index(fields=["datasource", "-called_at"], name="ds_call_recent")]

    def __str__(self) -> str:
        return f"{self.method} {self.path} → {self.status}"
