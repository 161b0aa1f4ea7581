"""The admin site as a newcomer first sees it (issue #9): its name, its links, its icon."""

from __future__ import annotations

import pytest
from django.contrib.staticfiles import finders
from django.urls import reverse

pytestmark = pytest.mark.django_db


def test_the_admin_is_titled_model_experiments(admin_client):
    page = admin_client.get(reverse("admin:index")).content.decode()
    assert "<title>Experiments, checkpoints and gateway tokens | Model Experiments</title>" in page
    assert '<a href="/admin/">Model Experiments</a>' in page
    assert "Django administration" not in page


def test_the_admin_has_no_view_site_link_to_a_site_that_does_not_exist(admin_client):
    page = admin_client.get(reverse("admin:index")).content.decode()
    assert "View site" not in page


def test_admin_pages_link_an_icon_that_exists(client):
    page = client.get(reverse("admin:login")).content.decode()
    assert '<link rel="icon" href="/static/experiments/favicon.svg" type="image/svg+xml">' in page
    assert finders.find("experiments/favicon.svg")


def test_favicon_ico_leads_to_the_icon(client):
    response = client.get("/favicon.ico")
    assert (response.status_code, response["Location"]) == (302, "/static/experiments/favicon.svg")
