"""Admin report pages: stats, request browser, request detail and the feedback join."""

from __future__ import annotations

import hashlib
import json
import math
import re
from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from experiments.models import PROMPT_HASH_DELETED, PROMPT_HASH_FAILED, ExperimentRequest
from experiments.prompts.store import get_prompt_store
from experiments.reports.browser import browse_requests
from experiments.reports.filters import BrowserFilters
from gateway.models import GatewayUsage
from tests.factories import StaffUserFactory, SuperUserFactory
from tests.report_seed import seed_experiment


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def seeded(db):
    return seed_experiment(subjects=60, requests=180)


@pytest.fixture
def staff_client(client, db):
    client.force_login(SuperUserFactory())
    return client


@pytest.fixture
def prompt_dir(tmp_path, settings):
    settings.PROMPT_STORE_DIR = tmp_path / "prompts"
    return settings.PROMPT_STORE_DIR


def url(name, seeded, *extra):
    return reverse(name, args=[seeded.experiment.pk, *extra])


# --- access -------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "admin:experiments_experiment_stats",
        "admin:experiments_experiment_requests",
        "admin:experiments_experiment_feedback",
    ],
)
def test_staff_without_view_permission_is_refused(client, seeded, name):
    client.force_login(StaffUserFactory())
    assert client.get(url(name, seeded)).status_code == 403


def test_anonymous_visitor_is_sent_to_the_admin_login(client, seeded):
    response = client.get(url("admin:experiments_experiment_stats", seeded))
    assert response.status_code == 302 and "/admin/login/" in response["Location"]


def test_view_permission_alone_opens_the_stats_page(client, seeded):
    viewer = StaffUserFactory()
    viewer.user_permissions.add(Permission.objects.get(codename="view_experiment"))
    client.force_login(viewer)
    assert client.get(url("admin:experiments_experiment_stats", seeded)).status_code == 200


# --- stats --------------------------------------------------------------------


def test_stats_page_renders_figures_and_three_charts(staff_client, seeded):
    response = staff_client.get(url("admin:experiments_experiment_stats", seeded))
    body = response.content.decode()
    assert response.status_code == 200
    assert body.count('class="mx-chart"') == 3
    for internal_id in ("rc-alpha-1", "rc-alpha-2", "rc-bravo-1"):
        assert internal_id in body
    assert "hot-swap → slot-a v2" in body


@pytest.mark.parametrize("window", ["hour", "day", "week", "all"])
def test_stats_page_renders_for_every_window(staff_client, seeded, window):
    response = staff_client.get(
        url("admin:experiments_experiment_stats", seeded), {"window": window}
    )
    assert response.status_code == 200


def test_stats_page_custom_window_counts_only_rows_inside(staff_client, seeded):
    since = seeded.start + timedelta(minutes=30)
    until = seeded.start + timedelta(minutes=90)
    response = staff_client.get(
        url("admin:experiments_experiment_stats", seeded),
        {
            "window": "custom",
            "since": since.strftime("%Y-%m-%dT%H:%M"),
            "until": until.strftime("%Y-%m-%dT%H:%M"),
        },
    )
    expected = len([r for r in seeded.requests if since <= r.created_at < until])
    assert response.context["report"].total_requests == expected


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"window": "custom", "since": "tomorrow-ish"}, "Bad since"),
        ({"window": "custom", "since": "2025-02-01T00:00", "until": "2025-01-01T00:00"}, "since"),
        ({"subject": "robot"}, "subject kind"),
        ({"window": "fortnight"}, "Unknown window"),
    ],
)
def test_stats_page_bad_filter_shows_a_clear_error(staff_client, seeded, params, message):
    response = staff_client.get(url("admin:experiments_experiment_stats", seeded), params)
    assert response.status_code == 400
    assert message in response.context["error"]


