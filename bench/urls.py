import requests
from django.http import HttpResponse
from django.urls import path
from django.views.decorators.csrf import csrf_exempt

from config.urls import urlpatterns as project_urlpatterns
from datasources.models import Token


@csrf_exempt
def naive_forward(request, slug, path):
    """The baseline: look the token up, forward with a brand-new session, buffer the answer."""
    token = Token.objects.select_related("datasource").get(datasource__slug=slug)
    with requests.Session() as session:
        upstream = session.request(
            request.method,
            token.datasource.base_url + path,
            headers={"Authorization": f"Bearer {token.access_token}"},
            data=request.body,
            timeout=30,
        )
    return HttpResponse(
        upstream.content,
        status=upstream.status_code,
        content_type=upstream.headers.get("Content-Type"),
    )


urlpatterns = [
    path("naive/<slug:slug>/<path:path>", naive_forward),
    *project_urlpatterns,
]
