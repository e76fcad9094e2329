"""Admin: the low-code builder's UI. Actions call services and report with message_user."""

from __future__ import annotations

from django.contrib import admin, messages
from django.db import models
from django.db.models import Prefetch
from django.http import HttpRequest, HttpResponseNotAllowed, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import path
from django.utils import timezone
from django.utils.decorators import method_decorator
from django.utils.html import format_html, format_html_join
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext
from django.views.decorators.debug import sensitive_post_parameters

from . import apikeys, flow, presets, tokens, views
from .forms import ApiKeyForm, DatasourceForm
from .models import (
    API_KEY_PREFIX,
    ApiKey,
    Datasource,
    DatasourceUsage,
    Token,
    TokenEvent,
    TokenPlacement,
    TokenStatus,
)
from .proxy import cache as proxy_cache

_STATUS_COLOURS = {
    TokenStatus.ACTIVE: "#1a7f37",
    TokenStatus.REFRESHING: "#9a6700",
    TokenStatus.NOT_AUTHORIZED: "#57606a",
    TokenStatus.NEEDS_REAUTHORIZATION: "#cf222e",
}


#: Read-only status shown on the change page.
STATUS_FIELDS = (
    "status",
    "expires",
    "last_refreshed",
    "granted_scope",
    "last_error",
    "recent_events",
    "proxy_usage",
    "user_tokens",
)


def status_badge(token: Token | None):
    status = token.status if token else TokenStatus.NOT_AUTHORIZED
    if token and token.lease_expires_at and token.lease_expires_at > timezone.now():
        status = TokenStatus.REFRESHING  # a refresh holds the lease right now
    label = TokenStatus(status).label
    return format_html(
        '<strong class="datasource-status datasource-status-{}" style="color:{}">{}</strong>',
        status,
        _STATUS_COLOURS.get(status, "inherit"),
        label,
    )


def _token(obj: Datasource) -> Token | None:
    """The shared token, prefetched for list pages."""
    prefetched = getattr(obj, "shared_tokens", None)
    if prefetched is not None:
        return prefetched[0] if prefetched else None
    return obj.token if obj.pk else None


