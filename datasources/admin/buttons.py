"""The datasource page's buttons, as views of their own (outside the admin's main form): Refresh
now, Disconnect (with a confirmation step), Test; and what the bulk actions and deletions hand
to Celery. Each reports its outcome with a message, in plain words."""

from __future__ import annotations

import logging

from django.contrib import messages
from django.contrib.admin import helpers
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.translation import ngettext
from django.views import View

from .. import tokens
from ..authserver import keys
from ..models import Datasource, Token, TokenStatus
from ..proxy import cache as proxy_cache
from ..security import dpop
from . import jobs as adminjobs
from . import probe
from .explain import explain

logger = logging.getLogger(__name__)


class _DatasourceView(View):
    """A page of one datasource for staff who may change it."""

    model_admin = None

    def datasource(self, request: HttpRequest, pk: int) -> Datasource:
        datasource = get_object_or_404(Datasource, pk=pk)
        if not self.model_admin.has_change_permission(request, datasource):
            raise PermissionDenied
        return datasource

    def context(self, request: HttpRequest, datasource: Datasource, title: str) -> dict:
        return {
            **self.model_admin.admin_site.each_context(request),
            "opts": Datasource._meta,
            "original": datasource,
            "title": title,
            "subtitle": str(datasource),
        }


class RefreshView(_DatasourceView):
    http_method_names = ["post"]

    def post(self, request: HttpRequest, pk: int) -> HttpResponse:
        datasource = self.datasource(request, pk)
        report_refresh(request, [datasource])
        return HttpResponseRedirect(datasource.get_admin_url())


class GenerateKeyView(_DatasourceView):
    """The “Generate key pair” button: a new private key (encrypted), its thumbprint as key
    ID and a self-signed certificate; the change page then shows the public half."""

    http_method_names = ["post"]

    def post(self, request: HttpRequest, pk: int) -> HttpResponse:
        datasource = self.datasource(request, pk)
        replaced = bool(datasource.private_key)
        keys.generate_key_pair(datasource)
        datasource.save(
            update_fields=[
                "private_key",
                "private_key_id",
                "signing_algorithm",
                "signing_certificate",
                "updated_at",
            ]
        )
        tokens.reset_after_reconfiguration(datasource)
        messages.success(
            request,
            f"A new {datasource.signing_algorithm} key pair (key ID {datasource.private_key_id}) "
            f"was generated{' and replaces the previous key' if replaced else ''}. Register "
            "its public key or certificate, shown under “Signing key”, at the provider.",
        )
        return HttpResponseRedirect(datasource.get_admin_url())


class RegenerateDPoPKeyView(_DatasourceView):
    """POST: a new DPoP key pair; tokens bound to the old key are replaced at the next call."""

    http_method_names = ["post"]

    def post(self, request: HttpRequest, pk: int) -> HttpResponse:
        datasource = self.datasource(request, pk)
        if not datasource.use_dpop:
            messages.error(request, f"“{datasource}” does not use DPoP: turn it on first.")
            return HttpResponseRedirect(datasource.get_admin_url())
        with transaction.atomic():
            datasource.set_dpop_key(dpop.generate_private_key_pem())
            datasource.save(update_fields=["dpop_private_key", "dpop_jkt", "updated_at"])
            replaced = tokens.replace_now(datasource)
        messages.success(
            request,
            f"“{datasource}” has a new DPoP key (thumbprint {datasource.dpop_jkt})."
            + (
                " Its tokens were bound to the old key: new ones are fetched at the next call."
                if replaced
                else ""
            )
            + " If the provider registers DPoP keys, register the new public key there.",
        )
        return HttpResponseRedirect(datasource.get_admin_url())


class DisconnectView(_DatasourceView):
    """GET: what will happen, and a confirmation button; POST: revoke and forget the tokens."""

    http_method_names = ["get", "post"]

    def get(self, request: HttpRequest, pk: int) -> HttpResponse:
        datasource = self.datasource(request, pk)
        context = self.context(request, datasource, f"Disconnect “{datasource}”?")
        context["token_count"] = (
            Token.objects.filter(datasource=datasource)
            .exclude(status=TokenStatus.NOT_AUTHORIZED)
            .count()
        )
        return TemplateResponse(
            request, "admin/datasources/datasource/disconnect_confirmation.html", context
        )

    def post(self, request: HttpRequest, pk: int) -> HttpResponse:
        datasource = self.datasource(request, pk)
        problems = tokens.disconnect(datasource)
        for problem in problems:
            messages.warning(request, f"“{datasource}”: {problem}")
        messages.success(
            request,
            f"“{datasource}” was disconnected"
            + (
                " and its tokens revoked at the provider."
                if datasource.revocation_url and not problems
                else "."
            ),
        )
        return HttpResponseRedirect(datasource.get_admin_url())


