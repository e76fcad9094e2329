"""Health at a glance: what the admin shows about a datasource (banners with the one action
that fixes each problem, time to expiry, the redirect URI that will be sent) and the proxy
calls, errors and latency of the last 24 hours as a small inline SVG chart.

The chart comes from :class:`~datasources.models.UsageSample` snapshots of the proxy counters
(taken every few minutes by the ``sample_usage`` task) plus the live counters for the hour in
progress, so it needs nothing from the proxy's hot path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from urllib.parse import urlsplit

from django.db.models import Count
from django.http import HttpRequest
from django.urls import NoReverseMatch, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from ..authorize import flow
from ..conf import app_settings
from ..models import (
    AuthorizationRequest,
    Datasource,
    DatasourceUsage,
    GrantType,
    Token,
    TokenEvent,
    TokenStatus,
    UsageSample,
)
from .explain import explain

#: How long snapshots are kept (beat takes one every DATASOURCES["USAGE_SAMPLE_INTERVAL"] s).
SAMPLE_RETENTION = timedelta(days=2)
HOURS = 24


# --- usage samples and the chart ---------------------------------------------------------------


def take_samples(now: datetime | None = None) -> int:
    """Snapshot every datasource's proxy counters; prune old snapshots. Returns rows written."""
    now = now or timezone.now()
    rows = [
        UsageSample(
            datasource_id=usage.datasource_id,
            taken_at=now,
            calls=usage.calls,
            errors=usage.errors,
            total_duration_ms=usage.total_duration_ms,
        )
        for usage in DatasourceUsage.objects.all()
    ]
    UsageSample.objects.bulk_create(rows)
    UsageSample.objects.filter(taken_at__lt=now - SAMPLE_RETENTION).delete()
    return len(rows)


def recent_samples(now: datetime | None = None):
    """The snapshots the 24-hour chart needs (one hour more, for the first difference)."""
    now = now or timezone.now()
    return UsageSample.objects.filter(taken_at__gte=now - timedelta(hours=HOURS + 1)).order_by(
        "taken_at", "pk"
    )


@dataclass
class Bucket:
    start: datetime
    calls: int = 0
    errors: int = 0
    duration_ms: int = 0

    @property
    def average_ms(self) -> float | None:
        return self.duration_ms / self.calls if self.calls else None


@dataclass
class Usage24h:
    buckets: list[Bucket] = field(default_factory=list)

    @property
    def calls(self) -> int:
        return sum(b.calls for b in self.buckets)

    @property
    def errors(self) -> int:
        return sum(b.errors for b in self.buckets)

    @property
    def average_ms(self) -> float | None:
        calls = self.calls
        return sum(b.duration_ms for b in self.buckets) / calls if calls else None

    def summary(self) -> str:
        if not self.calls:
            return "No proxied calls in the last 24 h."
        return (
            f"{self.calls} call{'s' if self.calls != 1 else ''}, {self.errors} "
            f"error{'s' if self.errors != 1 else ''}, {self.average_ms:.0f} ms average "
            "in the last 24 h"
        )