def test_stats_page_shows_prominent_warning_for_a_skewed_split(staff_client, db):
    seeded = seed_experiment(subjects=200, requests=300, share_of_slot_a=0.7)
    body = staff_client.get(url("admin:experiments_experiment_stats", seeded)).content.decode()
    assert 'id="srm-warning"' in body


def test_stats_page_has_no_warning_for_a_balanced_split(staff_client, seeded):
    body = staff_client.get(url("admin:experiments_experiment_stats", seeded)).content.decode()
    assert 'id="srm-warning"' not in body and "No sample-ratio mismatch" in body


def test_report_pages_never_select_the_encrypted_key_nor_show_it(
    staff_client, db, canary_key, prompt_dir
):
    seeded = seed_experiment(subjects=30, requests=60, api_key=canary_key)
    row = seeded.requests[0]
    pages = [
        url("admin:experiments_experiment_stats", seeded),
        url("admin:experiments_experiment_requests", seeded),
        url("admin:experiments_experiment_request_detail", seeded, row.usage_id),
        url("admin:experiments_experiment_feedback", seeded),
    ]
    with CaptureQueriesContext(connection) as queries:
        bodies = [staff_client.get(page) for page in pages]
    assert [b.status_code for b in bodies] == [200, 200, 200, 200]
    assert not [q["sql"] for q in queries.captured_queries if "encrypted_api_key" in q["sql"]]
    assert not [
        page for page, b in zip(pages, bodies, strict=True) if canary_key in b.content.decode()
    ]


# --- request browser ----------------------------------------------------------


def test_request_list_shows_newest_first_with_checkpoint_and_slot(staff_client, seeded):
    response = staff_client.get(url("admin:experiments_experiment_requests", seeded))
    rows = response.context["page"].rows
    newest = max(seeded.requests, key=lambda r: (r.created_at, r.usage_id))
    assert rows[0].usage_id == newest.usage_id
    assert rows[0].internal_id in response.content.decode()


def test_request_list_filters_by_checkpoint(staff_client, seeded):
    version = seeded.versions["a1"]
    response = staff_client.get(
        url("admin:experiments_experiment_requests", seeded), {"checkpoint": str(version.pk)}
    )
    assert {row.version_id for row in response.context["page"].rows} == {version.pk}


def test_request_list_filters_by_client_request_id(staff_client, seeded):
    wanted = next(r.client_request_id for r in seeded.requests if r.client_request_id)
    response = staff_client.get(
        url("admin:experiments_experiment_requests", seeded), {"client_request_id": wanted}
    )
    expected = {r.usage_id for r in seeded.requests if r.client_request_id == wanted}
    assert {row.usage_id for row in response.context["page"].rows} == expected


@pytest.mark.parametrize(
    "params", [{"cursor": "not-a-cursor"}, {"slot": "nope"}, {"status": "teapot"}]
)
def test_request_list_bad_parameter_gives_a_clear_error(staff_client, seeded, params):
    response = staff_client.get(url("admin:experiments_experiment_requests", seeded), params)
    assert response.status_code == 400 and response.context["error"]


def test_request_list_next_link_leads_to_the_following_page(staff_client, seeded):
    first = staff_client.get(url("admin:experiments_experiment_requests", seeded))
    second = staff_client.get(
        url("admin:experiments_experiment_requests", seeded) + "?" + first.context["next_query"]
    )
    first_ids = [r.usage_id for r in first.context["page"].rows]
    second_ids = [r.usage_id for r in second.context["page"].rows]
    assert second_ids and not set(first_ids) & set(second_ids)
    assert first.context["page"].rows[-1].created_at >= second.context["page"].rows[0].created_at


def test_request_of_another_experiment_is_not_found(staff_client, seeded):
    other = seed_experiment(subjects=5, requests=5, seed=3)
    response = staff_client.get(
        url("admin:experiments_experiment_request_detail", seeded, other.requests[0].usage_id)
    )
    assert response.status_code == 404


# --- prompt inflation ---------------------------------------------------------