@admin.register(Datasource)
class DatasourceAdmin(admin.ModelAdmin):
    form = DatasourceForm
    formfield_overrides = {models.URLField: {"assume_scheme": "https"}}
    change_form_template = "admin/datasources/datasource/change_form.html"
    list_display = ("name", "slug", "grant_type", "status", "expires", "last_refreshed")
    list_filter = ("grant_type", "token_sharing", "tokens__status")
    search_fields = ("name", "slug", "base_url")
    prepopulated_fields = {"slug": ("name",)}
    actions = ("authorize_selected", "refresh_selected", "disconnect_selected")
    readonly_fields = STATUS_FIELDS
    fieldsets = (
        (
            _("Connection"),
            {
                "fields": (
                    "name",
                    "slug",
                    "base_url",
                    "grant_type",
                    "token_sharing",
                    "issuer",
                    "discover",
                    "authorization_url",
                    "access_token_url",
                )
            },
        ),
        (
            _("Client"),
            {
                "fields": (
                    "client_id",
                    "client_secret",
                    "clear_client_secret",
                    "scopes",
                    "scope_separator",
                    "client_authentication",
                    "use_pkce",
                )
            },
        ),
        (
            _("Token placement"),
            {"fields": ("token_placement", "header_prefix", "query_param_name")},
        ),
        (
            _("Calls to the API"),
            {
                "classes": ("collapse",),
                "fields": ("allowed_methods", "default_headers", "default_query_params"),
            },
        ),
        (
            _("Advanced"),
            {
                "classes": ("collapse",),
                "fields": (
                    "custom_auth_params",
                    "audience",
                    "resource",
                    "revocation_url",
                    "issuer_returns_iss",
                    "token_lifetime",
                    "expiry_status_codes",
                    "owner",
                ),
            },
        ),
        (_("Token status"), {"fields": STATUS_FIELDS}),
    )

    # --- read-only status --------------------------------------------------------------------

    @admin.display(description=_("status"), ordering="tokens__status")
    def status(self, obj: Datasource):
        return status_badge(_token(obj))

    @admin.display(description=_("expires"), ordering="tokens__expires_at")
    def expires(self, obj: Datasource):
        token = _token(obj)
        if not token or not token.access_token:
            return "—"
        if not token.expires_at:
            return _("no known expiry")
        when = timezone.localtime(token.expires_at)
        if not token.expiry_known:
            suffix = " (assumed: next refresh)"
        else:
            suffix = " (expired)" if token.is_expired() else ""
        return f"{when:%Y-%m-%d %H:%M:%S %Z}{suffix}"

    @admin.display(description=_("last refreshed"), ordering="tokens__last_refreshed_at")
    def last_refreshed(self, obj: Datasource):
        token = _token(obj)
        if not token or not token.last_refreshed_at:
            return "—"
        return f"{timezone.localtime(token.last_refreshed_at):%Y-%m-%d %H:%M:%S %Z}"

    @admin.display(description=_("granted scope"))
    def granted_scope(self, obj: Datasource):
        token = _token(obj)
        return (token.scope if token else "") or "—"

    @admin.display(description=_("last error"))
    def last_error(self, obj: Datasource):
        token = _token(obj)
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
            .prefetch_related(
                Prefetch(
                    "tokens", queryset=Token.objects.filter(user=None), to_attr="shared_tokens"
                )
            )
        )

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
        return f"{found.calls} calls, {found.errors} errors, {average:.1f} ms average{last}"

    # --- pages and buttons -------------------------------------------------------------------

    def get_urls(self):
        info = self.opts.app_label, self.opts.model_name
        return [
            path(
                "<int:pk>/authorize/",
                self.admin_site.admin_view(views.start_authorization),
                name="{}_{}_authorize".format(*info),
            ),
            path(
                "<int:pk>/refresh/",
                self.admin_site.admin_view(self.refresh_view),
                name="{}_{}_refresh".format(*info),
            ),
            path(
                "<int:pk>/disconnect/",
                self.admin_site.admin_view(self.disconnect_view),
                name="{}_{}_disconnect".format(*info),
            ),
            *super().get_urls(),
        ]

    @method_decorator(sensitive_post_parameters("client_secret"))
    def changeform_view(self, request, object_id=None, form_url="", extra_context=None):
        """Error reports never include the typed client secret."""
        return super().changeform_view(request, object_id, form_url, extra_context)

    def get_changeform_initial_data(self, request):
        initial = super().get_changeform_initial_data(request)
        preset = request.GET.get("preset")
        if preset:
            initial.update(presets.initial_for(preset))
        return initial

    def render_change_form(self, request, context, add=False, change=False, form_url="", obj=None):
        chosen = presets.all_presets().get(request.GET.get("preset", "")) if add else None
        context.update(
            presets=sorted(presets.all_presets().items(), key=lambda kv: kv[1]["label"])
            if add
            else (),
            preset=chosen,
        )
        token = _token(obj) if obj else None
        context.update(
            callback_url=flow.callback_url(request),
            token=token,
            no_refresh_token=views.no_refresh_token_warning(obj, token) if token else "",
            query_placement=bool(obj and obj.token_placement == TokenPlacement.QUERY),
        )
        return super().render_change_form(request, context, add, change, form_url, obj)

    def save_model(self, request, obj, form, change):
        if not change and obj.owner_id is None:
            obj.owner = request.user
        super().save_model(request, obj, form, change)
        metadata = getattr(form, "discovered", None)
        if metadata:
            messages.info(
                request,
                f"Endpoints filled from {metadata.issuer}'s metadata"
                f" (PKCE S256 {'supported' if metadata.pkce_s256 else 'not advertised'},"
                f" iss {'returned' if metadata.returns_iss else 'not returned'}).",
            )
        if change and form.credentials_changed:
            tokens.reset_after_reconfiguration(obj)
        if obj.token_placement == TokenPlacement.QUERY:
            messages.warning(
                request,
                _(
                    "The access token will be sent as a query parameter. RFC 9700 §4.3.2 advises "
                    "against this: URLs end up in server and proxy logs. Use the header unless "
                    "the API requires it."
                ),
            )

    def _post_only(self, request: HttpRequest, pk: int):
        if request.method != "POST":
            return None, HttpResponseNotAllowed(["POST"])
        obj = get_object_or_404(Datasource, pk=pk)
        if not self.has_change_permission(request, obj):
            from django.core.exceptions import PermissionDenied

            raise PermissionDenied
        return obj, None

    def refresh_view(self, request: HttpRequest, pk: int):
        obj, error = self._post_only(request, pk)
        if error:
            return error
        self._report_refresh(request, [obj])
        return HttpResponseRedirect(obj.get_admin_url())

    def disconnect_view(self, request: HttpRequest, pk: int):
        obj, error = self._post_only(request, pk)
        if error:
            return error
        self._disconnect(request, [obj])
        return HttpResponseRedirect(obj.get_admin_url())

    # --- actions -----------------------------------------------------------------------------

    @admin.action(description=_("Authorize the selected datasource"), permissions=["change"])
    def authorize_selected(self, request, queryset):
        if queryset.count() != 1:
            self.message_user(
                request, _("Select exactly one datasource to authorize."), messages.WARNING
            )
            return None
        return HttpResponseRedirect(queryset.get().get_authorize_url())

    @admin.action(description=_("Refresh tokens now"), permissions=["change"])
    def refresh_selected(self, request, queryset):
        self._report_refresh(request, list(queryset))

    @admin.action(description=_("Disconnect (revoke and delete tokens)"), permissions=["change"])
    def disconnect_selected(self, request, queryset):
        self._disconnect(request, list(queryset))

    def _report_refresh(self, request, datasources: list[Datasource]) -> None:
        done = 0
        for datasource in datasources:
            result = tokens.refresh_token(datasource, force=True)
            if result.outcome in ("refreshed", "fresh"):
                done += 1
            elif result.outcome == "skipped":
                self.message_user(
                    request,
                    f"“{datasource}”: {result.error or 'another refresh is in progress'}.",
                    messages.WARNING,
                )
            else:
                self.message_user(
                    request, f"“{datasource}”: refresh failed: {result.error}", messages.ERROR
                )
        if done:
            self.message_user(
                request,
                ngettext(
                    "Refreshed %(count)d datasource.", "Refreshed %(count)d datasources.", done
                )
                % {"count": done},
                messages.SUCCESS,
            )

    def _disconnect(self, request, datasources: list[Datasource]) -> None:
        for datasource in datasources:
            for problem in tokens.disconnect(datasource):
                self.message_user(request, f"“{datasource}”: {problem}", messages.WARNING)
        self.message_user(
            request,
            ngettext(
                "Disconnected %(count)d datasource.",
                "Disconnected %(count)d datasources.",
                len(datasources),
            )
            % {"count": len(datasources)},
            messages.SUCCESS,
        )

    def delete_model(self, request, obj):
        if obj.revocation_url:
            tokens.disconnect(obj)
        super().delete_model(request, obj)

    def delete_queryset(self, request, queryset):
        for obj in queryset.exclude(revocation_url=""):
            tokens.disconnect(obj)
        super().delete_queryset(request, queryset)


