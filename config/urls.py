from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    # Report pages live under the experiment's admin URL; listed first so the
    # admin's catch-all does not swallow them.
    path("admin/", include("experiments.report_urls")),
    path("admin/", admin.site.urls),
    path("", include("gateway.urls")),
]
