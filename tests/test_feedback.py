"""Feedback (SPEC §12): ``POST /v1/feedback``, the join to the serving checkpoint (also when
the attribution row lands later), and the per-checkpoint figures, each recomputed
independently from the raw feedback and attribution rows."""

from __future__ import annotations

import csv
import io
import json
import random
import time
import uuid
from collections import Counter
from dataclasses import replace
from datetime import timedelta

import httpx
import pytest
from django.core.management import call_command
from statsmodels.stats.proportion import proportion_confint

from experiments.feedback import (
    MAX_COMMENT_LENGTH,
    FeedbackItem,
    record_feedback,
    rejoin,
    rejoin_recent,
)
from experiments.models import ExperimentRequest, Feedback, FeedbackSource
from experiments.reports.figures import wilson_interval
from experiments.reports.filters import ReportFilters
from experiments.reports.report import experiment_report
from gateway.tokens import create_token
from gateway.views import MAX_FEEDBACK_BODY_BYTES
from tests.factories import UserFactory
from tests.gateway_server import requires_server, wait_until
from tests.gateway_support import active_experiment, wait_listed
from tests.report_seed import insert_requests, seed_experiment
from tests.test_gateway_api_shape import assert_openai_error, call_gateway

CHAT = [{"role": "user", "content": "hello there"}]


def post_feedback(body, **kwargs) -> httpx.Response:
    if isinstance(body, (bytes, str)):
        return call_gateway("POST", "/v1/feedback", content=body, **kwargs)
    return call_gateway("POST", "/v1/feedback", json=body, **kwargs)


# --- the endpoint ----------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_feedback_with_a_token_is_accepted_and_stored_with_its_user_and_no_ip():
    user = UserFactory(username="rater")
    _, token = create_token(user=user)
    response = post_feedback(
        {"client_request_id": " req-1 ", "rating": "up", "comment": "Great answer"},
        headers={"authorization": f"Bearer {token}", "x-forwarded-for": "203.0.113.9"},
    )
    assert response.status_code == 202
    body = response.json()
    assert body["object"] == "feedback" and body["status"] == "accepted"
    row = Feedback.objects.get()
    assert str(row.id) == body["id"]
    assert (row.client_request_id, row.rating, row.comment) == ("req-1", "up", "Great answer")
    assert (row.source, row.submitted_by_id, row.variant_version_id) == ("api", user.pk, None)
    stored = json.dumps(
        {f.attname: str(getattr(row, f.attname)) for f in Feedback._meta.concrete_fields}
    )
    assert "203.0.113.9" not in stored and "127.0.0.1" not in stored and token not in stored