class EndUserDisconnectView(_DatasourceView):
    """One end user's connection: GET what will happen and a confirmation button; POST revoke
    at the provider (when a revocation URL is set) and delete it, then back to the list."""

    http_method_names = ["get", "post"]

    def connection(self, request: HttpRequest, pk: int, end_user: str) -> tuple[Datasource, Token]:
        datasource = self.datasource(request, pk)
        token = Token.objects.filter(datasource=datasource, user=None, end_user=end_user).first()
        if token is None or not end_user:
            raise Http404("No such connection.")
        return datasource, token

    def get(self, request: HttpRequest, pk: int, end_user: str) -> HttpResponse:
        datasource, token = self.connection(request, pk, end_user)
        context = self.context(request, datasource, f"Disconnect end user “{end_user}”?")
        context.update(connection=token, back=connections_url(datasource))
        return TemplateResponse(
            request, "admin/datasources/datasource/end_user_disconnect.html", context
        )

    def post(self, request: HttpRequest, pk: int, end_user: str) -> HttpResponse:
        datasource, _ = self.connection(request, pk, end_user)
        problems = tokens.disconnect_end_user(datasource, end_user)
        proxy_cache.forget()
        for problem in problems:
            messages.warning(request, f"“{end_user}”: {problem}")
        messages.success(
            request,
            f"End user “{end_user}” was disconnected from “{datasource}”"
            + (
                " and their tokens revoked at the provider."
                if datasource.revocation_url and not problems
                else "."
            )
            + " They can connect again, with any account, through a new connect link.",
        )
        return HttpResponseRedirect(connections_url(datasource))


def connections_url(datasource: Datasource) -> str:
    """The token list showing the datasource's end users' connections (search, filters)."""
    return (
        reverse("admin:datasources_token_changelist")
        + f"?datasource__id__exact={datasource.pk}&owner=end_user"
    )


class TestCallView(_DatasourceView):
    """One call to the upstream API through the proxy's code, shown with status and latency."""

    http_method_names = ["get", "post"]

    def get(self, request: HttpRequest, pk: int) -> HttpResponse:
        datasource = self.datasource(request, pk)
        return self.render(request, datasource, "GET", "", None)

    def post(self, request: HttpRequest, pk: int) -> HttpResponse:
        datasource = self.datasource(request, pk)
        method = request.POST.get("method", "GET")
        path = request.POST.get("path", "")
        result = probe.run(datasource, method, path, user=request.user)
        if result.error:
            messages.error(request, f"Test call failed: {result.error}")
        else:
            level = messages.SUCCESS if result.ok else messages.WARNING
            messages.add_message(
                request,
                level,
                f"Test call: {result.status} {result.reason} in {result.latency_ms:.0f} ms.",
            )
        return self.render(request, datasource, result.method, path, result)

    def render(self, request, datasource, method, path, result) -> HttpResponse:
        context = self.context(request, datasource, f"Test “{datasource}”")
        context.update(
            methods=probe.methods_for(datasource), method=method, path=path, result=result
        )
        response = TemplateResponse(request, "admin/datasources/datasource/test_call.html", context)
        response["Cache-Control"] = "no-store"
        return response


# --- token fetching from the admin ---------------------------------------------------------------


def wants_token_after_save(datasource: Datasource, credentials_changed: bool) -> bool:
    """Client credentials: fetch the first token (or one with the new credentials) right away.
    Authorization code: check changed credentials at once with a refresh, when there is a
    refresh token to use."""
    if datasource.per_user:
        return False
    token = Token.objects.shared().filter(datasource=datasource).first()
    if datasource.machine_grant:
        return credentials_changed or token is None or token.status != TokenStatus.ACTIVE
    return bool(credentials_changed and token and token.refresh_token)


