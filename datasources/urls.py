from django.urls import path

from . import proxy, views

app_name = "datasources"

urlpatterns = [
    path("api/v1/datasources/authorize", views.authorization_callback, name="callback"),
    path("api/v1/datasources/<slug:slug>/proxy/", proxy.proxy, name="proxy-root"),
    path("api/v1/datasources/<slug:slug>/proxy/<path:path>", proxy.proxy, name="proxy"),
]
