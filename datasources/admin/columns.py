"""The datasource list's columns and the change page's read-only status: what the builder sees
of each datasource's token, usage and keys, loaded with a fixed number of queries per page."""

from __future__ import annotations

from datetime import timedelta

from django.contrib import admin
from django.contrib.admin.views.main import ChangeList
from django.db.models import OuterRef, Prefetch, Subquery
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext

from ..authserver import keys
from ..models import Datasource, DatasourceUsage, Token, TokenEvent, TokenStatus, UsageSample
from . import dashboard
from .buttons import connections_url

_STATUS_COLOURS = {
    TokenStatus.ACTIVE: "#1a7f37",
    TokenStatus.REFRESHING: "#9a6700",
    TokenStatus.NOT_AUTHORIZED: "#57606a",
    TokenStatus.NEEDS_REAUTHORIZATION: "#cf222e",
}


def status_badge(token: Token | None, datasource: Datasource | None = None):
    if datasource is not None and datasource.per_user:
        return format_html(
            '<strong class="datasource-status datasource-status-per-user">{}</strong>',
            _("Per user"),
        )
    status = token.status if token else TokenStatus.NOT_AUTHORIZED
    if token and token.lease_expires_at and token.lease_expires_at > timezone.now():
        status = TokenStatus.REFRESHING  # a refresh holds the lease right now
    label = TokenStatus(status).label
    trouble = ""
    if token and status == TokenStatus.ACTIVE and token.failure_kind:
        trouble = (
            " (renewal failing: settings)"
            if token.failure_kind == "configuration"
            else " (renewal failing: retrying)"
        )
    colour = "#9a6700" if trouble else _STATUS_COLOURS.get(status, "inherit")
    return format_html(
        '<strong class="datasource-status datasource-status-{}" style="color:{}">{}{}</strong>',
        status,
        colour,
        label,
        trouble,
    )


def shared_token(obj: Datasource) -> Token | None:
    """The shared token, prefetched for list pages."""
    prefetched = getattr(obj, "shared_tokens", None)
    if prefetched is not None:
        return prefetched[0] if prefetched else None
    return obj.token if obj.pk else None


def _shared(field: str) -> Subquery:
    """One column of the shared token, for sorting the list without joining every token (a
    join would list a per-user datasource once per user token)."""
    return Subquery(Token.objects.shared().filter(datasource=OuterRef("pk")).values(field)[:1])


class SharedStatusFilter(admin.SimpleListFilter):
    title = _("status")
    parameter_name = "status"

    def lookups(self, request, model_admin):
        return [*TokenStatus.choices, ("per_user", _("Per user"))]

    def queryset(self, request, queryset):
        value = self.value()
        if value == "per_user":
            return queryset.filter(token_sharing="per_user")
        if value:
            return queryset.exclude(token_sharing="per_user").filter(shared_status=value)
        return queryset


class HealthChangeList(ChangeList):
    """The list page loads each row's 24-hour usage snapshots with one query for the page."""

    def get_results(self, request):
        super().get_results(request)
        since = timezone.now() - timedelta(hours=dashboard.HOURS + 1)
        rows = list(self.result_list)
        ids = [row.pk for row in rows]
        samples: dict[int, list[UsageSample]] = {pk: [] for pk in ids}
        for sample in UsageSample.objects.filter(
            datasource_id__in=ids, taken_at__gte=since
        ).order_by("taken_at", "pk"):
            samples[sample.datasource_id].append(sample)
        live = {u.datasource_id: u for u in DatasourceUsage.objects.filter(datasource_id__in=ids)}
        for row in rows:
            row.recent_samples = samples[row.pk]
            row.live_usage = live.get(row.pk)


