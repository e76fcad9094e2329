"""The page that shows a new API key exactly once, reached by a redirect after the key was
created (post/redirect/get: reloading it shows nothing new and creates nothing). The key waits
in the creator's session, encrypted, until that page takes it out."""

from __future__ import annotations

from django.contrib.admin import ModelAdmin
from django.http import HttpRequest, HttpResponse
from django.urls import reverse
from django.views.decorators.debug import sensitive_variables

from ..models import ApiKey, Datasource
from . import shown_once

SESSION_KEY = "datasources_new_api_key"


def hold(request: HttpRequest, api_key: ApiKey, key: str) -> None:
    shown_once.hold(request, SESSION_KEY, api_key.pk, key)


@sensitive_variables()
def created_view(model_admin: ModelAdmin, request: HttpRequest, pk: int) -> HttpResponse:
    api_key = shown_once.viewable(model_admin, request, ApiKey, pk)
    key = shown_once.take(request, SESSION_KEY, api_key.pk)
    slugs = list(api_key.datasources.values_list("slug", flat=True)[:1]) or list(
        Datasource.objects.values_list("slug", flat=True)[:1]
    )
    slug = slugs[0] if slugs else "SLUG"
    proxy = request.build_absolute_uri(reverse("datasources:proxy-root", args=[slug]))
    context = {
        "title": "API key created" if key else "API key",
        "api_key": api_key,
        "key": key,
        "curl": f'curl -H "Authorization: Api-Key {key or "dsk_…"}" {proxy}',
        "opts": ApiKey._meta,
    }
    return shown_once.page(model_admin, request, "admin/datasources/apikey/created.html", context)
