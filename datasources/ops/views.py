"""Operations endpoints: ``/healthz`` (database, broker) and ``/metrics`` (Prometheus text).

Metrics are read from the database, so every web process answers with the same totals no
matter which process did the work; the exception is what never reached the database (usage
counts and call-log rows dropped while it refused writes), which each process counts itself.
"""

from __future__ import annotations

import hmac
import time

from django.db import connection
from django.db.models import Count, Sum
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from ..calls import health, limits
from ..conf import app_settings
from ..models import LATENCY_BUCKETS_MS, Datasource, DatasourceUsage, Token, TokenEvent, TokenStatus
from . import counters


def check_database() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()
    return "ok"


def check_broker() -> str:
    from celery import current_app

    with current_app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=2)
    return "ok"


@never_cache
@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    results: dict[str, str] = {}
    healthy = True
    for name, check in (("database", check_database), ("broker", check_broker)):
        started = time.perf_counter()
        try:
            results[name] = check()
        except Exception as err:
            healthy = False
            results[name] = f"error: {type(err).__name__}"
        results[f"{name}_ms"] = f"{(time.perf_counter() - started) * 1000:.1f}"
    return JsonResponse(
        {"status": "ok" if healthy else "error", **results}, status=200 if healthy else 503
    )


def _allowed(request: HttpRequest) -> bool:
    expected = app_settings.METRICS_TOKEN
    header = request.META.get("HTTP_AUTHORIZATION", "")
    if expected and header.startswith("Bearer "):
        return hmac.compare_digest(header[7:].encode(), expected.encode())
    user = getattr(request, "user", None)
    return bool(user and user.is_authenticated and user.has_perm("datasources.view_datasource"))


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _upstream_health(lines: list[str], family) -> None:
    """Rate limits and circuit breakers from the shared store (every process sees the same)."""
    slugs = dict(Datasource.objects.values_list("pk", "slug"))
    try:
        records = health.store().read_many(slugs)
    except Exception:  # the store is away: report nothing rather than fail the scrape
        return
    family(
        "datasources_health_updates_dropped_total",
        "counter",
        "Upstream health updates given up after retrying under contention (should stay 0).",
    )
    lines.append(f"datasources_health_updates_dropped_total {health.store().dropped()}")
    now = time.time()
    states = {pk: records.get(pk, limits.CLEAN) for pk in slugs}
    family(
        "datasources_rate_limited_seconds",
        "gauge",
        "Seconds until the upstream's remembered rate limit lifts (0: not rate-limited).",
    )
    for pk, slug in slugs.items():
        until = states[pk].rate_limited_until
        left = max(0.0, until - now) if until else 0.0
        lines.append(f'datasources_rate_limited_seconds{{datasource="{_label(slug)}"}} {left:g}')
    family(
        "datasources_circuit_open",
        "gauge",
        "1 while the circuit breaker is open (calls refused, or one probe under way), else 0.",
    )
    for pk, slug in slugs.items():
        is_open = int(states[pk].open_until is not None)
        lines.append(f'datasources_circuit_open{{datasource="{_label(slug)}"}} {is_open}')
    family(
        "datasources_upstream_consecutive_failures",
        "gauge",
        "Consecutive upstream failures (5xx, connection errors, timeouts) counted by the breaker.",
    )
    for pk, slug in slugs.items():
        lines.append(
            f'datasources_upstream_consecutive_failures{{datasource="{_label(slug)}"}} '
            f"{states[pk].failures}"
        )


