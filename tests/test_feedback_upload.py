"""The feedback page's CSV upload: every row checked before anything is stored, extra
columns kept in the comment, what joined shown; in forms and in headless chromium."""

from __future__ import annotations

import os

import pytest
from django.contrib.auth.models import Permission
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse

from experiments.models import Feedback
from tests.browser import chromium_page, screenshot
from tests.factories import StaffUserFactory, SuperUserFactory
from tests.report_seed import seed_experiment


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def seeded(db):
    return seed_experiment(subjects=30, requests=90)


def page_url(seeded) -> str:
    return reverse("admin:experiments_experiment_feedback", args=[seeded.experiment.pk])


def upload(client, seeded, text: str | bytes, name: str = "feedback.csv"):
    content = text.encode() if isinstance(text, str) else text
    return client.post(
        page_url(seeded),
        {"feedback_csv": SimpleUploadedFile(name, content, content_type="text/csv")},
    )


def served_ids(seeded, count: int) -> list[str]:
    return list(dict.fromkeys(r.client_request_id for r in seeded.requests if r.client_request_id))[
        :count
    ]


def test_a_good_file_is_stored_with_its_uploader_and_extra_columns_in_the_comment(client, seeded):
    staff = SuperUserFactory()
    client.force_login(staff)
    first, second = served_ids(seeded, 2)
    response = upload(
        client,
        seeded,
        "Client_Request_ID,rating,comment,channel,ticket\n"
        f'{first},up,"Clear, and right",email,T-1\n'
        f"{second},DOWN,,,\n"
        "\n"
        "not-served-yet,down,Too slow,chat,\n",
    )
    assert response.status_code == 200
    rows = {f.client_request_id: f for f in Feedback.objects.all()}
    assert set(rows) == {first, second, "not-served-yet"}
    assert rows[first].comment == "Clear, and right\nchannel: email\nticket: T-1"
    assert rows[second].comment == "" and rows[second].rating == "down"
    assert rows["not-served-yet"].comment == "Too slow\nchannel: chat"
    assert {(f.source, f.submitted_by_id) for f in rows.values()} == {("csv", staff.pk)}
    assert rows[first].variant_version_id is not None
    assert rows["not-served-yet"].variant_version_id is None
    states = {row.client_request_id: row.state for row in response.context["stored"]}
    assert states == {first: "joined", second: "joined", "not-served-yet": "pending"}
    page = response.content.decode()
    assert "Stored 3 ratings: 2 joined a checkpoint of this experiment" in page


@pytest.mark.parametrize(
    ("text", "problems"),
    [
        pytest.param(
            "client_request_id,rating,comment\n"
            "ok-1,up,fine\n"
            ",up,no id\n"
            "ok-2,sideways,\n"
            "bad\x01id,down,\n"
            f"ok-3,up,{'x' * 4001}\n"
            "ok-4,up,one,too many\n",
            [
                "Line 3: client_request_id is missing or empty.",
                'Line 4: rating must be "up" or "down" (got \'sideways\').',
                "Line 5: client_request_id must be printable characters only",
                "Line 6: comment is 4,001 characters long",
                "Line 7: 4 values but the header names 3 columns.",
            ],
            id="bad-rows",
        ),
        pytest.param(
            'client_request_id,rating,comment\nok-1,up,"multi\nline"\nok-2,,\n',
            ["Line 4: rating must be"],
            id="line-numbers-after-a-quoted-newline",
        ),
        pytest.param("id,score\nx,1\n", ["client_request_id and rating is missing"], id="header"),
        pytest.param("ok-1,up,fine\n", ["the header must name the columns"], id="no-header"),
        pytest.param(
            "client_request_id,rating,rating\nx,up,up\n", ["rating repeated"], id="repeated-column"
        ),
        pytest.param("", ["The CSV file is empty."], id="empty"),
        pytest.param("client_request_id,rating\n", ["header but no feedback rows"], id="no-rows"),
        pytest.param(b"\xff\xfe\x00binary", ["not UTF-8"], id="binary"),
    ],
)
def test_a_bad_file_stores_nothing_and_lists_every_problem_by_line(client, seeded, text, problems):
    client.force_login(SuperUserFactory())
    response = upload(client, seeded, text)
    assert response.status_code == 400
    assert not Feedback.objects.exists()
    listed = response.context["upload_problems"]
    assert len(listed) == len(problems), listed
    for expected, found in zip(problems, listed, strict=True):
        assert expected in found
    assert "Nothing was stored" in response.context["error"]


