"""``manage.py prompts wipe|gc`` and the retention rules behind them (SPEC §9)."""

from __future__ import annotations

import io
from datetime import timedelta
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from experiments.models import PROMPT_HASH_DELETED, PROMPT_HASH_FAILED, ExperimentRequest
from experiments.prompts.maintenance import collect_garbage
from experiments.prompts.store import (
    PART_NAMESPACE,
    REQUEST_NAMESPACE,
    LocalPromptStore,
    PromptStore,
    canonical_body,
)
from gateway.models import GatewayUsage
from tests.factories import (
    ExperimentRequestFactory,
    GatewayUsageFactory,
    UserFactory,
    make_experiment,
)
from tests.prompt_store_fixtures import (  # noqa: F401  (fixtures)
    age_local_blobs,
    make_s3_store,
    moto_endpoint,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def local_store(settings, tmp_path: Path) -> LocalPromptStore:
    settings.PROMPT_STORE_BACKEND = "local"
    settings.PROMPT_STORE_DIR = tmp_path / "prompts"
    return LocalPromptStore(tmp_path / "prompts")


def conversation(*turns: str, system: str = "You are terse. " * 30) -> dict:
    messages = [{"role": "system", "content": system}]
    messages += [{"role": "user", "content": text} for text in turns]
    return {"model": "kilo/preview-foo", "messages": messages}


def store_body(store: PromptStore, body: dict) -> str:
    return store.put(canonical_body(body)[0])


def attribute(experiment, sha256: str, *, user=None, created_at=None) -> ExperimentRequest:
    version = experiment.variants.order_by("label").first().versions.get()
    created_at = created_at or timezone.now()
    usage = GatewayUsageFactory(user=user, created_at=created_at)
    return ExperimentRequestFactory(
        usage=usage, variant_version=version, request_body_sha256=sha256, created_at=created_at
    )


def keys(store: PromptStore, namespace: str) -> set[str]:
    return {blob.sha256 for blob in store.backend.list(namespace)}


def run(*args: str) -> str:
    out, err = io.StringIO(), io.StringIO()
    call_command("prompts", *args, stdout=out, stderr=err)
    return out.getvalue()


# --- wipe ---------------------------------------------------------------------


def test_wipe_replaces_hashes_with_deleted_and_keeps_attribution(local_store):
    experiment = make_experiment()
    rows = [attribute(experiment, store_body(local_store, conversation(f"q{i}"))) for i in range(3)]
    before = list(
        ExperimentRequest.objects.order_by("pk").values_list(
            "pk", "variant_version_id", "allocation_subject", "client_request_id", "created_at"
        )
    )
    output = run("wipe", "--experiment", str(experiment.pk), "--yes")
    assert "wiped 3" in output
    assert set(ExperimentRequest.objects.values_list("request_body_sha256", flat=True)) == {
        PROMPT_HASH_DELETED
    }
    after = list(
        ExperimentRequest.objects.order_by("pk").values_list(
            "pk", "variant_version_id", "allocation_subject", "client_request_id", "created_at"
        )
    )
    assert after == before
    assert GatewayUsage.objects.filter(pk__in=[row.pk for row in rows]).count() == 3


def test_wipe_before_date_only_touches_older_rows(local_store):
    experiment = make_experiment()
    old = attribute(
        experiment,
        store_body(local_store, conversation("old")),
        created_at=timezone.now() - timedelta(days=10),
    )
    new = attribute(experiment, store_body(local_store, conversation("new")))
    cutoff = (timezone.now() - timedelta(days=2)).date().isoformat()
    run("wipe", "--experiment", str(experiment.pk), "--before", cutoff, "--yes")
    old.refresh_from_db()
    new.refresh_from_db()
    assert old.request_body_sha256 == PROMPT_HASH_DELETED
    assert new.request_body_sha256 != PROMPT_HASH_DELETED


def test_wipe_leaves_other_experiments_and_failed_captures_alone(local_store):
    experiment, other = make_experiment(), make_experiment()
    failed = attribute(experiment, PROMPT_HASH_FAILED)
    kept = attribute(other, store_body(local_store, conversation("other")))
    output = run("wipe", "--experiment", str(experiment.pk), "--yes")
    failed.refresh_from_db()
    kept.refresh_from_db()
    assert failed.request_body_sha256 == PROMPT_HASH_FAILED
    assert kept.request_body_sha256 != PROMPT_HASH_DELETED
    assert "1 failed capture(s) left" in output


def test_wipe_without_yes_refuses_when_stdin_is_not_a_terminal(local_store, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))
    experiment = make_experiment()
    row = attribute(experiment, store_body(local_store, conversation("q")))
    with pytest.raises(CommandError, match="--yes"):
        run("wipe", "--experiment", str(experiment.pk))
    row.refresh_from_db()
    assert row.request_body_sha256 != PROMPT_HASH_DELETED


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("answer", "wiped"), [("y\n", True), ("n\n", False)])
def test_wipe_asks_for_confirmation_on_a_terminal(local_store, monkeypatch, answer, wiped):
    monkeypatch.setattr("sys.stdin", FakeTerminal(answer))
    experiment = make_experiment()
    row = attribute(experiment, store_body(local_store, conversation("q")))
    if wiped:
        run("wipe", "--experiment", str(experiment.pk))
    else:
        with pytest.raises(CommandError, match="aborted"):
            run("wipe", "--experiment", str(experiment.pk))
    row.refresh_from_db()
    assert (row.request_body_sha256 == PROMPT_HASH_DELETED) is wiped


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--experiment", "nope"], "No experiment matches .nope."),
        (["--experiment", "00000000-0000-0000-0000-000000000000"], "No experiment matches"),
        (["--before", "yesterday-ish"], "not a date"),
    ],
)
def test_wipe_rejects_bad_arguments_and_changes_nothing(local_store, args, message):
    experiment = make_experiment()
    row = attribute(experiment, store_body(local_store, conversation("q")))
    if "--experiment" not in args:
        args = ["--experiment", str(experiment.pk), *args]
    with pytest.raises(CommandError, match=message):
        run("wipe", *args, "--yes")
    row.refresh_from_db()
    assert row.request_body_sha256 != PROMPT_HASH_DELETED