def _token_metrics(lines: list[str], family) -> None:
    """Tokens by status, the sweep's backlog, refreshes and recent token events."""
    family("datasources_tokens", "gauge", "Tokens by status.")
    by_status = dict(Token.objects.values_list("status").annotate(n=Count("pk")))
    for status in TokenStatus.values:
        lines.append(f'datasources_tokens{{status="{status}"}} {by_status.get(status, 0)}')

    family(
        "datasources_tokens_due",
        "gauge",
        "Tokens whose background refresh is due now and not yet claimed: the sweep's backlog "
        "(the sweep's own query).",
    )
    lines.append(f"datasources_tokens_due {Token.objects.due().count()}")

    family(
        "datasources_refreshes_total", "counter", "Successful refreshes and new grants (all time)."
    )
    total = Token.objects.aggregate(n=Sum("refresh_count"))["n"] or 0
    lines.append(f"datasources_refreshes_total {total}")

    family(
        "datasources_token_events",
        "gauge",
        "Token events by kind within the event retention period (refresh outcomes).",
    )
    events = dict(TokenEvent.objects.values_list("kind").annotate(n=Count("pk")))
    for kind in TokenEvent.Kind.values:
        lines.append(f'datasources_token_events{{kind="{kind}"}} {events.get(kind, 0)}')


def _proxy_metrics(lines: list[str], family) -> None:
    """Proxied calls, errors and the latency histogram, from the stored counters."""
    histograms = list(
        DatasourceUsage.objects.select_related("datasource").values_list(
            "datasource__slug",
            "calls",
            "errors",
            "total_duration_ms",
            *(f"latency_le_{le}" for le in LATENCY_BUCKETS_MS),
        )
    )
    rows = [row[:4] for row in histograms]
    family("datasources_proxy_calls_total", "counter", "Proxied calls by datasource.")
    lines += [
        f'datasources_proxy_calls_total{{datasource="{_label(s)}"}} {c}' for s, c, _, _ in rows
    ]
    family(
        "datasources_proxy_errors_total", "counter", "Proxied calls answered 5xx or not forwarded."
    )
    lines += [
        f'datasources_proxy_errors_total{{datasource="{_label(s)}"}} {e}' for s, _, e, _ in rows
    ]
    family(
        "datasources_proxy_duration_seconds",
        "histogram",
        "Proxy call duration by datasource (from the stored counters: the same in every process).",
    )
    for slug, calls, _, duration_ms, *buckets in histograms:
        label = _label(slug)
        cumulative = 0
        for le, count in zip(LATENCY_BUCKETS_MS, buckets, strict=True):
            cumulative += count
            lines.append(
                f'datasources_proxy_duration_seconds_bucket{{datasource="{label}",le="{le / 1000:g}"}} '
                f"{cumulative}"
            )
        lines.append(
            f'datasources_proxy_duration_seconds_bucket{{datasource="{label}",le="+Inf"}} {calls}'
        )
        lines.append(
            f'datasources_proxy_duration_seconds_sum{{datasource="{label}"}} {duration_ms / 1000:.3f}'
        )
        lines.append(f'datasources_proxy_duration_seconds_count{{datasource="{label}"}} {calls}')


def _dropped_metrics(lines: list[str], family) -> None:
    """What this process dropped because the database refused it for too long (the buffers
    were full): kept in memory, as it never reached the database (datasources/ops/counters.py)."""
    family(
        "datasources_usage_dropped_total",
        "counter",
        "Proxied calls whose usage counts this process dropped (database writes failing, "
        "buffer full).",
    )
    lines.append(f"datasources_usage_dropped_total {counters.value(counters.USAGE_DROPPED)}")
    family(
        "datasources_call_log_dropped_total",
        "counter",
        "Call-log rows this process dropped (database writes failing, buffer full).",
    )
    lines.append(f"datasources_call_log_dropped_total {counters.value(counters.CALL_LOG_DROPPED)}")
    family(
        "datasources_proxy_stale_served_total",
        "counter",
        "API-key and token lookups this process served from stale cache entries while the "
        "database was unavailable (PROXY_STALE_IF_ERROR).",
    )
    lines.append(f"datasources_proxy_stale_served_total {counters.value(counters.STALE_SERVED)}")


@never_cache
@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    if not _allowed(request):
        response = HttpResponse("forbidden\n", status=403, content_type="text/plain")
        response["WWW-Authenticate"] = "Bearer"
        return response
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")

    _token_metrics(lines, family)
    _proxy_metrics(lines, family)
    _upstream_health(lines, family)
    _dropped_metrics(lines, family)
    return HttpResponse(
        "\n".join(lines) + "\n", content_type="text/plain; version=0.0.4; charset=utf-8"
    )
