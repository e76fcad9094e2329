"""The page that shows a new API key exactly once, reached by a redirect after the key was
created (post/redirect/get: reloading it shows nothing new and creates nothing). The key waits
in the creator's session, encrypted, until that page takes it out."""

from __future__ import annotations

from django.contrib.admin import ModelAdmin
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import reverse
from django.views.decorators.debug import sensitive_variables

from ..models import ApiKey, Datasource

SESSION_KEY = "datasources_new_api_key"


def _fernet():
    return Datasource._meta.get_field("client_secret").fernet


@sensitive_variables()
def hold(request: HttpRequest, api_key: ApiKey, key: str) -> None:
    request.session[SESSION_KEY] = {
        "pk": api_key.pk,
        "key": _fernet().encrypt(key.encode()).decode(),
    }


@sensitive_variables()
def created_view(model_admin: ModelAdmin, request: HttpRequest, pk: int) -> HttpResponse:
    api_key = get_object_or_404(ApiKey, pk=pk)
    if not model_admin.has_view_permission(request, api_key):
        raise PermissionDenied
    held = request.session.get(SESSION_KEY) or {}
    key = None
    if held.get("pk") == api_key.pk:
        del request.session[SESSION_KEY]  # shown once: a reload finds nothing
        key = _fernet().decrypt(held["key"].encode()).decode()
    slugs = list(api_key.datasources.values_list("slug", flat=True)[:1]) or list(
        Datasource.objects.values_list("slug", flat=True)[:1]
    )
    slug = slugs[0] if slugs else "SLUG"
    proxy = request.build_absolute_uri(reverse("datasources:proxy-root", args=[slug]))
    context = {
        **model_admin.admin_site.each_context(request),
        "title": "API key created" if key else "API key",
        "api_key": api_key,
        "key": key,
        "curl": f'curl -H "Authorization: Api-Key {key or "dsk_…"}" {proxy}',
        "opts": ApiKey._meta,
    }
    response = TemplateResponse(request, "admin/datasources/apikey/created.html", context)
    response["Cache-Control"] = "no-store"
    return response
