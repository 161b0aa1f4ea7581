from django.contrib import admin
from django.templatetags.static import static
from django.urls import include, path
from django.views.generic import RedirectView

urlpatterns = [
    path("admin/", admin.site.urls),
    path("", include("gateway.urls")),
    # Browsers ask for it on any page; the admin's pages link the same icon.
    path("favicon.ico", RedirectView.as_view(url=static("experiments/favicon.svg"))),
]
