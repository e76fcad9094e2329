"""Admin: the low-code builder's UI. Actions call services and report with message_user."""

from __future__ import annotations

import json
from functools import partial

from django.contrib import admin, messages
from django.db import models, transaction
from django.http import HttpResponseRedirect
from django.urls import path, reverse
from django.utils import timezone
from django.utils.decorators import method_decorator
from django.utils.html import format_html
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext
from django.views.decorators.debug import sensitive_post_parameters

from .. import tokens
from ..authorize import flow, views
from ..authserver import keys
from ..models import (
    API_KEY_PREFIX,
    MTLS_METHODS,
    PERMISSIONS,
    ApiKey,
    ConnectSession,
    Datasource,
    GrantType,
    ProxyCall,
    Token,
    TokenEvent,
    TokenPlacement,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookEvent,
)
from ..proxy import apikeys
from ..proxy import cache as proxy_cache
from ..webhooks import delivery as webhook_delivery
from ..webhooks import endpoints as webhook_endpoints
from . import apikey_views, dashboard, presets, webhook_views
from . import buttons as admin_views
from . import fieldsets as layout
from .columns import DatasourceColumns, SharedStatusFilter, shared_token, status_badge
from .forms import ApiKeyForm, DatasourceForm, WebhookEndpointForm


def _par_support(metadata) -> str:
    if metadata.require_pushed_authorization_requests:
        return "required"
    return "supported" if metadata.pushed_authorization_request_endpoint else "not offered"


def _sender_constraint_notes(metadata, obj: Datasource) -> list[str]:
    """What discovery says about DPoP and mutual TLS that the builder may want to act on."""
    notes = []
    algs = metadata.dpop_signing_alg_values_supported
    if algs and not obj.use_dpop:
        notes.append(
            f"The server supports DPoP ({', '.join(algs)}): tick “DPoP” under "
            "“Sender-constrained tokens” to bind tokens to a key of this datasource."
        )
    if metadata.mtls_endpoint_aliases and (
        obj.client_authentication in MTLS_METHODS or obj.certificate_bound_tokens
    ):
        notes.append("Its mutual-TLS endpoint aliases are used for calls with the certificate.")
    if metadata.tls_client_certificate_bound_access_tokens and not obj.certificate_bound_tokens:
        notes.append("It can bind tokens to a TLS client certificate (RFC 8705).")
    return notes


