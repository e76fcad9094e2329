"""Thin views for the authorization-code flow; errors become pages that explain."""

from __future__ import annotations

import logging

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404, render
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_http_methods

from ..authserver.oauth import sanitize_description
from ..exceptions import DatasourceError, IdentityMismatch, InvalidState
from ..models import ConnectSession, Datasource, Token
from . import connect as links
from . import flow

logger = logging.getLogger(__name__)


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
@require_http_methods(["GET", "POST"])
def connect_link(request: HttpRequest, secret: str) -> HttpResponse:
    """``/connect/<secret>``: an end user's connect link. GET shows the page (the
    datasource, who is connecting, one Connect button); POST (the button) claims the link for
    this browser and goes to the provider."""
    session = links.find(secret)
    if session is None:
        return _link_refused(request)
    why = links.unusable(session)
    if why is None and request.method == "POST":
        why = links.claim(session, flow.browser_binding(request))
        if why is None:
            try:
                url = flow.start(request, session.datasource, connect_session=session)
            except DatasourceError:
                links.finish(session, ConnectSession.Outcome.PROVIDER_ERROR)
                return HttpResponseRedirect(links.back_to_app(session, "provider_error"))
            return HttpResponseRedirect(url)
    if why is not None:
        return HttpResponseRedirect(links.back_to_app(session, why))
    return render(
        request,
        "datasources/connect.html",
        {"session": session, "datasource": session.datasource, "title": "Connect"},
    )


@never_cache
@require_GET
def authorization_callback(request: HttpRequest) -> HttpResponse:
    """``/api/v1/datasources/authorize``: the provider sends the browser back here. A signed-in
    user's flow (admin, per-user tokens) or an end user's (a connect link: nobody signs in)."""
    if not request.user.is_authenticated and not flow.started_from_connect_link(request):
        return redirect_to_login(request.get_full_path())
    try:
        auth_request = flow.consume(request)
    except InvalidState as err:
        return _failure(request, str(err))
    if auth_request.connect_session_id is not None:
        return _finish_connect(request, auth_request)
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
    except IdentityMismatch as err:
        messages.error(request, str(err))
        return _back(request, datasource)
    except DatasourceError as err:
        messages.error(request, f"Authorization failed: {err}. The stored token is unchanged.")
        return _back(request, datasource)
    messages.success(request, f"“{datasource}” is authorized and active.")
    warning = no_refresh_token_warning(datasource, token)
    if warning:
        messages.warning(request, warning)
    return _back(request, datasource)


def _finish_connect(request: HttpRequest, auth_request) -> HttpResponse:
    """The end of a connect link's flow: the end user's token stored, and back to the app with
    the outcome (never a token or a code in that URL)."""
    session = auth_request.connect_session
    datasource = auth_request.datasource
    iss = request.GET.get("iss")
    wrong_issuer = (
        datasource.issuer
        and (iss is not None or datasource.issuer_returns_iss)
        and iss != datasource.issuer
    )
    error = None
    if session.finished_at is not None:
        error = links.USED
    elif wrong_issuer:
        error = ConnectSession.Outcome.PROVIDER_ERROR
    elif "error" in request.GET:
        denied = request.GET.get("error") == "access_denied"
        error = (
            ConnectSession.Outcome.ACCESS_DENIED
            if denied
            else ConnectSession.Outcome.PROVIDER_ERROR
        )
    elif not request.GET.get("code"):
        error = ConnectSession.Outcome.PROVIDER_ERROR
    if error is None:
        try:
            flow.complete(auth_request, request.GET["code"], end_user=session.end_user)
        except IdentityMismatch:
            error = ConnectSession.Outcome.IDENTITY_MISMATCH
        except DatasourceError as err:
            logger.warning(
                "connect session %s for datasource %s failed: %s",
                session.public_id,
                datasource.slug,
                type(err).__name__,
            )
            error = ConnectSession.Outcome.PROVIDER_ERROR
    if error != links.USED:
        links.finish(session, error or ConnectSession.Outcome.CONNECTED)
    return HttpResponseRedirect(links.back_to_app(session, error))


def _link_refused(request: HttpRequest) -> HttpResponse:
    """A link that names no session (forged, mistyped): no return URL can be trusted."""
    return render(
        request,
        "datasources/connect_refused.html",
        {"title": "This link does not work"},
        status=404,
    )


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
