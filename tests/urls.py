from django.contrib.auth.views import LoginView
from django.urls import include, path

from config.urls import urlpatterns as project_urlpatterns

from . import upstream

urlpatterns = [
    path("o/", include("oauth2_provider.urls", namespace="oauth2_provider")),
    path("accounts/login/", LoginView.as_view(), name="login"),
    path("upstream/<path:path>", upstream.echo, name="upstream"),
    *project_urlpatterns,
]
