"""Thin views for the authorization-code flow; errors become pages that explain."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404, render
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from ..authserver.oauth import sanitize_description
from ..exceptions import DatasourceError, InvalidState
from ..models import Datasource, Token
from . import flow


@never_cache
def start_authorization(request: HttpRequest, pk: int) -> HttpResponse:
    """Admin: redirect to the provider's authorization URL (staff with change permission)."""
    datasource = get_object_or_404(Datasource, pk=pk)
    if not request.user.has_perm("datasources.change_datasource"):
        raise PermissionDenied
    if datasource.grant_type != "authorization_code":
        messages.error(
            request,
            "Client-credentials and JWT bearer datasources need no authorization: use “Get a "
            "new token now”.",
        )
        return HttpResponseRedirect(datasource.get_admin_url())
    try:
        url = flow.start(request, datasource)
    except DatasourceError as err:
        messages.error(request, f"Cannot start the authorization: {err}")
        return HttpResponseRedirect(datasource.get_admin_url())
    return HttpResponseRedirect(url)


@never_cache
@login_required
def connect(request: HttpRequest, slug: str) -> HttpResponse:
    """A user authorizes a per-user datasource for themselves."""
    datasource = get_object_or_404(Datasource, slug=slug)
    if not datasource.per_user:
        raise Http404("This datasource shares one authorization; an admin authorizes it.")
    if not request.user.has_perm("datasources.use_datasource"):
        raise PermissionDenied
    try:
        url = flow.start(request, datasource)
    except DatasourceError as err:
        return _failure(request, f"Cannot start the authorization: {err}", datasource=datasource)
    return HttpResponseRedirect(url)


@never_cache
@require_GET
@login_required
def authorization_callback(request: HttpRequest) -> HttpResponse:
    """``/api/v1/datasources/authorize``: the provider sends the browser back here."""
    try:
        auth_request = flow.consume(request)
    except InvalidState as err:
        return _failure(request, str(err))
    datasource = auth_request.datasource
    iss = request.GET.get("iss")
    if (
        datasource.issuer
        and (iss is not None or datasource.issuer_returns_iss)
        and iss != datasource.issuer
    ):
        return _failure(
            request,
            "The authorization response came from an unexpected issuer (RFC 9207 “iss” does "
            "not match this datasource's issuer). Nothing was changed.",
            datasource=datasource,
        )
    if "error" in request.GET:
        code = sanitize_description(request.GET.get("error"), [])[:100]
        description = sanitize_description(request.GET.get("error_description"), [])
        text = {
            "access_denied": "Access was denied at the provider",
        }.get(code, f"The provider answered “{code}”")
        hint = ""
        if "pushed authorization" in description.lower():
            hint = (
                " The provider accepts only pushed authorization requests (RFC 9126): enter "
                "its PAR endpoint under “Advanced”, or fill the endpoints from its metadata."
            )
        messages.error(
            request,
            f"{text}{': ' + description if description else ''}. The stored token is "
            f"unchanged.{hint}",
        )
        return _back(request, datasource)
    code = request.GET.get("code", "")
    if not code:
        return _failure(request, "The authorization response has no code.", datasource=datasource)
    try:
        token = flow.complete(auth_request, code, user=request.user)
    except DatasourceError as err:
        messages.error(request, f"Authorization failed: {err}. The stored token is unchanged.")
        return _back(request, datasource)
    messages.success(request, f"“{datasource}” is authorized and active.")
    warning = no_refresh_token_warning(datasource, token)
    if warning:
        messages.warning(request, warning)
    return _back(request, datasource)


def no_refresh_token_warning(datasource: Datasource, token: Token) -> str:
    """What a builder must know when an authorization left no way to renew the token."""
    if datasource.grant_type != "authorization_code" or not token.access_token:
        return ""
    if token.refresh_token or token.status != "active":
        return ""
    hint = (
        "Providers usually send one only when asked: prompt=consent and access_type=offline "
        "(Google) in the custom authentication parameters, or the offline_access scope."
    )
    if token.expires_at is None:
        return (
            "The provider sent no refresh token and no expiry: the token is used until the API "
            f"rejects it, then “{datasource}” needs re-authorizing. {hint}"
        )
    when = timezone.localtime(token.expires_at)
    return (
        f"The provider sent no refresh token: this connection stops working at "
        f"{when:%Y-%m-%d %H:%M %Z}, when the access token expires, unless it is re-authorized. "
        f"{hint}"
    )


def _back(request: HttpRequest, datasource: Datasource) -> HttpResponse:
    """Staff return to the admin page; other users (per-user tokens) see a result page."""
    if request.user.is_staff:
        return HttpResponseRedirect(datasource.get_admin_url())
    return render(
        request,
        "datasources/authorization_result.html",
        {"datasource": datasource, "title": str(datasource)},
    )


def _failure(request: HttpRequest, message: str, datasource: Datasource | None = None):
    return render(
        request,
        "datasources/authorization_failed.html",
        {"message": message, "datasource": datasource, "title": "Authorization failed"},
        status=400,
    )
