"""A secret shown exactly once, on the page a redirect leads to (post/redirect/get): a new API
key, a webhook endpoint's signing secret. It waits in the creator's session, encrypted with the
app's Fernet keys, until that page takes it out; a reload finds nothing, and the answer is never
cached. One place for the pattern, so both pages keep the same guarantees."""

from __future__ import annotations

from typing import Any

from django.contrib.admin import ModelAdmin
from django.core.exceptions import PermissionDenied
from django.db.models import Model
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.views.decorators.debug import sensitive_variables

from ..models import Datasource


def _fernet():
    return Datasource._meta.get_field("client_secret").fernet


@sensitive_variables()
def hold(request: HttpRequest, session_key: str, pk: int, secret: str) -> None:
    """Keep ``secret`` for the object ``pk``'s page, encrypted in the session."""
    request.session[session_key] = {
        "pk": pk,
        "secret": _fernet().encrypt(secret.encode()).decode(),
    }


@sensitive_variables()
def take(request: HttpRequest, session_key: str, pk: int) -> str | None:
    """The held secret of object ``pk``, removed from the session (None: none held for it)."""
    held = request.session.get(session_key) or {}
    if held.get("pk") != pk:
        return None
    del request.session[session_key]  # shown once: a reload finds nothing
    return _fernet().decrypt(held["secret"].encode()).decode()


def viewable(model_admin: ModelAdmin, request: HttpRequest, model: type[Model], pk: int) -> Any:
    """The object ``pk`` if the user may view it (404 / 403 otherwise)."""
    obj = get_object_or_404(model, pk=pk)
    if not model_admin.has_view_permission(request, obj):
        raise PermissionDenied
    return obj


def page(
    model_admin: ModelAdmin, request: HttpRequest, template: str, context: dict[str, Any]
) -> HttpResponse:
    """The page, never stored by a cache (it may carry the secret)."""
    full = {**model_admin.admin_site.each_context(request), **context}
    response = TemplateResponse(request, template, full)
    response["Cache-Control"] = "no-store"
    return response