class ReadOnlyAdmin(admin.ModelAdmin):
    """Bookkeeping written by the services only."""

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Token)
class TokenAdmin(ReadOnlyAdmin):
    """Read-only bookkeeping; secret columns are not even listed."""

    list_display = (
        "datasource",
        "user",
        "status",
        "expires_at",
        "last_refreshed_at",
        "failure_count",
        "failure_kind",
        "refresh_count",
    )
    list_filter = ("status", "failure_kind")
    list_select_related = ("datasource", "user")
    search_fields = ("datasource__name", "datasource__slug")
    fields = (
        "datasource",
        "user",
        "status",
        "has_access_token",
        "has_refresh_token",
        "token_type",
        "scope",
        "expires_at",
        "expiry_known",
        "obtained_at",
        "last_refreshed_at",
        "last_attempt_at",
        "refresh_count",
        "failure_count",
        "failure_kind",
        "next_attempt_at",
        "retry_not_before",
        "outcome_unknown_at",
        "last_error",
    )
    readonly_fields = fields

    @admin.display(boolean=True, description=_("access token stored"))
    def has_access_token(self, obj: Token) -> bool:
        return obj.has_access_token

    @admin.display(boolean=True, description=_("refresh token stored"))
    def has_refresh_token(self, obj: Token) -> bool:
        return obj.has_refresh_token


