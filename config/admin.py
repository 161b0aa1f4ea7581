"""The admin site's name and links (the default site, through ``config.apps.AdminConfig``)."""

from django.contrib import admin


class ModelExperimentsAdminSite(admin.AdminSite):
    site_header = "Model Experiments"
    site_title = "Model Experiments"
    index_title = "Experiments, checkpoints and gateway tokens"
    #: No "View site" link: there is no public site, the gateway answers SDKs in JSON.
    site_url = None