@admin.register(Datasource)
class DatasourceAdmin(DatasourceColumns, admin.ModelAdmin):
    form = DatasourceForm
    formfield_overrides = {models.URLField: {"assume_scheme": "https"}}
    change_form_template = "admin/datasources/datasource/change_form.html"
    # Health first (a narrow screen scrolls the table sideways), configuration last.
    list_display = (
        "name",
        "status",
        "expires",
        "usage_24h",
        "upstream",
        "last_refreshed",
        "last_error_short",
        "grant_type",
        "slug",
    )
    list_filter = ("grant_type", "token_sharing", SharedStatusFilter)
    search_fields = ("name", "slug", "base_url")
    prepopulated_fields = {"slug": ("name",)}
    actions = ("authorize_selected", "refresh_selected", "disconnect_selected")
    readonly_fields = layout.readonly_fields()
    # One fieldset per group of settings (datasources.models.groups), with the admin's rows.
    fieldsets = layout.datasource_fieldsets()

    class Media:
        js = ("datasources/datasource_form.js",)
        css = {"all": ("datasources/admin.css",)}

    def get_fieldsets(self, request, obj=None):
        stored = bool(obj and obj.pk and obj.client_secret)
        key_stored = bool(obj and obj.pk and obj.private_key)
        hidden = set()
        if not stored:
            hidden.add("clear_client_secret")
        if not key_stored:
            hidden |= {"clear_private_key", "public_key"}
        if obj is None or not obj.pk:
            hidden.add("key_pair")  # the button posts to the saved datasource
        if not (obj and obj.pk and obj.tls_client_certificate):
            hidden.add("clear_tls_client_certificate")
        fieldsets = []
        for name, options in super().get_fieldsets(request, obj):
            if obj is None and name == _("Token status"):
                continue  # nothing to show before the first save
            fields = tuple(f for f in options["fields"] if f not in hidden)
            fieldsets.append((name, {**options, "fields": fields}))
        return fieldsets

    def get_form(self, request, obj=None, change=False, **kwargs):
        form = super().get_form(request, obj, change, **kwargs)
        form.request = request  # the session keeps a typed secret across validation errors
        return form

    # --- pages and buttons -------------------------------------------------------------------

    def get_urls(self):
        info = self.opts.app_label, self.opts.model_name
        wrap = self.admin_site.admin_view
        return [
            path(
                "<int:pk>/authorize/",
                wrap(views.start_authorization),
                name="{}_{}_authorize".format(*info),
            ),
            path(
                "<int:pk>/refresh/",
                wrap(admin_views.RefreshView.as_view(model_admin=self)),
                name="{}_{}_refresh".format(*info),
            ),
            path(
                "<int:pk>/disconnect/",
                wrap(admin_views.DisconnectView.as_view(model_admin=self)),
                name="{}_{}_disconnect".format(*info),
            ),
            path(
                "<int:pk>/connections/<path:end_user>/disconnect/",
                wrap(admin_views.EndUserDisconnectView.as_view(model_admin=self)),
                name="{}_{}_disconnect_end_user".format(*info),
            ),
            path(
                "<int:pk>/generate-key/",
                wrap(admin_views.GenerateKeyView.as_view(model_admin=self)),
                name="{}_{}_generate_key".format(*info),
            ),
            path(
                "<int:pk>/dpop-key/",
                wrap(admin_views.RegenerateDPoPKeyView.as_view(model_admin=self)),
                name="{}_{}_dpop_key".format(*info),
            ),
            path(
                "<int:pk>/test/",
                wrap(admin_views.TestCallView.as_view(model_admin=self)),
                name="{}_{}_test".format(*info),
            ),
            *super().get_urls(),
        ]

    @method_decorator(
        sensitive_post_parameters("client_secret", "private_key", "service_account_key")
    )
    def changeform_view(self, request, object_id=None, form_url="", extra_context=None):
        """Error reports never include the typed client secret."""
        return super().changeform_view(request, object_id, form_url, extra_context)

    def get_changeform_initial_data(self, request):
        initial = super().get_changeform_initial_data(request)
        initial.pop("preset", None)
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
            callback_url=flow.callback_url(request),
            redirect_notes=dashboard.redirect_uri_notes(request, obj),
            show_save_and_authorize=True,
            field_rules=layout.field_rules(),
        )
        if obj is not None and obj.pk:
            token = shared_token(obj)
            usage = dashboard.usage_of(obj)
            context.update(
                token=token,
                status_badge=status_badge(token, obj),
                time_to_expiry=dashboard.time_to_expiry(token),
                banners=dashboard.banners(obj, token),
                usage=usage,
                usage_chart=dashboard.chart(usage, width=288, height=36),
                query_placement=obj.token_placement == TokenPlacement.QUERY,
            )
        return super().render_change_form(request, context, add, change, form_url, obj)

    def save_model(self, request, obj, form, change):
        if not change and obj.owner_id is None:
            obj.owner = request.user
        if form.cleaned_data.get("generate_private_key"):
            keys.generate_key_pair(obj, form.cleaned_data.get("signing_algorithm") or "")
            messages.info(
                request,
                _(
                    "A new key pair was generated: register its public key (or certificate), "
                    "shown under “Signing key”, at the provider."
                ),
            )
        super().save_model(request, obj, form, change)
        form.forget_held_secret()
        metadata = getattr(form, "discovered", None)
        if metadata:
            messages.info(
                request,
                f"Endpoints filled from {metadata.issuer}'s metadata"
                f" (PKCE S256 {'supported' if metadata.pkce_s256 else 'not advertised'},"
                f" iss {'returned' if metadata.returns_iss else 'not returned'},"
                f" pushed authorization requests {_par_support(metadata)})."
                + "".join(f" {note}" for note in _sender_constraint_notes(metadata, obj)),
            )
        credentials_changed = change and form.credentials_changed
        if credentials_changed:
            tokens.reset_after_reconfiguration(obj)
        if change and (
            "use_dpop" in form.changed_data
            or (obj.certificate_bound_tokens and getattr(form, "tls_pair_changed", False))
        ):
            tokens.replace_now(obj)  # bound to a key (or not) the calls no longer match
        if obj.token_placement == TokenPlacement.QUERY:
            messages.warning(
                request,
                _(
                    "The access token will be sent as a query parameter. RFC 9700 §4.3.2 advises "
                    "against this: URLs end up in server and proxy logs. Use the header unless "
                    "the API requires it."
                ),
            )
        if admin_views.wants_token_after_save(obj, credentials_changed):
            # After the commit: the token service works on the saved row, with its own lease.
            transaction.on_commit(
                lambda: admin_views.report_refresh(request, [obj], after_save=True)
            )

    def response_add(self, request, obj, post_url_continue=None):
        if "_authorize" in request.POST:
            return self._after_save_and_authorize(request, obj)
        return super().response_add(request, obj, post_url_continue)

    def response_change(self, request, obj):
        if "_authorize" in request.POST:
            return self._after_save_and_authorize(request, obj)
        return super().response_change(request, obj)

    def _after_save_and_authorize(self, request, obj: Datasource):
        self.message_user(request, f"“{obj}” was saved.", messages.SUCCESS)
        if obj.grant_type == GrantType.AUTHORIZATION_CODE and not obj.per_user:
            return HttpResponseRedirect(obj.get_authorize_url())
        if obj.per_user:
            return HttpResponseRedirect(obj.get_connect_url())
        return HttpResponseRedirect(obj.get_admin_url())  # the token is fetched after saving

    # --- actions -----------------------------------------------------------------------------

    @admin.action(description=_("Authorize the selected datasource"), permissions=["change"])
    def authorize_selected(self, request, queryset):
        if queryset.count() != 1:
            self.message_user(
                request, _("Select exactly one datasource to authorize."), messages.WARNING
            )
            return None
        return HttpResponseRedirect(queryset.get().get_authorize_url())

    @admin.action(description=_("Refresh tokens now (in the background)"), permissions=["change"])
    def refresh_selected(self, request, queryset):
        admin_views.enqueue_refreshes(request, list(queryset))

    @admin.action(description=_("Disconnect (revoke and delete tokens)…"), permissions=["change"])
    def disconnect_selected(self, request, queryset):
        return admin_views.confirm_bulk_disconnect(self, request, queryset)

    def delete_model(self, request, obj):
        admin_views.revoke_after_delete(request, [obj])
        super().delete_model(request, obj)

    def delete_queryset(self, request, queryset):
        admin_views.revoke_after_delete(request, list(queryset))
        super().delete_queryset(request, queryset)


