"""Response capture in-process (SPEC §9): the rate as staff and operators set it, answers
wiped and collected with prompts, the admin's request detail and compare view, and the
permission that governs reading answers."""

from __future__ import annotations

import io
import json
import re
from decimal import Decimal
from pathlib import Path

import pytest
from django.contrib.admin.models import LogEntry
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import IntegrityError, transaction
from django.urls import reverse
from django.utils import timezone

from experiments import routing_cache, services
from experiments.models import (
    PROMPT_HASH_DELETED,
    PROMPT_HASH_FAILED,
    Experiment,
    ExperimentRequest,
)
from experiments.prompts.answers import canonical_answer
from experiments.prompts.store import ANSWER_NAMESPACE, LocalPromptStore, canonical_body
from tests.factories import (
    ExperimentRequestFactory,
    GatewayUsageFactory,
    SuperUserFactory,
    UserFactory,
    make_experiment,
)
from tests.prompt_store_fixtures import age_local_blobs
from tests.test_admin import change_form_data

pytestmark = pytest.mark.django_db


@pytest.fixture
def local_store(settings, tmp_path: Path) -> LocalPromptStore:
    settings.PROMPT_STORE_BACKEND = "local"
    settings.PROMPT_STORE_DIR = tmp_path / "prompts"
    return LocalPromptStore(tmp_path / "prompts")


def answer(text: str, tool_calls=()) -> dict:
    return {"text": text, "tool_calls": list(tool_calls), "truncated": False}


def attribute(version, *, prompt: str, answer_sha: str | None, created_at=None):
    created_at = created_at or timezone.now()
    usage = GatewayUsageFactory(created_at=created_at)
    return ExperimentRequestFactory(
        usage=usage,
        variant_version=version,
        request_body_sha256=prompt,
        response_sha256=answer_sha,
        created_at=created_at,
    )


def versions(experiment):
    return [v.versions.get() for v in experiment.variants.order_by("label")]