def hourly(
    samples: list[UsageSample], live: DatasourceUsage | None, now: datetime | None = None
) -> Usage24h:
    """Calls, errors and duration per hour for the last 24 hours (the last bucket is the hour in
    progress), from consecutive snapshots; a counter that went down was reset (a re-created
    datasource) and counts from zero."""
    now = now or timezone.now()
    current = now.replace(minute=0, second=0, microsecond=0)
    first = current - timedelta(hours=HOURS - 1)
    buckets = [Bucket(first + timedelta(hours=i)) for i in range(HOURS)]
    points = [(s.taken_at, s.calls, s.errors, s.total_duration_ms) for s in samples]
    if live is not None and (not points or points[-1][1:] != _counts(live)):
        points.append((now, *_counts(live)))
    for before, after in pairwise(points):
        if after[0] < first:
            continue
        calls, errors, duration = (after[i] - before[i] for i in (1, 2, 3))
        if calls < 0 or errors < 0 or duration < 0:
            calls, errors, duration = after[1], after[2], after[3]
        index = min(HOURS - 1, int((after[0] - first).total_seconds() // 3600))
        bucket = buckets[index]
        bucket.calls += calls
        bucket.errors += errors
        bucket.duration_ms += duration
    return Usage24h(buckets)


def _counts(usage: DatasourceUsage) -> tuple[int, int, int]:
    return usage.calls, usage.errors, usage.total_duration_ms


def usage_of(datasource: Datasource, now: datetime | None = None) -> Usage24h:
    """The 24-hour usage of one datasource (two queries)."""
    now = now or timezone.now()
    samples = list(recent_samples(now).filter(datasource=datasource))
    live = DatasourceUsage.objects.filter(datasource=datasource).first()
    return hourly(samples, live, now)


def _bar(bucket, x: float, bar: float, height: int, most: int) -> tuple:
    """One hour's bar of :func:`chart`: its geometry (calls, errors on top) and tooltip."""
    calls_h = height * bucket.calls / most
    errors_h = height * bucket.errors / most
    start = timezone.localtime(bucket.start)
    label = (
        f"{start:%H:%M}-{start + timedelta(hours=1):%H:%M}: {bucket.calls} calls, "
        f"{bucket.errors} errors"
        + (f", {bucket.average_ms:.0f} ms average" if bucket.average_ms is not None else "")
    )
    return (
        f"{x:.1f}",
        f"{height - calls_h:.1f}",
        f"{bar:.1f}",
        f"{calls_h:.1f}",
        f"{height - errors_h:.1f}",
        f"{errors_h:.1f}",
        label,
        bucket.calls,
        bucket.errors,
    )


def chart(usage: Usage24h, *, width: int = 240, height: int = 40) -> SafeString:
    """Calls per hour as bars (errors in red on top), the average latency as a line; every bar
    has a tooltip with its numbers. Inline SVG, no script."""
    gap = 1
    bar = (width - gap * (HOURS - 1)) / HOURS
    most = max((b.calls for b in usage.buckets), default=0) or 1
    slowest = max((b.average_ms or 0 for b in usage.buckets), default=0) or 1
    bars, line = [], []
    for i, bucket in enumerate(usage.buckets):
        x = i * (bar + gap)
        bars.append(_bar(bucket, x, bar, height, most))
        if bucket.average_ms is not None:
            y = height - height * 0.9 * bucket.average_ms / slowest
            line.append(f"{x + bar / 2:.1f},{y:.1f}")
    body = format_html_join(
        "",
        '<g class="usage-hour" data-calls="{7}" data-errors="{8}"><title>{6}</title>'
        '<rect x="{0}" y="{1}" width="{2}" height="{3}" fill="#8fb3d9"></rect>'
        '<rect x="{0}" y="{4}" width="{2}" height="{5}" fill="#cf222e"></rect>'
        '<rect x="{0}" y="0" width="{2}" height="' + str(height) + '" fill="transparent">'
        "</rect></g>",
        bars,
    )
    latency = (
        format_html(
            '<polyline class="usage-latency" points="{}" fill="none" stroke="#1f6feb" '
            'stroke-width="1.5"></polyline>',
            " ".join(line),
        )
        if len(line) > 1
        else ""
    )
    return format_html(
        '<svg class="usage-chart" role="img" aria-label="{}" width="{}" height="{}" '
        'viewBox="0 0 {} {}" style="background:#f6f8fa;border:1px solid #d0d7de;'
        'vertical-align:middle">'
        '<line x1="0" y1="{}" x2="{}" y2="{}" stroke="#d0d7de"></line>{}{}</svg>',
        usage.summary(),
        width,
        height,
        width,
        height,
        height - 0.5,
        width,
        height - 0.5,
        body,
        latency,
    )


# --- token health ----------------------------------------------------------------------------


def time_to_expiry(token: Token | None, now: datetime | None = None) -> str:
    """ "in 42 min", "expired 3 min ago", "no known expiry", or "—" without a token."""
    if token is None or not token.access_token:
        return "—"
    if token.expires_at is None:
        return "no known expiry"
    now = now or timezone.now()
    seconds = (token.expires_at - now).total_seconds()
    text = _duration(abs(seconds))
    if not token.expiry_known:
        return f"renewed in {text} (expiry assumed)" if seconds > 0 else "renewal due"
    return f"in {text}" if seconds > 0 else f"expired {text} ago"


def ago(when: datetime, now: datetime | None = None) -> str:
    """ "5 min ago"."""
    seconds = ((now or timezone.now()) - when).total_seconds()
    return "just now" if seconds < 5 else f"{_duration(seconds)} ago"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{int(seconds)} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{round(seconds / 86400)} days"


@dataclass
class Action:
    label: str
    url: str
    #: "get": a link; "post": a button in a small form of its own (CSRF protected).
    method: str = "get"
    css: str = ""


@dataclass
class Banner:
    level: str  # success, info, warning, error
    key: str  # css hook: datasource-banner-<key>
    text: str
    explanation: str = ""
    action: Action | None = None


def _actions(datasource: Datasource) -> dict[str, Action]:
    pk = datasource.pk
    return {
        "authorize": Action(
            "Authorize",
            reverse("admin:datasources_datasource_authorize", args=[pk]),
            css="datasource-banner-authorize",
        ),
        "reauthorize": Action(
            "Re-authorize",
            reverse("admin:datasources_datasource_authorize", args=[pk]),
            css="datasource-banner-reauthorize",
        ),
        "refresh": Action(
            "Refresh now",
            reverse("admin:datasources_datasource_refresh", args=[pk]),
            method="post",
            css="datasource-banner-refresh",
        ),
        "fetch": Action(
            "Get a token now",
            reverse("admin:datasources_datasource_refresh", args=[pk]),
            method="post",
            css="datasource-banner-refresh",
        ),
        "test": Action(
            "Test a call",
            reverse("admin:datasources_datasource_test", args=[pk]),
            css="datasource-banner-test",
        ),
    }


def banners(datasource: Datasource, token: Token | None) -> list[Banner]:
    """What the builder must know about the shared token, most urgent first, each with the one
    action that fixes it."""
    from ..authorize.views import no_refresh_token_warning

    if datasource.per_user:
        return [per_user_summary(datasource)]
    actions = _actions(datasource)
    status = token.status if token else TokenStatus.NOT_AUTHORIZED
    found = [*_status_banners(datasource, token, actions), *_renewal_banners(token, actions)]
    found += upstream_banners(datasource, actions["test"])
    found += scope_banners(datasource, token, actions)
    missing = no_refresh_token_warning(datasource, token) if token else ""
    if missing:
        found.append(Banner("warning", "no-refresh-token", missing, action=actions["reauthorize"]))
    found += _owner_banners(datasource)
    if not [b for b in found if b.key != "no-owner-email"] and status == TokenStatus.ACTIVE:
        found.append(
            Banner(
                "success",
                "healthy",
                f"Active. The access token expires {time_to_expiry(token)} and is renewed "
                "automatically before then.",
                action=actions["test"],
            )
        )
    return found


def _status_banners(
    datasource: Datasource, token: Token | None, actions: dict[str, Action]
) -> list[Banner]:
    """Needs re-authorization, or not connected yet: said differently when a person signs in
    (authorization code) and when the credentials alone get tokens."""
    code_grant = datasource.grant_type == GrantType.AUTHORIZATION_CODE
    status = token.status if token else TokenStatus.NOT_AUTHORIZED
    error = token.last_error if token else ""
    if status == TokenStatus.NEEDS_REAUTHORIZATION:
        if code_grant:
            words = (
                "This datasource needs re-authorization: API calls through it fail until "
                "someone grants access again."
            )
        else:
            words = "The provider refuses to issue tokens for these credentials."
        action = actions["reauthorize" if code_grant else "fetch"]
        return [Banner("error", "reauthorization", words, explain(error) or error, action)]
    if status != TokenStatus.NOT_AUTHORIZED:
        return []
    if code_grant:
        return [
            Banner(
                "info",
                "not-authorized",
                "Not connected yet. Register the redirect URI below at the provider, then "
                "authorize: you sign in at the provider and grant access once.",
                action=actions["authorize"],
            )
        ]
    return [
        Banner(
            "info",
            "not-authorized",
            "No token yet. One is fetched with the credentials (no sign-in) when you save, "
            "on the first call, or now.",
            explain(error),
            actions["fetch"],
        )
    ]


def _renewal_banners(token: Token | None, actions: dict[str, Action]) -> list[Banner]:
    """Renewal failing while the token is kept: because of the settings, or for now."""
    if token is None:
        return []
    error = token.last_error
    if token.failure_kind == "configuration":
        return [
            Banner(
                "error",
                "configuration",
                f"Renewing the token fails because of the settings: {error}. The current token "
                "is kept and used while it lasts; the refresh is retried.",
                explain(error) or "Fix the datasource's settings below, save, then Refresh now.",
                actions["refresh"],
            )
        ]
    if token.failure_kind == "transient":
        when = (
            f" Next automatic attempt at {timezone.localtime(token.next_attempt_at):%H:%M:%S}."
            if token.next_attempt_at
            else ""
        )
        return [
            Banner(
                "warning",
                "transient",
                f"Renewing the token is failing for now ({error}). The token is kept and used "
                f"while it lasts; the refresh is retried automatically.{when}",
                explain(error),
                actions["refresh"],
            )
        ]
    return []


def scope_banners(
    datasource: Datasource, token: Token | None, actions: dict[str, Action]
) -> list[Banner]:
    """The API refused a call for lack of scope since the token was last granted
    (``WWW-Authenticate: Bearer error="insufficient_scope"``, see
    :mod:`datasources.calls.scopes`): which scope, and how to get it granted."""
    if token is None or token.status != TokenStatus.ACTIVE:
        return []
    from ..calls import scopes

    code_grant = datasource.grant_type == GrantType.AUTHORIZATION_CODE
    # Scopes are granted by an authorization (a person), or by each new machine-grant token.
    granted = token.obtained_at if code_grant else token.last_refreshed_at
    refusals = datasource.events.filter(kind=TokenEvent.Kind.SCOPE_REFUSED)
    if granted is not None:
        refusals = refusals.filter(created_at__gt=granted)
    refusal = refusals.first()
    if refusal is None:
        return []
    needed = scopes.needed_scope(refusal.detail)
    what = f"the scope {needed}" if needed else "a scope it did not name"
    then = "Re-authorize so that it is granted" if code_grant else "get a new token"
    return [
        Banner(
            "warning",
            "scope-refused",
            f"The API refused a call {ago(refusal.created_at)} because the token lacks {what}. "
            f"A refresh cannot add a scope: add it under “Scope(s)”, save, then {then}.",
            action=actions["reauthorize"] if code_grant else actions["fetch"],
        )
    ]


def _owner_banners(datasource: Datasource) -> list[Banner]:
    """Nobody would be emailed when the datasource needs re-authorization."""
    owner = datasource.owner
    if owner is not None and owner.email:
        return []
    return [
        Banner(
            "info",
            "no-owner-email",
            "Nobody is emailed when this datasource needs re-authorization: "
            + (
                f"its owner {owner.get_username()} has no email address."
                if owner is not None
                else "it has no owner (Advanced)."
            ),
            action=_user_action(owner),
        )
    ]


def upstream_state(datasource: Datasource) -> tuple[str, str]:
    """(key, plain words) for the upstream's shared health: ``ok``, ``rate-limited``,
    ``circuit-open``, ``half-open`` or ``failing``."""
    from ..calls import health

    record = health.current(datasource.pk)
    now = time.time()
    if record.rate_limited_until and record.rate_limited_until > now:
        until = datetime.fromtimestamp(record.rate_limited_until, UTC)
        return "rate-limited", (
            f"rate-limited until {timezone.localtime(until):%H:%M:%S} "
            f"({_seconds(record.rate_limited_until - now)})"
        )
    if record.open_until is not None:
        if record.open_until > now:
            until = datetime.fromtimestamp(record.open_until, UTC)
            return "circuit-open", (
                f"circuit open until {timezone.localtime(until):%H:%M:%S} "
                f"after {record.failures} failures in a row"
            )
        return (
            "half-open",
            f"circuit half-open: the next call tests the API ({record.failures} failures in a row)",
        )
    if record.failures:
        return "failing", f"{record.failures} failures in a row"
    return "ok", "ok"


def _seconds(value: float) -> str:
    seconds = max(1, int(value + 0.999))
    return f"{seconds} s" if seconds < 120 else f"{seconds // 60} min"


def upstream_banners(datasource: Datasource, test: Action) -> list[Banner]:
    """The API asked for a pause, or has been failing: what callers get meanwhile."""
    key, words = upstream_state(datasource)
    if key == "rate-limited":
        return [
            Banner(
                "warning",
                "rate-limited",
                f"The API said its rate limit is used up: calls through the proxy are answered "
                f"429 at once, without calling it, until then ({words}).",
                action=test,
            )
        ]
    if key in ("circuit-open", "half-open"):
        return [
            Banner(
                "error",
                "circuit-open",
                f"The API keeps failing, so calls through the proxy are answered 503 at once "
                f"({words}). After the cooldown one call tests it; a success lets calls through "
                "again.",
                action=test,
            )
        ]
    return []


def _user_action(user) -> Action | None:
    if user is None:
        return None
    try:
        url = reverse(
            f"admin:{user._meta.app_label}_{user._meta.model_name}_change", args=[user.pk]
        )
    except NoReverseMatch:  # a user model the admin does not show
        return None
    return Action("Set an email address", url, css="datasource-owner-email")


def per_user_summary(datasource: Datasource) -> Banner:
    counts = dict(
        Token.objects.filter(datasource=datasource, user__isnull=False)
        .values_list("status")
        .annotate(n=Count("pk"))
        .values_list("status", "n")
    )
    active = counts.get(TokenStatus.ACTIVE, 0)
    dead = counts.get(TokenStatus.NEEDS_REAUTHORIZATION, 0)
    connect = reverse("datasources:connect", args=[datasource.slug])
    text = (
        f"Per-user tokens: {active} user{'s' if active != 1 else ''} connected"
        + (f", {dead} need{'s' if dead == 1 else ''} to reconnect" if dead else "")
        + ". Each user connects their own account; the proxy calls the API as the calling user."
    )
    return Banner(
        "error" if dead and not active else "info",
        "per-user",
        text,
        f"Users connect (and reconnect) at {connect} while signed in.",
        Action("Connect my account", connect, css="datasource-connect"),
    )


def redirect_uri_notes(request: HttpRequest, datasource: Datasource | None) -> list[str]:
    """Warnings about the redirect URI this page would send."""
    sent = flow.callback_url(request)
    opened = f"{request.scheme}://{request.get_host()}"
    public = (app_settings.PUBLIC_BASE_URL or "").rstrip("/")
    notes = []
    if public and _origin(public) != _origin(opened):
        notes.append(
            f"DATASOURCES_PUBLIC_BASE_URL is {public}, but this page was opened at {opened}. "
            f"The provider sends you back to {public}, where you may not be signed in (the "
            f"authorization would fail): open the admin at {public}/admin/ to authorize."
        )
    if datasource is not None and datasource.pk:
        last = (
            AuthorizationRequest.objects.filter(datasource=datasource, used_at__isnull=False)
            .order_by("-used_at")
            .values_list("redirect_uri", flat=True)
            .first()
        )
        if last and last != sent:
            notes.append(
                f"The last authorization of this datasource used {last}, but this page would "
                f"send {sent}. Providers accept only the exact redirect URIs registered with "
                f"them: open the admin at the address used before, register this one too, or "
                "set DATASOURCES_PUBLIC_BASE_URL so the address no longer matters."
            )
    if not public and not notes:
        notes.append(
            "This redirect URI follows the address this page was opened at (localhost and "
            "127.0.0.1 differ); set DATASOURCES_PUBLIC_BASE_URL to make it fixed."
        )
    return notes


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc.lower()
