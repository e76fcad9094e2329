from django.urls import path

from .authorize import views
from .ops import views as ops
from .proxy.view import proxy

app_name = "datasources"

urlpatterns = [
    path("healthz", ops.healthz, name="healthz"),
    path("metrics", ops.metrics, name="metrics"),
    path("api/v1/datasources/authorize", views.authorization_callback, name="callback"),
    path("api/v1/datasources/<slug:slug>/connect", views.connect, name="connect"),
    path("api/v1/datasources/<slug:slug>/proxy/", proxy, name="proxy-root"),
    path("api/v1/datasources/<slug:slug>/proxy/<path:path>", proxy, name="proxy"),
]
