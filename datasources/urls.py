from django.urls import path, re_path

from .api.endpoints import api
from .authorize import views
from .ops import views as ops
from .proxy.route import PATH_PATTERN, ROOT_PATTERN
from .proxy.view import proxy

app_name = "datasources"

urlpatterns = [
    path("healthz", ops.healthz, name="healthz"),
    path("metrics", ops.metrics, name="metrics"),
    path("api/v1/datasources/authorize", views.authorization_callback, name="callback"),
    path("api/v1/datasources/<slug:slug>/connect", views.connect, name="connect"),
    # An end user's connect link: a page for a person, not an API call (/api/v1/connect/...).
    path("connect/<str:secret>", views.connect_link, name="connect-link"),
    # The proxy's URL is defined once (proxy/route.py): the ASGI router and its fast lane match it.
    re_path(ROOT_PATTERN, proxy, name="proxy-root"),
    re_path(PATH_PATTERN, proxy, name="proxy"),
    # The management JSON API and its OpenAPI document (/api/v1/openapi.json).
    path("api/v1/", api.urls),
]