class ReadOnlyAdmin(admin.ModelAdmin):
    """Bookkeeping written by the services only."""

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


class OwnerFilter(admin.SimpleListFilter):
    """Whose token: the datasource's shared one, a Django user's, or an end user's."""

    title = _("owner")
    parameter_name = "owner"

    def lookups(self, request, model_admin):
        return (
            ("shared", _("Shared")),
            ("user", _("A user of this site")),
            ("end_user", _("An end user (connect link)")),
        )

    def queryset(self, request, queryset):
        if self.value() == "shared":
            return queryset.shared()
        if self.value() == "user":
            return queryset.filter(user__isnull=False)
        if self.value() == "end_user":
            return queryset.of_end_users()
        return queryset


@admin.register(Token)
class TokenAdmin(ReadOnlyAdmin):
    """Read-only bookkeeping; secret columns are not even listed."""

    list_display = (
        "datasource",
        "user",
        "end_user",
        "identity",
        "status",
        "disconnect",
        "expires_at",
        "last_refreshed_at",
        "failure_count",
        "failure_kind",
        "refresh_count",
    )
    list_filter = (OwnerFilter, "status", "failure_kind", "datasource")
    list_select_related = ("datasource", "user")
    search_fields = ("datasource__name", "datasource__slug", "end_user", "identity")
    fields = (
        "datasource",
        "user",
        "end_user",
        "identity",
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
        "refresh_started_at",
        "outcome_unknown_at",
        "last_error",
    )
    readonly_fields = fields

    @admin.display(description="")
    def disconnect(self, obj: Token):
        """An end user's connection: a Disconnect button (revoke, then delete)."""
        if not obj.end_user:
            return ""
        url = reverse(
            "admin:datasources_datasource_disconnect_end_user",
            args=[obj.datasource_id, obj.end_user],
        )
        return format_html(
            '<a class="button datasource-disconnect-end-user" href="{}">{}</a>',
            url,
            _("Disconnect"),
        )

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