def test_a_viewer_without_the_add_permission_can_look_up_but_not_upload(client, seeded):
    viewer = StaffUserFactory()
    viewer.user_permissions.add(Permission.objects.get(codename="view_experiment"))
    client.force_login(viewer)
    page = client.get(page_url(seeded))
    assert page.status_code == 200 and "feedback-upload-form" not in page.content.decode()
    (known,) = served_ids(seeded, 1)
    response = upload(client, seeded, f"client_request_id,rating\n{known},up\n")
    assert response.status_code == 403
    assert not Feedback.objects.exists()
    lookup = client.post(page_url(seeded), {"ids": known})
    assert lookup.status_code == 200 and lookup.context["found"] == 1


# --- in a real browser ---------------------------------------------------------------------

os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"


@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
def test_staff_upload_a_feedback_csv_fix_it_and_see_it_on_the_stats_page(live_server, tmp_path):
    seeded = seed_experiment(subjects=60, requests=240)
    SuperUserFactory(username="feedback-admin")
    served = served_ids(seeded, 6)
    bad = tmp_path / "feedback-bad.csv"
    bad.write_text(
        "client_request_id,rating,comment,channel\n"
        f"{served[0]},up,Helpful,email\n"
        f"{served[1]},meh,,chat\n"
        ",down,no id,chat\n"
    )
    good = tmp_path / "feedback.csv"
    good.write_text(
        "client_request_id,rating,comment,channel\n"
        + "".join(
            f"{cid},{'up' if index % 3 else 'down'},answer {index},email\n"
            for index, cid in enumerate(served)
        )
        + "unknown-request,down,,chat\n"
    )
    with chromium_page(width=1360) as page:
        page.goto(f"{live_server.url}/admin/login/")
        page.fill("#id_username", "feedback-admin")
        page.fill("#id_password", "pw-for-tests-1234")
        page.click("input[type=submit]")
        page.goto(live_server.url + page_url(seeded))

        page.set_input_files("#id_feedback_csv", str(bad))
        page.click("#feedback-upload-form input[type=submit]")
        problems = page.locator("#feedback-upload-problems li")
        problems.first.wait_for()
        assert problems.count() == 2
        assert "Line 3" in problems.nth(0).inner_text()
        assert "Line 4" in problems.nth(1).inner_text()
        assert "Nothing was stored" in page.locator(".errornote").inner_text()
        screenshot(page, "feedback-upload-refused")
        assert not Feedback.objects.exists()

        page.set_input_files("#id_feedback_csv", str(good))
        page.click("#feedback-upload-form input[type=submit]")
        summary = page.locator("#feedback-stored-summary")
        summary.wait_for()
        assert "Stored 7 ratings: 6 joined a checkpoint of this experiment" in summary.inner_text()
        assert page.locator("#feedback-stored tr.mx-feedback-pending").count() == 1
        assert "channel: email" in page.locator("#feedback-stored").inner_text()
        screenshot(page, "feedback-upload-stored")

        page.goto(f"{live_server.url}/admin/experiments/experiment/{seeded.experiment.pk}/stats/")
        counts = page.locator("td.mx-feedback-counts").all_inner_texts()
        ups = sum(int(text.split("/")[0]) for text in counts)
        downs = sum(int(text.split("/")[1]) for text in counts)
        assert (ups, downs) == (4, 2)
        assert "Wilson" in page.locator("#report-notes").inner_text()
        page.locator("#checkpoints").scroll_into_view_if_needed()
        screenshot(page, "feedback-stats")