# --- gc -----------------------------------------------------------------------


def test_gc_keeps_referenced_blobs_and_removes_orphans(local_store):
    experiment = make_experiment()
    shared_system = "Shared system prompt. " * 20
    kept = store_body(local_store, conversation("keep me", system=shared_system))
    orphan = store_body(local_store, conversation("orphan only", system=shared_system))
    attribute(experiment, kept)
    age_local_blobs(local_store.root, hours=3)
    parts_before = keys(local_store, PART_NAMESPACE)

    output = run("gc")

    assert keys(local_store, REQUEST_NAMESPACE) == {kept}
    assert not local_store.exists(orphan)
    assert local_store.get(kept) == canonical_body(conversation("keep me", system=shared_system))[0]
    # Only the orphan's own message goes; the shared system prompt stays.
    assert len(parts_before - keys(local_store, PART_NAMESPACE)) == 1
    assert "removed: 2 blob(s)" in output


def test_gc_never_removes_blobs_younger_than_the_grace_period(local_store):
    orphan = store_body(local_store, conversation("just written"))
    run("gc", "--grace-minutes", "60")
    assert local_store.get(orphan)


def test_gc_dry_run_deletes_nothing_and_reports_what_it_would_remove(local_store):
    orphan = store_body(local_store, conversation("orphan"))
    age_local_blobs(local_store.root, hours=3)
    output = run("gc", "--dry-run")
    assert local_store.get(orphan)
    assert "would remove: 3 blob(s)" in output
    assert "nothing was deleted" in output


def test_gc_removes_leftover_temp_files_of_crashed_writes(local_store):
    leftover = local_store.root / "p" / "ab" / ".tmp-crashed"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half a blob")
    age_local_blobs(local_store.root, hours=3)
    run("gc")
    assert not leftover.exists()


def test_gc_keeps_a_blob_reused_while_it_runs(local_store):
    body = conversation("sent again during gc")
    orphan = store_body(local_store, body)
    age_local_blobs(local_store.root, hours=3)

    def resend_after_scan(phase: str, done: int, total: int) -> None:
        if phase == "scan" and done == total:
            store_body(local_store, body)  # the writer touches the existing blobs

    summary = collect_garbage(local_store, grace=timedelta(minutes=60), progress=resend_after_scan)
    assert local_store.get(orphan)
    assert summary.skipped_changed == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--grace-minutes", "soon"], "whole number"), (["--grace-minutes", "1"], "at least")],
)
def test_gc_rejects_bad_arguments_and_deletes_nothing(local_store, args, message):
    orphan = store_body(local_store, conversation("orphan"))
    age_local_blobs(local_store.root, hours=3)
    with pytest.raises(CommandError, match=message):
        run("gc", *args)
    assert local_store.get(orphan)


def test_gc_prints_a_progress_bar_on_stderr(local_store):
    store_body(local_store, conversation("q"))
    err = io.StringIO()
    call_command("prompts", "gc", stdout=io.StringIO(), stderr=err)
    assert "scan   [" + "#" * 30 + "] 3/3" in err.getvalue()


def test_gc_on_s3_keeps_referenced_and_removes_orphans(moto_endpoint):  # noqa: F811
    s3 = make_s3_store(moto_endpoint)
    experiment = make_experiment()
    kept = store_body(s3, conversation("keep"))
    orphan = store_body(s3, conversation("drop"))
    attribute(experiment, kept)
    summary = collect_garbage(
        s3, grace=timedelta(minutes=60), now=timezone.now() + timedelta(hours=2)
    )
    assert s3.get(kept)
    assert not s3.exists(orphan)
    assert keys(s3, REQUEST_NAMESPACE) == {kept}
    assert summary.removed["request"].count == 1
    assert summary.removed["part"].count == 1


def test_wipe_then_gc_frees_the_blobs(local_store):
    experiment = make_experiment()
    digest = store_body(local_store, conversation("private"))
    attribute(experiment, digest)
    run("wipe", "--experiment", str(experiment.pk), "--yes")
    age_local_blobs(local_store.root, hours=3)
    run("gc")
    assert keys(local_store, REQUEST_NAMESPACE) == set()
    assert keys(local_store, PART_NAMESPACE) == set()


# --- retention ----------------------------------------------------------------


def test_deleting_a_user_keeps_attribution_rows_and_their_prompts(local_store):
    user = UserFactory()
    experiment = make_experiment()
    digest = store_body(local_store, conversation("from a departing user"))
    row = attribute(experiment, digest, user=user)
    user.delete()
    row.refresh_from_db()
    assert row.usage.user_id is None  # gateway_usage.user is SET_NULL
    assert row.request_body_sha256 == digest
    age_local_blobs(local_store.root, hours=3)
    run("gc")
    assert local_store.get(digest)
