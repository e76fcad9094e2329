from django.urls import path

from . import views

app_name = "datasources"

urlpatterns = [
    path("api/v1/datasources/authorize", views.authorization_callback, name="callback"),
]
