"""The page that shows a new API key exactly once, reached by a redirect after the key was
created (post/redirect/get: reloading it shows nothing new and creates nothing). The key waits
in the creator's session, encrypted, until that page takes it out."""

from __future__ import annotations

from django.contrib.admin import ModelAdmin
from django.http import HttpRequest, HttpResponse
from django.urls import reverse
from django.utils.translation import gettext as _
from django.views.decorators.debug import sensitive_variables

from ..models import PERMISSIONS, ApiKey, Datasource
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
    examples = _examples(request, slug, key or "dsk_…", api_key.permissions)
    context = {
        "title": "API key created" if key else "API key",
        "api_key": api_key,
        "key": key,
        "curl": examples[0][1] if examples else "",
        "examples": examples[1:],
        "granted": [name for name in PERMISSIONS if name in api_key.permissions],
        "opts": ApiKey._meta,
    }
    return shown_once.page(model_admin, request, "admin/datasources/apikey/created.html", context)


def _examples(
    request: HttpRequest, slug: str, key: str, permissions: frozenset[str]
) -> list[tuple[str, str]]:
    """One ``curl`` per permission the key has: (what it shows, the command)."""
    auth = f'-H "Authorization: Api-Key {key}"'
    url = request.build_absolute_uri
    examples = []
    if "proxy" in permissions:
        proxy = url(reverse("datasources:proxy-root", args=[slug]))
        examples.append((_("Call a datasource"), f"curl {auth} {proxy}"))
    if "connect" in permissions:
        sessions = url("/api/v1/connect/sessions")
        body = (
            f'{{"datasource": "{slug}", "end_user": "customer-1", '
            '"return_url": "https://app.example.com/settings/"}'
        )
        examples.append(
            (
                _("Create a connect link for an end user"),
                f"curl -X POST {auth} -H \"Content-Type: application/json\" {sessions} -d '{body}'",
            )
        )
    if "manage" in permissions:
        listed = url("/api/v1/datasources")
        examples.append((_("List the datasources (management API)"), f"curl {auth} {listed}"))
    if "token" in permissions:
        token = url(f"/api/v1/datasources/{slug}/token")
        examples.append((_("Read a fresh access token"), f"curl -X POST {auth} {token}"))
    return examples