def run(command: str, *args: str) -> str:
    out = io.StringIO()
    call_command(command, *args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


def answer_keys(store: LocalPromptStore) -> set[str]:
    return {blob.sha256 for blob in store.backend.list(ANSWER_NAMESPACE)}


# --- the rate: service, command, admin ---------------------------------------------------


@pytest.mark.parametrize(
    ("given", "stored"),
    [("0", "0"), ("100", "100"), ("12.5", "12.5"), (" 7.25% ", "7.25"), (3, "3")],
)
def test_the_service_accepts_a_percentage_with_two_decimals(given, stored):
    experiment = make_experiment()
    services.update_experiment(experiment=experiment, response_capture_rate=given)
    experiment.refresh_from_db()
    assert experiment.response_capture_rate == Decimal(stored)


@pytest.mark.parametrize("bad", ["abc", "-1", "100.01", "101", "1.234", "NaN", "inf", "", True])
def test_a_bad_rate_is_refused_in_words_and_nothing_changes(bad):
    experiment = make_experiment()
    services.update_experiment(experiment=experiment, response_capture_rate="5")
    history = LogEntry.objects.count()
    with pytest.raises(services.InvalidInput, match="percentage from 0 to 100"):
        services.update_experiment(experiment=experiment, name="renamed", response_capture_rate=bad)
    experiment.refresh_from_db()
    assert (experiment.response_capture_rate, experiment.name) == (Decimal(5), experiment.name)
    assert experiment.name != "renamed"
    assert LogEntry.objects.count() == history


def test_the_database_refuses_a_rate_outside_0_to_100():
    experiment = make_experiment()
    with pytest.raises(IntegrityError), transaction.atomic():
        Experiment.objects.filter(pk=experiment.pk).update(response_capture_rate=Decimal("100.5"))


def test_a_rate_change_is_audited_and_moves_the_routing_generation():
    experiment = make_experiment()
    user = UserFactory(username="alice")
    before = routing_cache.read_generation()
    services.update_experiment(experiment=experiment, response_capture_rate="25", by=user)
    assert routing_cache.read_generation().number == before.number + 1
    entry = LogEntry.objects.filter(object_id=str(experiment.pk)).latest("action_time")
    assert entry.user == user
    assert entry.change_message == "Changed response capture rate 0% → 25%."
    payload = routing_cache.build_payload(experiment.public_model_id)
    # A draft does not route; the payload of a routing experiment carries the rate.
    assert payload is None
    Experiment.objects.filter(pk=experiment.pk).update(status="active")
    assert (
        routing_cache.build_payload(experiment.public_model_id)["response_capture_basis_points"]
        == 2500
    )


def test_the_command_sets_shows_and_refuses_rates():
    experiment = make_experiment()
    output = run("experiment", "update", str(experiment.pk), "--response-capture-rate", "12.5")
    assert "Updated experiment" in output
    experiment.refresh_from_db()
    assert experiment.response_capture_rate == Decimal("12.5")
    shown = run("experiment", "show", str(experiment.pk))
    assert "answers captured" in shown and "12.5% of requests" in shown
    as_json = json.loads(run("experiment", "show", str(experiment.pk), "--json"))
    assert as_json["experiment"]["response_capture_percent"] == 12.5
    with pytest.raises(CommandError, match="percentage from 0 to 100"):
        run("experiment", "update", str(experiment.pk), "--response-capture-rate", "150")
    experiment.refresh_from_db()
    assert experiment.response_capture_rate == Decimal("12.5")
    entry = LogEntry.objects.filter(object_id=str(experiment.pk)).latest("action_time")
    assert entry.user.username == "manage.py"
    assert "0% → 12.5%" in entry.change_message


def test_staff_set_the_rate_on_the_change_page_and_bad_input_says_why(client):
    experiment = make_experiment(status="active")
    client.force_login(SuperUserFactory())
    url = reverse("admin:experiments_experiment_change", args=[experiment.pk])
    data = change_form_data(experiment)

    refused = client.post(url, {**data, "response_capture_rate": "two percent"})
    assert refused.status_code == 200
    assert "percentage from 0 to 100" in refused.content.decode()
    experiment.refresh_from_db()
    assert experiment.response_capture_rate == 0

    saved = client.post(url, {**data, "response_capture_rate": "2.5"})
    assert saved.status_code == 302, saved.content.decode()[:2000]
    experiment.refresh_from_db()
    assert experiment.response_capture_rate == Decimal("2.5")
    entry = LogEntry.objects.filter(object_id=str(experiment.pk)).latest("action_time")
    assert entry.change_message == "Changed response capture rate 0% → 2.5%."


# --- wipe and GC cover answers ---------------------------------------------------------------


def test_wipe_wipes_answers_with_prompts_and_gc_frees_their_blobs(local_store):
    experiment = make_experiment()
    other = make_experiment()
    version = versions(experiment)[0]
    prompt = local_store.put(canonical_body({"model": "m", "messages": ["private"]})[0])
    private = local_store.put_answer(canonical_answer(answer("a private answer")))
    kept = local_store.put_answer(canonical_answer(answer("another experiment's answer")))
    attribute(version, prompt=prompt, answer_sha=private)
    attribute(version, prompt=prompt, answer_sha=PROMPT_HASH_FAILED)
    attribute(version, prompt=prompt, answer_sha=None)
    attribute(versions(other)[0], prompt=prompt, answer_sha=kept)

    output = run("prompts", "wipe", "--experiment", str(experiment.pk), "--yes")
    assert "wiped 3 prompt hash(es) and 2 answer hash(es)" in output
    rows = ExperimentRequest.objects.filter(variant_version=version)
    assert set(rows.values_list("response_sha256", flat=True)) == {PROMPT_HASH_DELETED, None}
    assert ExperimentRequest.objects.filter(response_sha256=kept).count() == 1

    age_local_blobs(local_store.root, hours=3)
    gc = run("prompts", "gc")
    assert answer_keys(local_store) == {kept}
    assert "answers 1" in gc  # the removed tally names the answer blob


def test_gc_keeps_referenced_and_young_answers_and_removes_orphans(local_store):
    experiment = make_experiment()
    version = versions(experiment)[0]
    prompt = local_store.put(canonical_body({"model": "m", "messages": ["q"]})[0])
    referenced = local_store.put_answer(canonical_answer(answer("referenced")))
    orphan = local_store.put_answer(canonical_answer(answer("orphan")))
    attribute(version, prompt=prompt, answer_sha=referenced)
    age_local_blobs(local_store.root, hours=3)
    young = local_store.put_answer(canonical_answer(answer("just written, no row yet")))

    dry = run("prompts", "gc", "--dry-run")
    assert answer_keys(local_store) == {referenced, orphan, young}
    assert "would remove: 1 blob(s)" in dry
    run("prompts", "gc")
    assert answer_keys(local_store) == {referenced, young}
    assert json.loads(local_store.get_answer(referenced)) == answer("referenced")


# --- the request detail and the compare view ------------------------------------------------


@pytest.fixture
def two_checkpoints_one_prompt(local_store):
    """An experiment whose two checkpoints answered the same prompt, one request without
    a captured answer, and another prompt answered once."""
    experiment = make_experiment()
    first, second = versions(experiment)
    prompt = local_store.put(
        canonical_body(
            {"model": "kilo/preview-foo", "messages": [{"role": "user", "content": "Weather?"}]}
        )[0]
    )
    calm = local_store.put_answer(canonical_answer(answer("It is sunny in Paris.")))
    tool = local_store.put_answer(
        canonical_answer(
            answer("Checking.", [{"name": "get_weather", "arguments": '{"city":"Paris"}'}])
        )
    )
    rows = {
        "first": attribute(first, prompt=prompt, answer_sha=calm),
        "first_again": attribute(first, prompt=prompt, answer_sha=calm),
        "second": attribute(second, prompt=prompt, answer_sha=tool),
        "unsampled": attribute(second, prompt=prompt, answer_sha=None),
    }
    lonely_prompt = local_store.put(canonical_body({"model": "m", "messages": ["alone"]})[0])
    rows["lonely"] = attribute(
        first,
        prompt=lonely_prompt,
        answer_sha=local_store.put_answer(canonical_answer(answer("alone"))),
    )
    return experiment, prompt, rows


def detail_url(experiment, row) -> str:
    return reverse("admin:experiments_experiment_request_detail", args=[experiment.pk, row.pk])


def compare_url(experiment, prompt: str) -> str:
    return reverse("admin:experiments_experiment_compare", args=[experiment.pk, prompt])


def test_the_detail_shows_the_answer_and_links_to_compare_when_siblings_exist(
    client, two_checkpoints_one_prompt
):
    experiment, prompt, rows = two_checkpoints_one_prompt
    client.force_login(SuperUserFactory())
    page = client.get(detail_url(experiment, rows["second"])).content.decode()
    assert "Checking." in page and "get_weather" in page and "&quot;city&quot;" in page
    assert compare_url(experiment, prompt) in page

    unsampled = client.get(detail_url(experiment, rows["unsampled"])).content.decode()
    assert "No answer was captured for this request" in unsampled
    assert compare_url(experiment, prompt) in unsampled  # its prompt has answered siblings

    lonely = client.get(detail_url(experiment, rows["lonely"])).content.decode()
    assert "alone" in lonely
    assert 'id="compare-link"' not in lonely


def test_the_compare_view_groups_answers_by_checkpoint(client, two_checkpoints_one_prompt):
    experiment, prompt, rows = two_checkpoints_one_prompt
    client.force_login(SuperUserFactory())
    response = client.get(compare_url(experiment, prompt))
    assert response.status_code == 200
    checkpoints = response.context["checkpoints"]
    by_label = {c.slot_label: c for c in checkpoints}
    assert set(by_label) == {"slot-a", "slot-b"}
    # The two identical answers of slot-a are shown once, with both requests.
    assert [len(a.requests) for a in by_label["slot-a"].answers] == [2]
    assert by_label["slot-a"].answers[0].answer.text == "It is sunny in Paris."
    assert [a.answer.tool_calls[0]["name"] for a in by_label["slot-b"].answers] == ["get_weather"]
    assert "Weather?" in response.content.decode()


def test_the_compare_view_refuses_what_is_not_a_prompt_hash_and_is_bounded(
    client, two_checkpoints_one_prompt, monkeypatch
):
    experiment, prompt, _ = two_checkpoints_one_prompt
    client.force_login(SuperUserFactory())
    assert client.get(compare_url(experiment, "__deleted__")).status_code == 404
    assert client.get(compare_url(experiment, "A" * 64)).status_code == 404
    empty = client.get(compare_url(experiment, "0" * 64))
    assert "No captured answers to this prompt" in empty.content.decode()
    other = make_experiment()
    foreign = client.get(compare_url(other, prompt))
    assert foreign.context["checkpoints"] == []  # another experiment's rows never show


def test_without_view_prompt_no_answer_is_shown_anywhere(client, two_checkpoints_one_prompt):
    from tests.test_admin import staff_with

    experiment, prompt, rows = two_checkpoints_one_prompt
    client.force_login(staff_with("view_experiment"))
    page = client.get(detail_url(experiment, rows["second"]))
    assert page.status_code == 200
    html = page.content.decode()
    assert "Checking." not in html and "get_weather" not in html and "Weather?" not in html
    assert "needs the same permission as prompts" in html
    assert 'id="compare-link"' not in html
    refused = client.get(compare_url(experiment, prompt))
    assert refused.status_code == 403
    assert "It is sunny" not in refused.content.decode()
    assert "experiments.view_prompt" in refused.content.decode()

    client.force_login(staff_with("view_experiment", "view_prompt"))
    assert "Checking." in client.get(detail_url(experiment, rows["second"])).content.decode()
    assert client.get(compare_url(experiment, prompt)).status_code == 200


@pytest.mark.postgres
def test_reading_answers_by_prompt_hash_uses_the_partial_index(two_checkpoints_one_prompt):
    from django.db import connection

    from experiments.reports.browser import _answered
    from experiments.selectors import version_labels

    if connection.vendor != "postgresql":
        pytest.skip("PostgreSQL plans only")
    experiment, prompt, _ = two_checkpoints_one_prompt
    queryset = _answered(experiment, prompt, version_labels(experiment))[:51]
    sql, params = queryset.query.sql_with_params()
    with transaction.atomic(), connection.cursor() as cursor:
        # A handful of rows: make the planner show what it would do at scale.
        cursor.execute("SET LOCAL enable_seqscan = off")
        cursor.execute("EXPLAIN " + sql, params)
        plan = "\n".join(row[0] for row in cursor.fetchall())
        # On a partitioned table each partition has its own copy of the index.
        cursor.execute(
            "SELECT child.relname FROM pg_inherits JOIN pg_class child ON child.oid = inhrelid "
            "JOIN pg_class parent ON parent.oid = inhparent WHERE parent.relname = %s",
            ["mx_request_prompt_answered"],
        )
        names = {"mx_request_prompt_answered", *(row[0] for row in cursor.fetchall())}
    # Index or bitmap scans; which one depends on the table's statistics at the time.
    used = set(
        re.findall(r"(?:Index (?:Only )?Scan(?: Backward)? using|Bitmap Index Scan on) (\S+)", plan)
    )
    assert used & names, plan
    assert "Seq Scan" not in plan and plan.startswith("Limit"), plan


def test_an_experiment_inserted_without_the_rate_captures_nothing():
    """A process of the previous release (a rolling deploy) does not know the column."""
    from django.db import connection

    experiment = make_experiment()
    columns = [
        f.column
        for f in Experiment._meta.concrete_fields
        if f.column not in ("response_capture_rate", "id", "public_model_id")
    ]
    values = [
        getattr(experiment, f.attname)
        for f in Experiment._meta.concrete_fields
        if f.column in columns
    ]
    quote = connection.ops.quote_name
    new_id = "9b6c3f0e-0000-4000-8000-000000000001"
    names = ", ".join(quote(c) for c in ["id", "public_model_id", *columns])
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO model_experiment ({names}) "  # noqa: S608
            f"VALUES ({', '.join(['%s'] * (len(columns) + 2))})",
            [
                new_id.replace("-", "") if connection.vendor == "sqlite" else new_id,
                "kilo/old-release",
                *values,
            ],
        )
    assert Experiment.objects.get(public_model_id="kilo/old-release").response_capture_rate == 0