@admin.register(ConnectSession)
class ConnectSessionAdmin(ReadOnlyAdmin):
    """Connect links created by applications, and how each ended (the link's secret is not
    stored: only its hash, which is not shown)."""

    list_display = (
        "created_at",
        "datasource",
        "end_user",
        "display_name",
        "outcome",
        "claimed_at",
        "finished_at",
        "expires_at",
    )
    list_filter = ("outcome", "datasource")
    list_select_related = ("datasource",)
    search_fields = ("end_user", "display_name", "=public_id")
    date_hierarchy = "created_at"
    fields = (
        "public_id",
        "datasource",
        "end_user",
        "display_name",
        "return_url",
        "api_key",
        "created_at",
        "expires_at",
        "claimed_at",
        "finished_at",
        "outcome",
    )
    readonly_fields = fields


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    """Keys are shown once, on the page right after creation; only a hash is stored. A new key
    may call nothing until datasources are chosen or "all datasources" is ticked."""

    form = ApiKeyForm
    list_display = (
        "name",
        "key_prefix",
        "scope",
        "granted",
        "user",
        "created_at",
        "last_used_at",
        "active",
    )
    list_filter = (
        "revoked_at",
        "all_datasources",
        "may_proxy",
        "may_connect",
        "may_manage",
        "may_read_token",
    )
    search_fields = ("name", "prefix")
    filter_horizontal = ("datasources",)
    readonly_fields = ("key_prefix", "created_at", "last_used_at", "revoked_at")
    actions = ("revoke_selected",)

    def get_fieldsets(self, request, obj=None):
        who = ["name", "all_datasources", "datasources", "user"]
        if obj is not None:
            who = ["key_prefix", *who]
        fieldsets = [
            (None, {"fields": who}),
            (
                _("Permissions"),
                {
                    "fields": list(PERMISSIONS.values()),
                    "description": _(
                        "What the key may do: call the proxy (the default), create connect "
                        "links for end users, use the management API, read access tokens (each "
                        "read is recorded). docs/api.md shows a curl example for each."
                    ),
                },
            ),
        ]
        if obj is not None:
            fieldsets.append((_("Use"), {"fields": list(self.readonly_fields[1:])}))
        return fieldsets

    @admin.display(description=_("permissions"))
    def granted(self, obj: ApiKey) -> str:
        return ", ".join(name for name in PERMISSIONS if name in obj.permissions) or _("none")

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
        # Post/redirect/get: the key waits (encrypted) in the session for the page that shows
        # it once; reloading that page creates nothing and shows nothing new.
        apikey_views.hold(request, obj, key)
        return HttpResponseRedirect(reverse("admin:datasources_apikey_created", args=[obj.pk]))

    def get_urls(self):
        return [
            path(
                "<int:pk>/created/",
                self.admin_site.admin_view(partial(apikey_views.created_view, self)),
                name="datasources_apikey_created",
            ),
            *super().get_urls(),
        ]

    @admin.action(description=_("Revoke the selected keys"), permissions=["change"])
    def revoke_selected(self, request, queryset):
        count = queryset.filter(revoked_at__isnull=True).update(revoked_at=timezone.now())
        proxy_cache.forget()  # this process stops accepting them at once
        self.message_user(
            request,
            ngettext("Revoked %(count)d key.", "Revoked %(count)d keys.", count) % {"count": count},
            messages.SUCCESS,
        )


class StatusClassFilter(admin.SimpleListFilter):
    title = _("status class")
    parameter_name = "status_class"

    def lookups(self, request, model_admin):
        return [("2", "2xx"), ("3", "3xx"), ("4", "4xx"), ("5", "5xx")]

    def queryset(self, request, queryset):
        value = self.value()
        if value in ("2", "3", "4", "5"):
            low = int(value) * 100
            return queryset.filter(status__gte=low, status__lt=low + 100)
        return queryset


@admin.register(ProxyCall)
class ProxyCallAdmin(admin.ModelAdmin):
    """The call log: read-only (rows are written by the proxy and pruned after
    CALL_LOG_RETENTION_DAYS)."""

    list_display = (
        "called_at",
        "datasource",
        "caller",
        "method",
        "path",
        "status",
        "error",
        "latency_ms",
        "response_bytes",
        "retries",
        "refreshed",
    )
    list_filter = ("datasource", StatusClassFilter, "api_key", "user", "method", "refreshed")
    list_select_related = ("datasource", "api_key", "user")
    search_fields = ("path", "=end_user")
    date_hierarchy = "called_at"
    show_full_result_count = False  # a count(*) over a large log on every page is slow

    @admin.display(description=_("caller"))
    def caller(self, obj: ProxyCall):
        if obj.api_key_id:
            key = str(obj.api_key) if obj.api_key else _("deleted API key")
            if obj.end_user:
                return _("%(key)s for end user %(end_user)s") % {
                    "key": key,
                    "end_user": obj.end_user,
                }
            return key
        if obj.user_id:
            return obj.user.get_username() if obj.user else _("deleted user")
        return "—"

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


