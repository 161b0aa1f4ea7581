from django.urls import path

from gateway import views

urlpatterns = [
    path("healthz", views.healthz, name="healthz"),
]
