"""The stats page and request browser name checkpoints, show effective seconds, say
what was computed on which database, and show an empty state instead of empty charts."""

from __future__ import annotations

import html
from datetime import timedelta

import pytest
from django.db import connection
from django.urls import reverse
from django.utils import timezone

from experiments import services
from experiments.models import VariantVersion
from experiments.reports.filters import ReportFilters
from experiments.reports.report import experiment_report
from tests.factories import SuperUserFactory, make_experiment
from tests.report_seed import seed_experiment


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def staff_client(client, db):
    client.force_login(SuperUserFactory())
    return client


@pytest.fixture
def seeded(db):
    seeded = seed_experiment(subjects=40, requests=120)
    slot_a = seeded.versions["a2"].variant
    services.rotate_key(variant=slot_a, api_key="sk-rotated-partner-key")
    return seeded


def _page(client, name: str, experiment, query: str = "") -> str:
    response = client.get(reverse(name, args=[experiment.pk]) + query)
    assert response.status_code == 200
    return html.unescape(response.content.decode())


def test_stats_page_names_checkpoints_and_shows_effective_seconds(staff_client, seeded):
    body = _page(staff_client, "admin:experiments_experiment_stats", seeded.experiment)
    assert "slot-a v1" in body and "slot-a v2" in body and "slot-b v1" in body
    assert "slot-a v2.1" in body and "key rotated" in body
    a2 = seeded.versions["a2"]
    assert f"{a2.effective_at:%Y-%m-%d %H:%M:%S}" in body
    # The legend names each checkpoint and its internal id.
    assert "slot-a v2 (rc-alpha-2)" in body


def test_request_browser_names_the_serving_checkpoint(staff_client, seeded):
    body = _page(staff_client, "admin:experiments_experiment_requests", seeded.experiment)
    assert "slot-a v2 <code>rc-alpha-2</code>" in body
    rotated = VariantVersion.objects.get(variant__label="slot-a", key_rotation=1)
    # The checkpoint filter lists every checkpoint by name, with its effective second.
    option = (
        f"slot-a v2.1 · key rotated — rc-alpha-2 (from {rotated.effective_at:%Y-%m-%d %H:%M:%S}"
    )
    assert option in body


def test_footnotes_say_which_database_computed_the_figures(seeded):
    report = experiment_report(seeded.experiment)
    vendor = "PostgreSQL" if connection.vendor == "postgresql" else "SQLite"
    assert report.notes[0].startswith(f"Computed on {vendor} ")
    assert "all-time rows" in report.notes[0]
    assert any("one step per minute" in note for note in report.notes)


def test_footnotes_name_the_widened_window_to_the_second(seeded):
    since = seeded.start + timedelta(minutes=10, seconds=17)
    until = seeded.start + timedelta(hours=3, minutes=2, seconds=5)
    report = experiment_report(seeded.experiment, ReportFilters(since=since, until=until))
    widened = next(note for note in report.notes if "widened to whole minutes" in note)
    floor = since.replace(second=0, microsecond=0)
    ceil = until.replace(second=0, microsecond=0)
    if ceil != until:
        ceil += timedelta(minutes=1)
    assert f"({floor:%Y-%m-%d %H:%M:%S} UTC to {ceil:%Y-%m-%d %H:%M:%S} UTC)" in widened
    assert "whole day" in report.notes[0] or "whole hour" in report.notes[0]


@pytest.mark.django_db
def test_an_experiment_without_requests_shows_an_empty_state_not_empty_charts(staff_client):
    experiment = make_experiment()
    body = _page(staff_client, "admin:experiments_experiment_stats", experiment)
    assert 'id="stats-empty"' in body
    assert "No requests yet" in body and "Activate it to start routing" in body
    assert 'class="mx-chart"' not in body
    assert 'id="comparisons"' not in body and 'id="srm"' not in body
    # The checkpoints are still listed, by name.
    assert "slot-a v1" in body and "slot-b v1" in body


def test_an_empty_window_says_so_and_offers_all_time(staff_client, seeded):
    since = (timezone.now() + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M")
    body = _page(
        staff_client,
        "admin:experiments_experiment_stats",
        seeded.experiment,
        f"?window=custom&since={since}",
    )
    assert "No requests in this window" in body and 'href="?window=all"' in body
    assert 'class="mx-chart"' not in body