# --- webhooks ----------------------------------------------------------------------------------


@admin.register(WebhookEndpoint)
class WebhookEndpointAdmin(admin.ModelAdmin):
    """The secret is shown once, on the page right after creation or rotation."""

    form = WebhookEndpointForm
    list_display = ("name", "url", "scope", "events", "active", "secret_created_at")
    list_filter = ("active", "datasource")
    list_select_related = ("datasource",)
    search_fields = ("name", "url")
    readonly_fields = ("secret_created_at", "previous_secret_expires_at", "created_at")

    def get_fields(self, request, obj=None):
        fields = ["name", "url", "datasource", "event_types", "active"]
        return fields if obj is None else [*fields, *self.readonly_fields]

    @admin.display(description=_("datasources"))
    def scope(self, obj: WebhookEndpoint) -> str:
        return obj.datasource.slug if obj.datasource_id else _("all (project-wide)")

    @admin.display(description=_("events"))
    def events(self, obj: WebhookEndpoint) -> str:
        chosen = set(obj.event_types or [])
        if chosen >= set(WebhookEvent.values):
            return _("all")
        return ", ".join(sorted(chosen))

    def save_model(self, request, obj, form, change):
        if not change:
            request._datasources_new_webhook_secret = webhook_endpoints.assign_secret(obj)
        super().save_model(request, obj, form, change)

    def response_add(self, request, obj, post_url_continue=None):
        secret = getattr(request, "_datasources_new_webhook_secret", None)
        if secret is None:
            return super().response_add(request, obj, post_url_continue)
        return webhook_views.hold(request, obj, secret)

    def get_urls(self):
        def view(function):
            return self.admin_site.admin_view(partial(function, self))

        return [
            path(
                "<int:pk>/secret/",
                view(webhook_views.secret_view),
                name="datasources_webhookendpoint_secret",
            ),
            path(
                "<int:pk>/rotate/",
                view(webhook_views.rotate_view),
                name="datasources_webhookendpoint_rotate",
            ),
            path(
                "<int:pk>/test/",
                view(webhook_views.test_view),
                name="datasources_webhookendpoint_test",
            ),
            *super().get_urls(),
        ]


class WebhookAttemptInline(admin.TabularInline):
    model = WebhookAttempt
    fields = ("number", "started_at", "duration_ms", "status_code", "error", "delivered")
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(ReadOnlyAdmin):
    """Every event sent to every endpoint, with each attempt; failed ones can be retried."""

    list_display = (
        "created_at",
        "event_type",
        "endpoint",
        "datasource",
        "status",
        "attempts",
        "last_status_code",
        "last_error",
        "next_attempt_at",
    )
    list_filter = ("status", "event_type", "endpoint")
    list_select_related = ("endpoint", "datasource")
    search_fields = ("event_id", "datasource__slug")
    date_hierarchy = "created_at"
    fields = (
        "event_id",
        "event_type",
        "endpoint",
        "datasource",
        "status",
        "attempts",
        "next_attempt_at",
        "claimed_until",
        "last_status_code",
        "last_error",
        "created_at",
        "delivered_at",
        "payload_json",
    )
    readonly_fields = fields
    inlines = (WebhookAttemptInline,)
    actions = ("retry_now",)

    @admin.display(description=_("payload"))
    def payload_json(self, obj: WebhookDelivery):
        return format_html("<pre>{}</pre>", json.dumps(obj.payload, indent=2, sort_keys=True))

    def has_retry_permission(self, request) -> bool:
        return request.user.has_perm("datasources.change_webhookendpoint")

    @admin.action(description=_("Retry now"), permissions=["retry"])
    def retry_now(self, request, queryset):
        """Retried through the worker's claim: a delivery being sent at this moment is left
        alone (its attempt is the retry), and the person is told so."""
        retried = webhook_delivery.retry_now(queryset)
        count, busy = retried.started, retried.busy
        if count or not busy:
            self.message_user(
                request,
                ngettext(
                    "Retrying %(count)d delivery now.", "Retrying %(count)d deliveries now.", count
                )
                % {"count": count},
                messages.SUCCESS if count else messages.WARNING,
            )
        if busy:
            self.message_user(
                request,
                ngettext(
                    "%(count)d delivery is being sent now: not retried (its attempt is on).",
                    "%(count)d deliveries are being sent now: not retried (their attempts are on).",
                    busy,
                )
                % {"count": busy},
                messages.WARNING,
            )
