"""Who calls the JSON API: an API key (``Authorization: Api-Key <key>``, or ``X-Api-Key``),
what it may do (its permissions) and which datasources (its scope)."""

from __future__ import annotations

from django.http import HttpRequest
from django.views.decorators.debug import sensitive_variables
from ninja.security import APIKeyHeader

from ..models import PERMISSIONS, ApiKey, Datasource
from ..proxy import apikeys
from ..proxy.callers import api_key_of
from .errors import ApiError


class ApiKeyAuth(APIKeyHeader):
    """``Authorization: Api-Key <key>`` (or ``X-Api-Key: <key>``). The key's row is the
    request's ``auth``."""

    param_name = "Authorization"

    def _get_key(self, request: HttpRequest) -> str | None:
        return api_key_of(request.headers) or None

    @sensitive_variables()
    def authenticate(self, request: HttpRequest, key: str | None) -> ApiKey | None:
        if not key:
            return None
        return apikeys.authenticate(key)


def require(request: HttpRequest, permission: str) -> ApiKey:
    """The request's key, or 403 when it lacks ``permission`` (a name of PERMISSIONS)."""
    api_key: ApiKey = request.auth
    if not getattr(api_key, PERMISSIONS[permission]):
        raise ApiError(
            403,
            "forbidden",
            f"This API key lacks the {permission!r} permission.",
            permission=permission,
        )
    return api_key


def datasource_for(api_key: ApiKey, slug: str) -> Datasource:
    """The datasource ``slug`` if the key may use it: 404 unknown, 403 outside its scope."""
    datasource = Datasource.objects.filter(slug=slug).first()
    if datasource is None:
        raise ApiError(404, "not_found", f"No datasource with slug {slug!r}.")
    if not in_scope(api_key, datasource.pk):
        raise ApiError(403, "forbidden", "This API key may not use this datasource.")
    return datasource


def in_scope(api_key: ApiKey, datasource_id: int) -> bool:
    allowed = apikeys.allowed_datasource_ids(api_key)
    return allowed is None or datasource_id in allowed
