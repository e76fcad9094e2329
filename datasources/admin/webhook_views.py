"""Admin pages of a webhook endpoint: its secret shown once (after creation or rotation,
post/redirect/get, held encrypted in the session like a new API key), rotating the secret,
sending a test event."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.admin import ModelAdmin
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.urls import reverse
from django.utils.html import format_html
from django.views.decorators.debug import sensitive_variables

from ..models import WebhookEndpoint
from ..webhooks import endpoints
from . import shown_once

SESSION_KEY = "datasources_new_webhook_secret"


@sensitive_variables()
def hold(request: HttpRequest, endpoint: WebhookEndpoint, secret: str) -> HttpResponse:
    """Keep the new secret for the one page that shows it, and go there."""
    shown_once.hold(request, SESSION_KEY, endpoint.pk, secret)
    return HttpResponseRedirect(
        reverse("admin:datasources_webhookendpoint_secret", args=[endpoint.pk])
    )


@sensitive_variables()
def secret_view(model_admin: ModelAdmin, request: HttpRequest, pk: int) -> HttpResponse:
    endpoint = shown_once.viewable(model_admin, request, WebhookEndpoint, pk)
    context = {
        "title": "Webhook signing secret",
        "endpoint": endpoint,
        "secret": shown_once.take(request, SESSION_KEY, endpoint.pk),
        "opts": WebhookEndpoint._meta,
    }
    return shown_once.page(
        model_admin, request, "admin/datasources/webhookendpoint/secret.html", context
    )


def _changeable(model_admin: ModelAdmin, request: HttpRequest, pk: int) -> WebhookEndpoint:
    endpoint = get_object_or_404(WebhookEndpoint, pk=pk)
    if not model_admin.has_change_permission(request, endpoint):
        raise PermissionDenied
    return endpoint


def rotate_view(model_admin: ModelAdmin, request: HttpRequest, pk: int) -> HttpResponse:
    if request.method != "POST":
        return HttpResponseNotAllowed(["POST"])
    endpoint = _changeable(model_admin, request, pk)
    return hold(request, endpoint, endpoints.rotate_secret(endpoint))


def test_view(model_admin: ModelAdmin, request: HttpRequest, pk: int) -> HttpResponse:
    if request.method != "POST":
        return HttpResponseNotAllowed(["POST"])
    endpoint = _changeable(model_admin, request, pk)
    if not endpoint.active:
        model_admin.message_user(
            request, "This endpoint is not active: tick “active” and save first.", messages.WARNING
        )
        return HttpResponseRedirect(endpoint.get_admin_url())
    delivery = endpoints.send_test(endpoint)
    link = reverse("admin:datasources_webhookdelivery_change", args=[delivery.pk])
    model_admin.message_user(
        request,
        format_html('Test event queued: <a href="{}">see its delivery</a>.', link),
        messages.SUCCESS,
    )
    return HttpResponseRedirect(endpoint.get_admin_url())
