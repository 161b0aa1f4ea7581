"""Admin report pages, included in config/urls.py ahead of admin.site.urls so these
paths under /admin/experiments/experiment/<id>/ win over the admin's catch-all."""

from django.urls import path

from experiments import report_views

urlpatterns = [
    path(
        "experiments/experiment/<uuid:pk>/stats/",
        report_views.experiment_stats,
        name="experiments_experiment_stats",
    ),
    path(
        "experiments/experiment/<uuid:pk>/requests/",
        report_views.experiment_requests,
        name="experiments_experiment_requests",
    ),
    path(
        "experiments/experiment/<uuid:pk>/requests/<uuid:usage_id>/",
        report_views.experiment_request_detail,
        name="experiments_experiment_request_detail",
    ),
    path(
        "experiments/experiment/<uuid:pk>/feedback/",
        report_views.experiment_feedback,
        name="experiments_experiment_feedback",
    ),
]