def set_body_hash(usage_id, sha256):
    ExperimentRequest.objects.filter(usage_id=usage_id).update(request_body_sha256=sha256)


def test_request_detail_inflates_the_prompt_from_the_store(staff_client, seeded, prompt_dir):
    body = {
        "model": "kilo/preview-foo",
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "Grüße — what is 2+2?"},
        ],
    }
    canonical = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    sha256 = get_prompt_store().put(canonical)
    row = seeded.requests[0]
    set_body_hash(row.usage_id, sha256)
    response = staff_client.get(
        url("admin:experiments_experiment_request_detail", seeded, row.usage_id)
    )
    prompt = response.context["prompt"]
    assert prompt.state == "ok"
    assert prompt.messages == [("system", "Be terse."), ("user", "Grüße — what is 2+2?")]
    assert "Grüße" in response.content.decode()


@pytest.mark.parametrize(
    ("sentinel", "state"), [(PROMPT_HASH_FAILED, "failed"), (PROMPT_HASH_DELETED, "deleted")]
)
def test_sentinel_hash_is_shown_without_touching_the_store(
    staff_client, seeded, sentinel, state, settings
):
    # An unusable store path: reading it would fail, so the page must not try.
    settings.PROMPT_STORE_DIR = "/dev/null/not-a-dir"
    row = seeded.requests[0]
    set_body_hash(row.usage_id, sentinel)
    response = staff_client.get(
        url("admin:experiments_experiment_request_detail", seeded, row.usage_id)
    )
    assert response.context["prompt"].state == state
    assert sentinel in response.content.decode()


def test_missing_blob_shows_prompt_not_found(staff_client, seeded, prompt_dir):
    row = seeded.requests[0]
    set_body_hash(row.usage_id, hashlib.sha256(b"never stored").hexdigest())
    response = staff_client.get(
        url("admin:experiments_experiment_request_detail", seeded, row.usage_id)
    )
    assert "Prompt not found" in response.content.decode()


def test_truncated_body_is_shown_as_text(staff_client, seeded, prompt_dir):
    sha256 = get_prompt_store().put(b'{"messages": [{"role": "user", "content": "abc')
    row = seeded.requests[0]
    set_body_hash(row.usage_id, sha256)
    response = staff_client.get(
        url("admin:experiments_experiment_request_detail", seeded, row.usage_id)
    )
    assert response.context["prompt"].raw_text.endswith('"abc')


# --- feedback join ------------------------------------------------------------


def test_pasted_ids_show_the_serving_checkpoint_or_not_found(staff_client, seeded):
    known = next(r for r in seeded.requests if r.client_request_id)
    response = staff_client.post(
        url("admin:experiments_experiment_feedback", seeded),
        {"ids": f"{known.client_request_id}\n\nno-such-id\n"},
    )
    matches = {m.client_request_id: m for m in response.context["matches"]}
    expected = {
        r.version_id for r in seeded.requests if r.client_request_id == known.client_request_id
    }
    assert {row.version_id for row in matches[known.client_request_id].rows} == expected
    assert matches["no-such-id"].rows == []
    assert "not found" in response.content.decode()


def test_uploaded_csv_uses_the_client_request_id_column(staff_client, seeded):
    known = next(r for r in seeded.requests if r.client_request_id)
    upload = SimpleUploadedFile(
        "feedback.csv",
        f"rating,client_request_id\n5,{known.client_request_id}\n1,missing-id\n".encode(),
        content_type="text/csv",
    )
    response = staff_client.post(
        url("admin:experiments_experiment_feedback", seeded), {"file": upload}
    )
    assert [m.client_request_id for m in response.context["matches"]] == [
        known.client_request_id,
        "missing-id",
    ]