class DatasourceColumns:
    """Mixin of DatasourceAdmin: the list columns and read-only displays, and the queryset and
    change list that load what they show for a whole page at once."""

    @admin.display(description=_("status"), ordering="shared_status")
    def status(self, obj: Datasource):
        return status_badge(shared_token(obj), obj)

    @admin.display(description=_("expires"), ordering="shared_expires_at")
    def expires(self, obj: Datasource):
        if obj.per_user:
            return _("per user")
        token = shared_token(obj)
        if not token or not token.access_token:
            return "—"
        if not token.expires_at:
            return _("no known expiry")
        when = timezone.localtime(token.expires_at)
        return format_html(
            '<span title="{}">{}</span>',
            f"{when:%Y-%m-%d %H:%M:%S %Z}",
            dashboard.time_to_expiry(token),
        )

    @admin.display(description=_("last refreshed"), ordering="shared_last_refreshed_at")
    def last_refreshed(self, obj: Datasource):
        token = shared_token(obj)
        if obj.per_user or not token or not token.last_refreshed_at:
            return "—"
        return format_html(
            '<span title="{}">{}</span>',
            f"{timezone.localtime(token.last_refreshed_at):%Y-%m-%d %H:%M:%S %Z}",
            dashboard.ago(token.last_refreshed_at),
        )

    @admin.display(description=_("last error"))
    def last_error_short(self, obj: Datasource):
        token = shared_token(obj)
        if obj.per_user or not token or not token.last_error:
            return "—"
        text = token.last_error
        return format_html(
            '<span title="{}">{}</span>', text, text if len(text) <= 80 else text[:77] + "…"
        )

    @admin.display(description=_("proxy calls, 24 h"))
    def usage_24h(self, obj: Datasource):
        samples = getattr(obj, "recent_samples", None)
        if samples is None:
            usage = dashboard.usage_of(obj)
        else:
            usage = dashboard.hourly(samples, getattr(obj, "live_usage", None))
        return format_html(
            '{}<br><small class="datasource-usage-summary">{}</small>',
            dashboard.chart(usage, width=120, height=24),
            usage.summary(),
        )

    @admin.display(description=_("public key (register at the provider)"))
    def public_key(self, obj: Datasource):
        found = keys.public_key_of(obj) if obj and obj.pk else None
        if found is None:
            return "—"
        parts = [
            format_html(
                '<p>{}</p><pre class="datasource-public-jwk">{}</pre>',
                _("JWK (key ID %(kid)s, %(alg)s):")
                % {"kid": found.kid or "—", "alg": found.algorithm},
                found.jwk,
            ),
            format_html(
                '<p>{}</p><pre class="datasource-public-pem">{}</pre>', _("PEM:"), found.pem
            ),
        ]
        if found.certificate:
            parts.append(
                format_html(
                    '<p>{}</p><pre class="datasource-certificate">{}</pre>',
                    _("Certificate (upload it where the provider asks for one, e.g. Entra ID):"),
                    found.certificate,
                )
            )
        return format_html_join("", "{}", ((part,) for part in parts))

    @admin.display(description=_("key pair"))
    def key_pair(self, obj: Datasource):
        label = _("Replace with a new key pair") if obj.private_key else _("Generate key pair")
        return format_html(
            '<button type="submit" class="button datasource-generate-key" '
            'form="datasource-generate-key-form">{}</button> <span class="help">{}</span>',
            label,
            _(
                "Makes a new private key (kept encrypted here) with a certificate; register "
                "the public key or certificate shown here at the provider."
            ),
        )

    @admin.display(description=_("DPoP key"))
    def dpop_key(self, obj: Datasource):
        if not obj.pk or not obj.dpop_private_key:
            return _("Generated when DPoP is turned on and the datasource is saved.")
        token = shared_token(obj)
        bound = token.token_type if token and token.access_token else "—"
        return format_html(
            '<p>{} <code class="datasource-dpop-jkt">{}</code></p>'
            "<p>{} <strong>{}</strong></p>"
            '<details><summary>{}</summary><pre class="datasource-dpop-jwk">{}</pre></details>'
            '<p><button type="submit" class="button datasource-dpop-regenerate" '
            'form="datasource-dpop-regenerate-form">{}</button></p>',
            _("Public key thumbprint (RFC 7638, the cnf.jkt of bound tokens):"),
            obj.dpop_jkt,
            _("Type of the current token:"),
            bound,
            _("Public key (JWK)"),
            obj.dpop_public_jwk,
            _("Regenerate DPoP key"),
        )

    @admin.display(description=_("upstream"))
    def upstream(self, obj: Datasource):
        key, words = dashboard.upstream_state(obj)
        return format_html(
            '<span class="datasource-upstream datasource-upstream-{}">{}</span>', key, words
        )

    @admin.display(description=_("granted scope"))
    def granted_scope(self, obj: Datasource):
        token = shared_token(obj)
        return (token.scope if token else "") or "—"

    @admin.display(description=_("last error"))
    def last_error(self, obj: Datasource):
        token = shared_token(obj)
        if not token or not token.last_error:
            return "—"
        retry = (
            f" (next attempt {timezone.localtime(token.next_attempt_at):%H:%M:%S})"
            if token.next_attempt_at
            else ""
        )
        if token.failure_kind == "configuration":
            return format_html(
                '<strong class="datasource-configuration-error" style="color:#cf222e">{}</strong>{}',
                token.last_error,
                retry,
            )
        return f"{token.last_error}{retry}"

    @admin.display(description=_("recent events"))
    def recent_events(self, obj: Datasource):
        if not obj.pk:
            return "—"
        events = TokenEvent.objects.filter(datasource=obj)[:10]
        if not events:
            return "—"
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (
                    f"{timezone.localtime(e.created_at):%Y-%m-%d %H:%M:%S}",
                    e.get_kind_display(),
                    e.detail,
                )
                for e in events
            ),
        )
        return format_html('<table class="datasource-events">{}</table>', rows)

    @admin.display(description=_("end users' connections"))
    def end_user_connections(self, obj: Datasource):
        """How many end users connected (through connect links), and the way to the list where
        they are searched, filtered and disconnected."""
        if not obj.pk or obj.grant_type != "authorization_code":
            return "—"
        count = Token.objects.filter(datasource=obj).of_end_users().count()
        if not count:
            return _("No end user has connected (connect links: docs/api.md).")
        return format_html(
            '{} · <a class="datasource-connections-link" href="{}">{}</a>',
            ngettext("%(n)d end user connected", "%(n)d end users connected", count) % {"n": count},
            connections_url(obj),
            _("View, search and disconnect"),
        )

    @admin.display(description=_("per-user tokens"))
    def user_tokens(self, obj: Datasource):
        if not obj.pk or not obj.per_user:
            return "— (shared)"
        rows = Token.objects.filter(datasource=obj, user__isnull=False).select_related("user")
        if not rows:
            return "No user has authorized yet."
        return format_html(
            '<table class="datasource-user-tokens">{}</table>',
            format_html_join(
                "",
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                (
                    (
                        t.user.get_username(),
                        t.get_status_display(),
                        f"{timezone.localtime(t.expires_at):%Y-%m-%d %H:%M:%S}"
                        if t.expires_at
                        else "—",
                    )
                    for t in rows
                ),
            ),
        )

    def get_queryset(self, request):
        return (
            super()
            .get_queryset(request)
            .annotate(
                shared_status=_shared("status"),
                shared_expires_at=_shared("expires_at"),
                shared_last_refreshed_at=_shared("last_refreshed_at"),
            )
            .prefetch_related(
                Prefetch("tokens", queryset=Token.objects.shared(), to_attr="shared_tokens")
            )
        )

    def get_changelist(self, request, **kwargs):
        return HealthChangeList

    @admin.display(description=_("proxy usage"))
    def proxy_usage(self, obj: Datasource):
        found = DatasourceUsage.objects.filter(datasource=obj).first() if obj.pk else None
        if not found or not found.calls:
            return "No proxied calls yet."
        average = found.total_duration_ms / found.calls
        last = (
            f", last {found.last_status} at {timezone.localtime(found.last_called_at):%Y-%m-%d %H:%M:%S}"
            if found.last_called_at
            else ""
        )
        return f"{found.calls} calls, {found.errors} errors, {average:.1f} ms average in all{last}"