@pytest.mark.django_db(transaction=True)
def test_anonymous_feedback_follows_the_anonymous_setting(settings):
    settings.GATEWAY_ALLOW_ANONYMOUS = True
    response = post_feedback({"client_request_id": "req-a", "rating": "down"})
    assert response.status_code == 202
    assert Feedback.objects.get().submitted_by_id is None
    settings.GATEWAY_ALLOW_ANONYMOUS = False
    response = post_feedback({"client_request_id": "req-b", "rating": "down"})
    assert_openai_error(response, 401, "invalid_api_key")
    assert Feedback.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_a_wrong_token_is_401_and_stores_nothing():
    response = post_feedback(
        {"client_request_id": "req-1", "rating": "up"},
        headers={"authorization": "Bearer not-a-token"},
    )
    assert_openai_error(response, 401, "invalid_api_key")
    assert not Feedback.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_only_post_is_allowed():
    response = call_gateway("GET", "/v1/feedback")
    assert_openai_error(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "POST"


BAD_BODIES = [
    pytest.param(b"rating=up", "invalid_json", "not valid JSON", id="not-json"),
    pytest.param(b'["req", "up"]', "invalid_body", "JSON object", id="array"),
    pytest.param({"rating": "up"}, "invalid_feedback", "client_request_id is missing", id="no-id"),
    pytest.param(
        {"client_request_id": "", "rating": "up"},
        "invalid_feedback",
        "missing or empty",
        id="empty",
    ),
    pytest.param(
        {"client_request_id": "   ", "rating": "up"}, "invalid_feedback", "empty", id="blank-id"
    ),
    pytest.param(
        {"client_request_id": 12, "rating": "up"}, "invalid_feedback", "a string", id="number-id"
    ),
    pytest.param(
        {"client_request_id": "x" * 513, "rating": "up"},
        "invalid_feedback",
        "longer than 512",
        id="long-id",
    ),
    pytest.param(
        {"client_request_id": "a\nb", "rating": "up"}, "invalid_feedback", "printable", id="newline"
    ),
    pytest.param(
        {"client_request_id": "a\u202eb", "rating": "up"},
        "invalid_feedback",
        "printable",
        id="format-char",
    ),
    pytest.param({"client_request_id": "r"}, "invalid_feedback", '"up" or "down"', id="no-rating"),
    pytest.param(
        {"client_request_id": "r", "rating": "meh"},
        "invalid_feedback",
        "(got 'meh')",
        id="bad-rating",
    ),
    pytest.param(
        {"client_request_id": "r", "rating": 1}, "invalid_feedback", '"up" or "down"', id="int"
    ),
    pytest.param(
        {"client_request_id": "r", "rating": "up", "comment": "x" * (MAX_COMMENT_LENGTH + 1)},
        "invalid_feedback",
        "at most 4,000",
        id="long-comment",
    ),
    pytest.param(
        {"client_request_id": "r", "rating": "up", "comment": ["a"]},
        "invalid_feedback",
        "comment must be a string",
        id="list-comment",
    ),
    pytest.param(
        b'{"client_request_id": "r", "rating": "up", "comment": "a\\u0000b"}',
        "invalid_unicode",
        "NUL",
        id="nul-escape",
    ),
    pytest.param(
        b'{"client_request_id": "r\\u0000", "rating": "up"}', "invalid_unicode", "NUL", id="nul-id"
    ),
    pytest.param(
        b'{"client_request_id": "r", "rating": "up", "comment": "\\ud800"}',
        "invalid_unicode",
        "lone surrogate",
        id="lone-surrogate",
    ),
    pytest.param(
        b'{"client_request_id": "r", "rating": "up", "comment": "\xff"}',
        "invalid_unicode",
        "UTF-8",
        id="bad-utf8",
    ),
    pytest.param(
        json.dumps(
            {"client_request_id": "r", "rating": "up", "comment": "x" * MAX_FEEDBACK_BODY_BYTES}
        ).encode(),
        "too_large",
        "larger than",
        id="too-large",
    ),
    pytest.param(
        b'{"client_request_id": "r", "rating": "up", "extra": ' + b"[" * 200 + b"]" * 200 + b"}",
        "too_deep",
        "nested deeper than",
        id="too-deep",
    ),
]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(("body", "code", "words"), BAD_BODIES)
def test_bad_feedback_is_400_with_a_reason_and_stores_nothing(body, code, words):
    error = assert_openai_error(post_feedback(body), 400, code)
    assert words in error["message"]
    assert error["type"] == "invalid_request_error"
    assert not Feedback.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_every_problem_of_a_body_is_named_at_once():
    error = assert_openai_error(post_feedback({"rating": "sideways"}), 400, "invalid_feedback")
    assert "client_request_id" in error["message"] and "sideways" in error["message"]


@pytest.mark.django_db(transaction=True)
def test_a_comment_at_the_limit_and_a_rating_in_capitals_are_accepted():
    response = post_feedback(
        {"client_request_id": "r", "rating": " UP ", "comment": "é" * MAX_COMMENT_LENGTH}
    )
    assert response.status_code == 202
    assert Feedback.objects.get().rating == "up"


# --- the join ----------------------------------------------------------------------------


def attempt(seeded, template, *, version: str, cid: str, minutes: float, ok: bool):
    """A new attribution row like ``template``, for ``cid`` at start + minutes."""
    return replace(
        template,
        usage_id=uuid.uuid4(),
        version_id=seeded.versions[version].pk,
        slot_label="slot-a" if version.startswith("a") else "slot-b",
        client_request_id=cid,
        created_at=seeded.start + timedelta(minutes=minutes),
        has_error=not ok,
        error_kind=None if ok else "timeout",
        status_code=200 if ok else 504,
    )


def preferred(rows):
    """The rule, independently: the latest successful attempt, else the latest."""
    return max(rows, key=lambda r: (not r.has_error, r.created_at, r.usage_id))


@pytest.mark.django_db(transaction=True)
def test_feedback_joins_the_latest_successful_attempt_whatever_the_order_rows_arrive_in():
    seeded = seed_experiment(subjects=6, requests=6)
    template, public = seeded.requests[0], seeded.experiment.public_model_id
    attempts = {
        # success on b1, then a later failure on a2: the success is what the user read
        "retry-ok-then-fail": [("b1", 10, True), ("a2", 70, False)],
        # two successes: the later one
        "two-ok": [("a1", 5, True), ("b1", 20, True)],
        # only failures: the latest
        "all-failed": [("a1", 5, False), ("b1", 30, False)],
    }
    rows = {
        cid: [attempt(seeded, template, version=v, cid=cid, minutes=m, ok=ok) for v, m, ok in tried]
        for cid, tried in attempts.items()
    }
    # Feedback first (nothing to join yet), then the attempts land one batch each, the
    # preferred one not last.
    record_feedback(
        [FeedbackItem(cid, "up") for cid in rows], source=FeedbackSource.API, submitted_by_id=None
    )
    assert not Feedback.objects.filter(variant_version__isnull=False).exists()
    for tried in rows.values():
        for row in reversed(tried):
            insert_requests([row], public_model_id=public)
    # Feedback after the attempts joins at insert.
    record_feedback(
        [FeedbackItem(cid, "down") for cid in rows], source=FeedbackSource.CSV, submitted_by_id=None
    )
    for cid, tried in rows.items():
        best = preferred(tried)
        for feedback in Feedback.objects.filter(client_request_id=cid):
            assert feedback.variant_version_id == best.version_id, (cid, feedback.rating)
            assert feedback.request_usage_id == best.usage_id
            assert feedback.request_created_at == best.created_at
    joined = dict(Feedback.objects.values_list("id", "variant_version_id"))
    # A rebuild computes the same joins.
    Feedback.objects.update(variant_version=None, request_usage_id=None, request_ok=None)
    assert rejoin() == (6, 6)
    assert dict(Feedback.objects.values_list("id", "variant_version_id")) == joined


@pytest.mark.django_db(transaction=True)
def test_feedback_for_an_unknown_request_is_kept_and_counts_nowhere():
    seeded = seed_experiment(subjects=10, requests=30)
    record_feedback(
        [FeedbackItem("never-served", "down")], source=FeedbackSource.API, submitted_by_id=None
    )
    assert Feedback.objects.get().variant_version_id is None
    report = experiment_report(seeded.experiment)
    assert all(c.feedback_up == c.feedback_down == 0 for c in report.checkpoints)


@pytest.mark.django_db(transaction=True)
def test_the_recent_sweep_joins_feedback_that_raced_its_attribution_row():
    seeded = seed_experiment(subjects=10, requests=30)
    served = next(r for r in seeded.requests if r.client_request_id)
    # As if the feedback committed while the writer's transaction (not yet visible to it)
    # was inserting the row: stored unjoined although the row is there now.
    Feedback.objects.create(client_request_id=served.client_request_id, rating="up", source="api")
    assert rejoin_recent() == 1
    rows = [r for r in seeded.requests if r.client_request_id == served.client_request_id]
    assert Feedback.objects.get().variant_version_id == preferred(rows).version_id


@pytest.mark.django_db(transaction=True)
def test_a_join_survives_its_attribution_rows_being_dropped():
    seeded = seed_experiment(subjects=10, requests=30)
    served = next(r for r in seeded.requests if r.client_request_id)
    (feedback,) = record_feedback(
        [FeedbackItem(served.client_request_id, "up")], source="api", submitted_by_id=None
    )
    ExperimentRequest.objects.filter(client_request_id=served.client_request_id).delete()
    assert rejoin() == (1, 0)
    feedback.refresh_from_db()
    assert feedback.variant_version_id is not None


@pytest.mark.django_db(transaction=True)
def test_rollups_rebuild_rejoins_feedback():
    seeded = seed_experiment(subjects=10, requests=30)
    served = next(r for r in seeded.requests if r.client_request_id)
    Feedback.objects.create(client_request_id=served.client_request_id, rating="up", source="csv")
    out = io.StringIO()
    call_command("rollups", "rebuild", stdout=out, stderr=io.StringIO())
    assert "Rejoined 1 feedback row(s)" in out.getvalue() and "(1 changed)" in out.getvalue()
    assert Feedback.objects.get().variant_version_id is not None


# --- figures -----------------------------------------------------------------------------


def seed_feedback(seeded, *, seed: int = 11):
    """Random ratings on served, retried and unknown ids; a third sent before their rows."""
    rng = random.Random(seed)
    ids = sorted({r.client_request_id for r in seeded.requests if r.client_request_id})
    picked = rng.sample(ids, len(ids) // 2) + ["unknown-1", "unknown-2"]
    items = []
    for cid in picked:
        for _ in range(rng.choice((1, 1, 2))):
            items.append(FeedbackItem(cid, rng.choice(("up", "up", "down"))))
    record_feedback(items, source=FeedbackSource.API, submitted_by_id=None)
    # Late: feedback first, then rows served for those ids land.
    template, late_rows = seeded.requests[1], []
    for index in range(12):
        cid = f"late-{index}"
        version = ("a1", "a2", "b1")[index % 3]
        minutes = {"a1": 20, "a2": 80, "b1": 50}[version] + index
        late_rows.append(
            attempt(seeded, template, version=version, cid=cid, minutes=minutes, ok=index % 4 != 0)
        )
        items.append(FeedbackItem(cid, rng.choice(("up", "down"))))
    record_feedback(items[-12:], source=FeedbackSource.API, submitted_by_id=None)
    insert_requests(late_rows, public_model_id=seeded.experiment.public_model_id)
    seeded.requests.extend(late_rows)
    return items


def expected_feedback(seeded, items, filters):
    """Up/down per checkpoint from the raw feedback items and attribution rows."""
    filters = filters.aligned()
    by_id = {}
    for row in seeded.requests:
        if row.client_request_id:
            by_id.setdefault(row.client_request_id, []).append(row)
    counts = Counter()
    for item in items:
        if item.client_request_id not in by_id:
            continue
        served = preferred(by_id[item.client_request_id])
        if filters.since and served.created_at < filters.since:
            continue
        if filters.until and served.created_at >= filters.until:
            continue
        if filters.subject_kind and served.subject_kind != filters.subject_kind:
            continue
        counts[(served.version_id, item.rating)] += 1
    return counts


def report_windows(seeded):
    minute = seeded.start.replace(second=0)
    return [
        ReportFilters(),
        ReportFilters(subject_kind="machine"),
        ReportFilters(since=minute + timedelta(minutes=17), until=minute + timedelta(minutes=93)),
        ReportFilters(since=seeded.swap_at - timedelta(minutes=5), subject_kind="user"),
    ]


@pytest.mark.django_db(transaction=True)
def test_feedback_figures_equal_a_recomputation_from_the_raw_rows():
    seeded = seed_experiment(subjects=60, requests=300)
    items = seed_feedback(seeded)
    for filters in report_windows(seeded):
        expected = expected_feedback(seeded, items, filters)
        report = experiment_report(seeded.experiment, filters)
        for c in report.checkpoints:
            up, down = expected[(c.version_id, "up")], expected[(c.version_id, "down")]
            assert (c.feedback_up, c.feedback_down) == (up, down), filters
            if up + down:
                assert c.feedback_share_up == up / (up + down)
                low, high = proportion_confint(up, up + down, alpha=0.05, method="wilson")
                assert c.feedback_ci95 == pytest.approx((low, high), abs=1e-12)
            else:
                assert c.feedback_share_up is None and c.feedback_ci95 is None
    whole = expected_feedback(seeded, items, ReportFilters())
    assert sum(whole.values()) > 20 and len({v for v, _ in whole}) == 3


@pytest.mark.parametrize(
    ("successes", "trials", "low", "high"),
    # Newcombe (1998), "Two-sided confidence intervals for the single proportion",
    # Statistics in Medicine 17:857-872, Table I, method 3 (Wilson score, no correction).
    [
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_interval_matches_newcombes_published_values(successes, trials, low, high):
    found = wilson_interval(successes, trials)
    assert found == pytest.approx((low, high), abs=5e-5)


def test_no_feedback_has_no_interval():
    assert wilson_interval(0, 0) is None


@pytest.mark.django_db(transaction=True)
def test_experiment_report_carries_feedback_per_checkpoint_in_json_and_csv():
    seeded = seed_experiment(subjects=30, requests=90)
    items = seed_feedback(seeded)
    expected = expected_feedback(seeded, items, ReportFilters())
    out = io.StringIO()
    call_command("experiment_report", str(seeded.experiment.pk), "--format", "json", stdout=out)
    report = json.loads(out.getvalue())
    internal = {v.internal_id: v.pk for v in seeded.versions.values()}
    seen = 0
    for slot in report["slots"]:
        for checkpoint in slot["checkpoints"]:
            version = internal[checkpoint["internal_id"]]
            up, down = expected[(version, "up")], expected[(version, "down")]
            feedback = checkpoint["feedback"]
            assert (feedback["up"], feedback["down"]) == (up, down)
            assert feedback["share_up"] == (up / (up + down) if up + down else None)
            assert feedback["ci95"] == (list(wilson_interval(up, up + down)) if up + down else None)
            assert "feedback_up" not in checkpoint
            seen += 1
    assert seen == 3
    out = io.StringIO()
    call_command("experiment_report", str(seeded.experiment.pk), "--format", "csv", stdout=out)
    for row in csv.DictReader(io.StringIO(out.getvalue())):
        version = internal[row["internal_id"]]
        up, down = expected[(version, "up")], expected[(version, "down")]
        assert (int(row["feedback_up"]), int(row["feedback_down"])) == (up, down)
        if up + down:
            low, high = wilson_interval(up, up + down)
            assert float(row["feedback_ci95_low"]) == pytest.approx(low)
            assert float(row["feedback_ci95_high"]) == pytest.approx(high)
            assert float(row["feedback_share_up"]) == pytest.approx(up / (up + down))


# --- through real gateways ---------------------------------------------------------------


@requires_server
def test_feedback_sent_before_its_request_joins_when_the_request_lands(gateway, upstream):
    experiment = active_experiment(upstream)
    wait_listed(gateway, experiment.public_model_id)
    request_id = f"late-{uuid.uuid4().hex[:8]}"
    response = httpx.post(
        gateway.base_url + "/feedback",
        json={"client_request_id": request_id, "rating": "up", "comment": "before"},
        timeout=10,
    )
    assert response.status_code == 202, response.text
    feedback = Feedback.objects.get()
    assert feedback.variant_version_id is None
    # Older than the writers' sweep looks back: only the writer's own join can join it.
    Feedback.objects.update(created_at=feedback.created_at - timedelta(hours=1))
    answer = httpx.post(
        gateway.base_url + "/chat/completions",
        json={"model": experiment.public_model_id, "messages": CHAT},
        headers={"X-Kilo-Request": request_id, "X-KiloCode-MachineId": "machine-1"},
        timeout=10,
    )
    assert answer.status_code == 200
    served = wait_until(
        lambda: ExperimentRequest.objects.filter(client_request_id=request_id).first(), timeout=20
    )
    wait_until(
        lambda: Feedback.objects.filter(variant_version_id=served.variant_version_id).exists(),
        timeout=20,
    )
    feedback = Feedback.objects.get()
    assert feedback.request_usage_id == served.usage_id
    assert feedback.request_created_at == served.created_at
    report = experiment_report(experiment)
    assert [(c.version_id, c.feedback_up) for c in report.checkpoints if c.feedback_up] == [
        (served.variant_version_id, 1)
    ]


@requires_server
def test_feedback_while_the_database_is_cut_is_503_quickly_and_accepted_after(
    start_gateway, database_proxy
):
    gateway = start_gateway(DATABASE_CONNECT_TIMEOUT="2")
    body = {"client_request_id": "during-outage", "rating": "down"}
    assert httpx.post(gateway.base_url + "/feedback", json=body, timeout=10).status_code == 202
    database_proxy.cut()
    started = time.monotonic()
    response = httpx.post(gateway.base_url + "/feedback", json=body, timeout=30)
    took = time.monotonic() - started
    assert_openai_error(response, 503, "unavailable")
    assert "retry" in response.json()["error"]["message"]
    assert took < 15, took
    database_proxy.restore()
    wait_until(
        lambda: (
            httpx.post(gateway.base_url + "/feedback", json=body, timeout=10).status_code == 202
        ),
        timeout=20,
    )
    assert Feedback.objects.filter(client_request_id="during-outage").count() == 2