def test_uploaded_csv_without_header_uses_the_first_column(staff_client, seeded):
    upload = SimpleUploadedFile("ids.csv", b"id-1,good\nid-2,bad\n", content_type="text/csv")
    response = staff_client.post(
        url("admin:experiments_experiment_feedback", seeded), {"file": upload}
    )
    assert [m.client_request_id for m in response.context["matches"]] == ["id-1", "id-2"]


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({}, "Paste at least one"),
        ({"file": ("x.csv", b"\xff\xfe\x00\x01binary")}, "not UTF-8"),
        ({"file": ("x.csv", b"")}, "empty"),
    ],
)
def test_bad_feedback_input_gives_a_clear_error(staff_client, seeded, payload, message):
    if "file" in payload:
        name, content = payload["file"]
        payload = {"file": SimpleUploadedFile(name, content, content_type="text/csv")}
    response = staff_client.post(url("admin:experiments_experiment_feedback", seeded), payload)
    assert response.status_code == 400 and message in response.context["error"]


def test_feedback_join_is_scoped_to_the_experiment(staff_client, seeded):
    other = seed_experiment(subjects=5, requests=5, seed=3)
    # Same client request id served by another experiment: not this one's row.
    ExperimentRequest.objects.filter(usage_id=other.requests[1].usage_id).update(
        client_request_id="shared-id"
    )
    response = staff_client.post(
        url("admin:experiments_experiment_feedback", seeded), {"ids": "shared-id"}
    )
    assert response.context["matches"][0].rows == []


# --- keyset pagination --------------------------------------------------------


def walk_pages(experiment, filters=None, page_size=7):
    seen, cursor, pages = [], None, 0
    while True:
        page = browse_requests(experiment, filters, cursor=cursor, page_size=page_size)
        seen += page.rows
        pages += 1
        if not page.next_cursor:
            return seen, pages
        cursor = page.next_cursor


def test_keyset_pages_return_every_row_exactly_once_in_order(seeded):
    seen, pages = walk_pages(seeded.experiment)
    keys = [(row.created_at, row.usage_id) for row in seen]
    assert len(keys) == len(set(keys)) == len(seeded.requests)
    assert keys == sorted(keys, reverse=True)
    assert pages == -(-len(seeded.requests) // 7)


def test_keyset_pages_break_ties_between_equal_timestamps(db):
    seeded = seed_experiment(subjects=10, requests=40)
    # Everything at one instant: only usage_id orders the rows. (Both rows of a request
    # keep the same created_at, as SPEC §2 requires and the foreign key checks.)
    ids = [r.usage_id for r in seeded.requests]
    GatewayUsage.objects.filter(id__in=ids).update(created_at=seeded.start)
    ExperimentRequest.objects.filter(usage_id__in=ids).update(created_at=seeded.start)
    seen, _ = walk_pages(seeded.experiment, page_size=6)
    ids = [row.usage_id for row in seen]
    assert sorted(ids, reverse=True) == ids and len(set(ids)) == 40


def test_keyset_pages_with_a_filter_return_exactly_the_matching_rows(seeded):
    seen, _ = walk_pages(seeded.experiment, BrowserFilters(status="error"))
    assert {row.usage_id for row in seen} == {r.usage_id for r in seeded.requests if r.has_error}


def test_stats_page_shows_errors_by_kind_and_says_a_window_was_widened(staff_client, seeded):
    since = (seeded.start.replace(second=0) + timedelta(minutes=5, seconds=30)).isoformat()
    response = staff_client.get(
        url("admin:experiments_experiment_stats", seeded), {"window": "custom", "since": since[:19]}
    )
    page = response.content.decode()
    assert "upstream 5xx<" in page and "timeout<" in page and "rate limit<" in page
    assert "widened to whole minutes" in page


def _table_rows(page: str, table_id: str) -> dict[str, list[str]]:
    """The cells of a table's body rows by the checkpoint's internal id, tags removed."""
    table = page[page.index(f'id="{table_id}"') :]
    body = table[table.index("<tbody>") : table.index("</tbody>")]
    rows = {}
    for row in re.findall(r"<tr>(.*?)</tr>", body, re.S):
        cells = [
            " ".join(re.sub(r"<[^>]+>", " ", c).split())
            for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)
        ]
        rows[re.search(r"<code>(.*?)</code>", row).group(1)] = cells
    return rows