@admin.register(TokenEvent)
class TokenEventAdmin(ReadOnlyAdmin):
    list_display = ("created_at", "datasource", "kind", "detail")
    list_filter = ("kind",)
    list_select_related = ("datasource",)
    search_fields = ("datasource__slug", "detail")
    date_hierarchy = "created_at"


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    """Keys are shown once, on the page right after creation; only a hash is stored. A new key
    may call nothing until datasources are chosen or "all datasources" is ticked."""

    form = ApiKeyForm
    list_display = ("name", "key_prefix", "scope", "user", "created_at", "last_used_at", "active")
    list_filter = ("revoked_at", "all_datasources")
    search_fields = ("name", "prefix")
    filter_horizontal = ("datasources",)
    readonly_fields = ("key_prefix", "created_at", "last_used_at", "revoked_at")
    actions = ("revoke_selected",)

    def get_fields(self, request, obj=None):
        fields = ["name", "all_datasources", "datasources", "user"]
        return fields if obj is None else ["key_prefix", *fields, *self.readonly_fields[1:]]

    @admin.display(description=_("key"))
    def key_prefix(self, obj: ApiKey) -> str:
        return f"{API_KEY_PREFIX}{obj.prefix}_…" if obj.prefix else "—"

    @admin.display(description=_("datasources"))
    def scope(self, obj: ApiKey) -> str:
        if obj.all_datasources:
            return _("all")
        slugs = ", ".join(ds.slug for ds in obj.datasources.all())
        return slugs or _("none")

    @admin.display(boolean=True, description=_("active"))
    def active(self, obj: ApiKey) -> bool:
        return obj.is_active

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("user").prefetch_related("datasources")

    def save_model(self, request, obj, form, change):
        if not change:
            request._datasources_new_api_key = apikeys.assign_new_key(obj)
        super().save_model(request, obj, form, change)

    def response_add(self, request, obj, post_url_continue=None):
        key = getattr(request, "_datasources_new_api_key", None)
        if key is None:
            return super().response_add(request, obj, post_url_continue)
        context = {
            **self.admin_site.each_context(request),
            "title": _("API key created"),
            "api_key": obj,
            "key": key,
            "opts": self.opts,
        }
        response = TemplateResponse(request, "admin/datasources/apikey/created.html", context)
        response["Cache-Control"] = "no-store"
        return response

    @admin.action(description=_("Revoke the selected keys"), permissions=["change"])
    def revoke_selected(self, request, queryset):
        count = queryset.filter(revoked_at__isnull=True).update(revoked_at=timezone.now())
        proxy_cache.forget()  # this process stops accepting them at once
        self.message_user(
            request,
            ngettext("Revoked %(count)d key.", "Revoked %(count)d keys.", count) % {"count": count},
            messages.SUCCESS,
        )