def report_refresh(
    request: HttpRequest, datasources: list[Datasource], *, after_save: bool = False
) -> None:
    """Refresh each shared token now (in this request) and say what happened."""
    done = 0
    for datasource in datasources:
        if datasource.per_user:
            messages.warning(
                request,
                f"“{datasource}” has per-user tokens: each user's token is refreshed when "
                "they use it, or by the background sweep.",
            )
            continue
        result = tokens.refresh_token(datasource, force=True)
        if result.outcome in ("refreshed", "fresh"):
            done += 1
            if after_save:
                messages.success(
                    request,
                    f"“{datasource}”: got an access token"
                    + _expiry_note(result.token)
                    + " — the datasource is ready to use.",
                )
        elif result.outcome == "skipped":
            messages.warning(
                request, f"“{datasource}”: {result.error or 'another refresh is in progress'}."
            )
        else:
            hint = explain(result.error)
            messages.error(
                request,
                f"“{datasource}”: getting a token failed: {result.error}"
                + (f" — {hint}" if hint else ""),
            )
    if done and not after_save:
        messages.success(
            request,
            ngettext("Refreshed %(count)d datasource.", "Refreshed %(count)d datasources.", done)
            % {"count": done},
        )


def _expiry_note(token: Token | None) -> str:
    from .dashboard import time_to_expiry

    if token is None or not token.access_token:
        return ""
    return f" (expires {time_to_expiry(token)})"


# --- work handed to Celery ----------------------------------------------------------------


def _enqueue(request: HttpRequest, task, argument_lists: list[tuple]) -> bool:
    """Send the tasks through one producer; on a broker problem say so instead of a 500."""
    try:
        with task.app.producer_or_acquire() as producer:
            for arguments in argument_lists:
                task.apply_async(arguments, producer=producer)
    except Exception as err:  # kombu's OperationalError, OSError, a bad broker URL …
        logger.warning("could not enqueue %s: %s", task.name, err)
        messages.error(
            request,
            f"The task queue is unreachable ({type(err).__name__}): nothing was queued. Start "
            "the broker and a Celery worker, or run manage.py refresh_tokens.",
        )
        return False
    return True


def enqueue_refreshes(request: HttpRequest, datasources: list[Datasource]) -> None:
    """Bulk "refresh now": one background task per token, so the page answers at once."""
    from ..tasks import refresh_now

    ids = list(
        Token.objects.filter(datasource__in=datasources)
        .exclude(status=TokenStatus.NOT_AUTHORIZED, datasource__grant_type="authorization_code")
        .values_list("pk", flat=True)
    )
    if not ids:
        messages.warning(request, "None of the selected datasources has a token to refresh.")
        return
    if _enqueue(request, refresh_now, [(pk,) for pk in ids]):
        messages.success(
            request,
            ngettext(
                "Queued %(count)d token refresh; the result shows on the datasource's page "
                "within seconds while a worker runs.",
                "Queued %(count)d token refreshes; the results show on the datasources' pages "
                "within seconds while a worker runs.",
                len(ids),
            )
            % {"count": len(ids)},
        )


def revoke_after_delete(request: HttpRequest, datasources: list[Datasource]) -> None:
    """Deleting: the tokens are revoked at the provider by a worker once the deletion is
    committed (what they need travels encrypted in the message)."""
    from ..tasks import revoke_deleted

    payloads = [p for p in (adminjobs.revocation_payload(ds) for ds in datasources) if p]
    if payloads:
        transaction.on_commit(
            lambda: (
                _enqueue(request, revoke_deleted, [(p,) for p in payloads])
                and messages.info(
                    request,
                    ngettext(
                        "The deleted datasource's tokens are being revoked at the provider.",
                        "The deleted datasources' tokens are being revoked at their providers.",
                        len(payloads),
                    ),
                )
            )
        )


def confirm_bulk_disconnect(model_admin, request: HttpRequest, queryset):
    """The bulk action asks first, as Django's delete action does; revocations run as tasks."""
    from ..tasks import revoke_deleted

    if request.POST.get("post") == "yes":
        datasources = list(queryset)
        payloads = [p for p in (adminjobs.revocation_payload(ds) for ds in datasources) if p]
        for datasource in datasources:
            datasource.revocation_url = ""  # forget here now; the worker revokes (below)
            tokens.disconnect(datasource)
        if payloads:
            _enqueue(request, revoke_deleted, [(p,) for p in payloads])
        model_admin.message_user(
            request,
            ngettext(
                "Disconnected %(count)d datasource.",
                "Disconnected %(count)d datasources.",
                len(datasources),
            )
            % {"count": len(datasources)}
            + (" Their tokens are being revoked at the provider." if payloads else ""),
            messages.SUCCESS,
        )
        return None
    context = {
        **model_admin.admin_site.each_context(request),
        "title": "Disconnect the selected datasources?",
        "opts": Datasource._meta,
        "queryset": queryset,
        "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
    }
    return TemplateResponse(
        request, "admin/datasources/datasource/disconnect_selected_confirmation.html", context
    )