def _percentile(values, fraction):
    ordered = sorted(values)
    rank = fraction * (len(ordered) - 1)
    low, high = ordered[math.floor(rank)], ordered[math.ceil(rank)]
    return low + (rank - math.floor(rank)) * (high - low)


def test_stats_page_shows_each_checkpoints_quality_signals_from_the_raw_rows(staff_client, seeded):
    page = staff_client.get(url("admin:experiments_experiment_stats", seeded)).content.decode()
    errors = _table_rows(page, "errors-by-kind")
    finishes = _table_rows(page, "finish-reasons")
    categories = ("auth", "rate_limit", "upstream_5xx", "timeout")
    categories += ("client_disconnect", "bad_request", "other")
    reasons = ("stop", "length", "tool_calls", "content_filter", "other", None)
    for version in seeded.versions.values():
        rows = [r for r in seeded.requests if r.version_id == version.pk]
        failed = [r for r in rows if r.has_error]
        expected = [str(len(failed))] + [
            str(sum(r.error_category == c for r in failed)) for c in categories
        ]
        assert errors[version.internal_id][1:] == expected
        answered = [r for r in rows if not r.has_error]
        shares = [
            f"{sum(r.finish_reason == reason for r in answered) / len(answered) * 100:.2f}%"
            for reason in reasons
        ]
        speeds = [
            r.output_tokens * 1000 / (r.total_ms - r.ttfb_ms)
            for r in rows
            if r.ttfb_ms is not None and r.total_ms > r.ttfb_ms
        ]
        cells = finishes[version.internal_id]
        assert cells[1:8] == [str(len(answered)), *shares]
        assert cells[8] == shares[2]  # the tool-call rate
        shown = re.fullmatch(r"(\d+\.\d) / (\d+\.\d) tok/s", cells[9])
        for value, fraction in zip(shown.groups(), (0.5, 0.95), strict=True):
            exact = _percentile(speeds, fraction)
            assert float(value) == pytest.approx(exact, rel=0.01, abs=0.05)


RAW_TABLES = ("model_experiment_request", "gateway_usage")


@pytest.mark.parametrize("window", ["all", "hour", "day", "week"])
def test_stats_page_reads_no_raw_row(staff_client, seeded, window):
    with CaptureQueriesContext(connection) as queries:
        response = staff_client.get(
            url("admin:experiments_experiment_stats", seeded),
            {"window": window, "subject": "machine"},
        )
    assert response.status_code == 200
    assert queries.captured_queries
    assert not [q for q in queries.captured_queries if any(t in q["sql"] for t in RAW_TABLES)]


def test_request_detail_names_how_the_request_ended(staff_client, seeded):
    """A failed request's page names its error category and the gateway's kind; a successful
    one its finish reason, in the Stats page's words."""
    failed = next(r for r in seeded.requests if r.has_error and r.error_category)
    page = staff_client.get(
        url("admin:experiments_experiment_request_detail", seeded, failed.usage_id)
    ).content.decode()
    status = re.search(r"<th>Status</th><td>(.*?)</td>", page, re.S).group(1)
    status_text = " ".join(re.sub(r"<[^>]+>", " ", status).split())
    label = {"upstream_5xx": "upstream 5xx", "rate_limit": "rate limit"}.get(
        failed.error_category, failed.error_category.replace("_", " ")
    )
    assert status_text == f"{failed.status_code} {label} {failed.error_kind}"
    answered = next(r for r in seeded.requests if not r.has_error and r.finish_reason)
    page = staff_client.get(
        url("admin:experiments_experiment_request_detail", seeded, answered.usage_id)
    ).content.decode()
    shown = re.search(r'<td id="finish-reason">(.*?)</td>', page, re.S).group(1)
    assert shown == answered.finish_reason.replace("_", " ")
