"""A new checkpoint is tested BEFORE it serves (issue #9): in an active or paused
experiment the hot-swap and rotate pages test the unsaved checkpoint first, insert
nothing when the test fails unless staff confirm, and keep the result with the new
version; ``experiment swap|rotate-key`` do the same in an active or paused experiment, and
with ``--check`` in a draft (``--force`` to proceed, ``--no-check`` to skip).

The partner is the demo upstream on loopback answering 401 to any key but
``PARTNER_API_KEY``; the wrong key is a canary that must never reach a page, an output
or a log.
"""

from __future__ import annotations

import io
import json
import logging
import re

import pytest
from django.contrib.admin.models import LogEntry
from django.core.management import call_command
from django.core.management.base import CommandError

from experiments import services
from experiments.models import CheckpointCheck, ExperimentStatus, VariantVersion
from tests.factories import make_experiment, upstream_config
from tests.test_admin import change_url, hot_swap_url, messages_of, rotate_url
from tests.upstream import PARTNER_API_KEY

pytestmark = pytest.mark.django_db
S = ExperimentStatus


@pytest.fixture(autouse=True)
def _all_logs(caplog):
    caplog.set_level(logging.DEBUG)
    return caplog


def serving_slot(keyed_upstream, status=S.ACTIVE):
    """A slot of an experiment in ``status`` serving 'rc-old' with the right key."""
    experiment = make_experiment(status=status, base_url=keyed_upstream.base_url)
    variant = experiment.variants.order_by("created_at", "id").first()
    services.hot_swap(
        variant=variant,
        upstream=upstream_config("rc-old", keyed_upstream.base_url),
        api_key=PARTNER_API_KEY,
    )
    keyed_upstream.clear()
    return variant


def serves(variant) -> str:
    return services.current_version(variant).internal_id


def new_upstream(keyed_upstream, internal_id="rc-new") -> dict:
    return upstream_config(internal_id, keyed_upstream.base_url)


def assert_nothing_saved(variant, versions_before: int, history_before: int) -> None:
    assert serves(variant) == "rc-old"
    assert VariantVersion.objects.filter(variant=variant).count() == versions_before
    assert LogEntry.objects.count() == history_before


def assert_not_in_logs(caplog, secret: str) -> None:
    assert secret not in caplog.text
    assert all(secret not in str(record.args) for record in caplog.records)


# --- services ---------------------------------------------------------------------------


def test_check_hot_swap_tests_the_unsaved_upstream_with_the_typed_key(keyed_upstream):
    variant = serving_slot(keyed_upstream)
    check = services.check_hot_swap(
        variant=variant, upstream=new_upstream(keyed_upstream), api_key=PARTNER_API_KEY
    )
    assert (check.ok, check.status_code) == (True, 200)
    assert check._state.adding  # a result, not a stored row: nothing was inserted
    [request] = keyed_upstream.received
    assert request["json"]["model"] == "rc-new"
    assert not CheckpointCheck.objects.exists()
    assert serves(variant) == "rc-old"


def test_check_hot_swap_without_a_key_uses_the_slots_current_key(keyed_upstream):
    variant = serving_slot(keyed_upstream)
    check = services.check_hot_swap(variant=variant, upstream=new_upstream(keyed_upstream))
    assert check.ok
    [request] = keyed_upstream.received
    assert request["headers"]["authorization"] == f"Bearer {PARTNER_API_KEY}"
    assert request["json"]["model"] == "rc-new"


def test_check_rotation_tests_the_current_upstream_with_the_new_key(keyed_upstream, canary_key):
    variant = serving_slot(keyed_upstream)
    check = services.check_rotation(variant=variant, api_key=canary_key)
    assert (check.ok, check.status_code) == (False, 401)
    assert canary_key not in check.reason
    [request] = keyed_upstream.received
    assert request["headers"]["authorization"] == f"Bearer {canary_key}"
    assert request["json"]["model"] == "rc-old"
    assert not CheckpointCheck.objects.exists()


def test_a_hot_swap_whose_test_fails_inserts_nothing(keyed_upstream, canary_key, caplog):
    variant = serving_slot(keyed_upstream)
    versions, history = (
        VariantVersion.objects.filter(variant=variant).count(),
        LogEntry.objects.count(),
    )
    with pytest.raises(services.CheckpointTestFailed) as failed:
        services.hot_swap(
            variant=variant, upstream=new_upstream(keyed_upstream), api_key=canary_key, test=True
        )
    assert failed.value.message.startswith("Nothing was saved: the connection test")
    assert "HTTP 401" in failed.value.message
    assert canary_key not in failed.value.message
    assert_nothing_saved(variant, versions, history)
    assert not CheckpointCheck.objects.exists()
    assert_not_in_logs(caplog, canary_key)


def test_the_test_run_before_a_hot_swap_is_stored_with_the_new_version(keyed_upstream):
    variant = serving_slot(keyed_upstream)
    version = services.hot_swap(
        variant=variant, upstream=new_upstream(keyed_upstream), api_key=PARTNER_API_KEY, test=True
    )
    [check] = CheckpointCheck.objects.all()
    assert (check.version_id, check.ok, check.status_code) == (version.pk, True, 200)
    assert len(keyed_upstream.received) == 1  # the test before; no second request after
    entry = LogEntry.objects.latest("action_time")
    assert "connection test passed (HTTP 200" in entry.change_message


def test_a_forced_hot_swap_keeps_its_failed_test_and_activation_warns(keyed_upstream, canary_key):
    variant = serving_slot(keyed_upstream, status=S.PAUSED)
    version = services.hot_swap(
        variant=variant,
        upstream=new_upstream(keyed_upstream),
        api_key=canary_key,
        test=True,
        force=True,
    )
    assert serves(variant) == "rc-new"
    [check] = CheckpointCheck.objects.all()
    assert (check.version_id, check.ok, check.status_code) == (version.pk, False, 401)
    entry = LogEntry.objects.latest("action_time")
    assert "connection test failed (HTTP 401" in entry.change_message
    assert "swapped anyway" in entry.change_message
    assert canary_key not in entry.change_message
    [warning] = services.activation_warnings(variant.experiment)
    assert "HTTP 401" in warning


def test_a_rotation_whose_test_fails_inserts_nothing(keyed_upstream, canary_key):
    variant = serving_slot(keyed_upstream)
    versions, history = (
        VariantVersion.objects.filter(variant=variant).count(),
        LogEntry.objects.count(),
    )
    with pytest.raises(services.CheckpointTestFailed):
        services.rotate_key(variant=variant, api_key=canary_key, test=True)
    assert_nothing_saved(variant, versions, history)
    version = services.rotate_key(variant=variant, api_key=PARTNER_API_KEY, test=True)
    assert [(c.version_id, c.ok) for c in CheckpointCheck.objects.all()] == [(version.pk, True)]


def test_only_routing_experiments_require_the_test():
    assert [
        services.checkpoint_test_required(make_experiment(status=status))
        for status in (S.DRAFT, S.ACTIVE, S.PAUSED, S.COMPLETED)
    ] == [False, True, True, False]


# --- the admin pages ----------------------------------------------------------------------


def swap_form(keyed_upstream, key: str, *buttons: str, **extra) -> dict[str, str]:
    return {
        "upstream": json.dumps(new_upstream(keyed_upstream)),
        "api_key": key,
        **{button: "1" for button in buttons or ("_save",)},
        **extra,
    }


def test_test_connection_on_the_hot_swap_page_tests_the_unsaved_checkpoint(
    admin_client, keyed_upstream, canary_key, caplog
):
    variant = serving_slot(keyed_upstream)
    versions, history = (
        VariantVersion.objects.filter(variant=variant).count(),
        LogEntry.objects.count(),
    )
    response = admin_client.post(
        hot_swap_url(variant), swap_form(keyed_upstream, canary_key, "_test")
    )
    page = response.content.decode()
    assert response.status_code == 200
    assert "✗ Connection test of the new checkpoint failed: HTTP 401, " in page
    assert "Incorrect API key provided" in page
    assert canary_key not in page
    assert_nothing_saved(variant, versions, history)
    assert not CheckpointCheck.objects.exists()
    assert [r["json"]["model"] for r in keyed_upstream.received] == ["rc-new"]

    response = admin_client.post(
        hot_swap_url(variant), swap_form(keyed_upstream, PARTNER_API_KEY, "_test")
    )
    page = response.content.decode()
    assert "✓ Connection test of the new checkpoint passed: HTTP 200, " in page
    assert "It is not saved yet." in page
    assert PARTNER_API_KEY not in page
    assert_nothing_saved(variant, versions, history)
    assert_not_in_logs(caplog, canary_key)
    assert_not_in_logs(caplog, PARTNER_API_KEY)


def test_test_connection_with_an_empty_key_uses_the_current_key(admin_client, keyed_upstream):
    variant = serving_slot(keyed_upstream)
    page = admin_client.post(
        hot_swap_url(variant), swap_form(keyed_upstream, "", "_test")
    ).content.decode()
    assert "✓ Connection test of the new checkpoint passed" in page
    [request] = keyed_upstream.received
    assert request["headers"]["authorization"] == f"Bearer {PARTNER_API_KEY}"


def test_saving_a_failing_checkpoint_into_an_active_experiment_saves_nothing_and_offers_swap_anyway(
    admin_client, keyed_upstream, canary_key, caplog
):
    variant = serving_slot(keyed_upstream)
    page = admin_client.get(hot_swap_url(variant)).content.decode()
    assert "the new checkpoint is tested before it is saved" in page
    assert 'name="test_before_saving"' not in page  # not optional here
    versions, history = (
        VariantVersion.objects.filter(variant=variant).count(),
        LogEntry.objects.count(),
    )
    response = admin_client.post(hot_swap_url(variant), swap_form(keyed_upstream, canary_key))
    page = response.content.decode()
    assert response.status_code == 200
    assert "Connection test of the new checkpoint failed: HTTP 401" in page
    assert "Nothing was saved." in page
    assert 'name="anyway"' in page and "Swap anyway" in page
    assert canary_key not in page
    assert_nothing_saved(variant, versions, history)
    assert not CheckpointCheck.objects.exists()
    assert_not_in_logs(caplog, canary_key)


def test_swap_anyway_inserts_the_checkpoint_with_its_failed_test(
    admin_client, keyed_upstream, canary_key
):
    variant = serving_slot(keyed_upstream)
    response = admin_client.post(
        hot_swap_url(variant), swap_form(keyed_upstream, canary_key, anyway="on"), follow=True
    )
    assert response.redirect_chain == [(change_url(variant.experiment), 302)]
    [message] = messages_of(response)
    assert message.startswith(
        "Variant 'slot-a' now serves 'rc-new' as slot-a v3 although its connection test"
    )
    assert message.endswith("swapped anyway as confirmed.")
    new = services.current_version(variant)
    assert new.internal_id == "rc-new"
    assert [(c.ok, c.status_code) for c in new.checks.all()] == [(False, 401)]
    assert canary_key not in response.content.decode()


def test_saving_a_passing_checkpoint_swaps_and_shows_its_test_in_the_history(
    admin_client, keyed_upstream
):
    variant = serving_slot(keyed_upstream)
    response = admin_client.post(
        hot_swap_url(variant), swap_form(keyed_upstream, PARTNER_API_KEY), follow=True
    )
    [message] = messages_of(response)
    assert message.startswith(
        "Variant 'slot-a' now serves 'rc-new' as slot-a v3; connection test passed (HTTP 200, "
    )
    new = services.current_version(variant)
    assert [(c.ok, c.status_code) for c in new.checks.all()] == [(True, 200)]
    assert len(keyed_upstream.received) == 1
    history = response.content.decode().split('class="mx-current-version"', 1)[1].split("</tr>")[0]
    assert "rc-new" in history and "✓ HTTP 200" in history


def test_rotate_page_tests_the_new_key_first_and_offers_rotate_anyway(
    admin_client, keyed_upstream, canary_key
):
    variant = serving_slot(keyed_upstream, status=S.PAUSED)
    versions, history = (
        VariantVersion.objects.filter(variant=variant).count(),
        LogEntry.objects.count(),
    )
    tested = admin_client.post(rotate_url(variant), {"api_key": canary_key, "_test": "1"})
    assert "✗ Connection test of the new checkpoint failed: HTTP 401" in tested.content.decode()
    refused = admin_client.post(rotate_url(variant), {"api_key": canary_key, "_save": "1"})
    page = refused.content.decode()
    assert "Rotate anyway" in page and "Nothing was saved." in page
    assert canary_key not in page
    assert_nothing_saved(variant, versions, history)
    response = admin_client.post(
        rotate_url(variant), {"api_key": PARTNER_API_KEY, "_save": "1"}, follow=True
    )
    [message] = messages_of(response)
    assert message.startswith(
        "Rotated the key of variant 'slot-a'; it now serves slot-a v2.1 · key rotated; "
        "connection test passed"
    )
    new = services.current_version(variant)
    assert [(c.ok, c.status_code) for c in new.checks.all()] == [(True, 200)]
    assert [r["headers"]["authorization"] for r in keyed_upstream.received] == [
        f"Bearer {canary_key}",
        f"Bearer {canary_key}",
        f"Bearer {PARTNER_API_KEY}",
    ]


def test_in_a_draft_the_test_before_saving_is_a_choice(admin_client, keyed_upstream, canary_key):
    variant = serving_slot(keyed_upstream, status=S.DRAFT)
    page = admin_client.get(hot_swap_url(variant)).content.decode()
    assert re.search(r'<input type="checkbox" name="test_before_saving"[^>]*checked', page)
    ticked = swap_form(keyed_upstream, canary_key, test_before_saving="on")
    assert "Nothing was saved." in admin_client.post(hot_swap_url(variant), ticked).content.decode()
    assert serves(variant) == "rc-old"
    keyed_upstream.clear()
    admin_client.post(hot_swap_url(variant), swap_form(keyed_upstream, canary_key))  # unticked
    assert serves(variant) == "rc-new"
    assert keyed_upstream.received == []  # saved untested: the checklist says "never tested"
    assert not CheckpointCheck.objects.exists()


# --- the commands -------------------------------------------------------------------------


def run(*args: str) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command("experiment", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def upstream_file(tmp_path, keyed_upstream) -> str:
    path = tmp_path / "upstream.json"
    path.write_text(json.dumps(new_upstream(keyed_upstream)))
    return str(path)


def test_swap_check_tests_before_inserting_and_stores_the_result(
    keyed_upstream, tmp_path, monkeypatch
):
    variant = serving_slot(keyed_upstream)
    monkeypatch.setenv("NEW_KEY", PARTNER_API_KEY)
    out, _ = run(
        "swap",
        str(variant.pk),
        "--upstream-file",
        upstream_file(tmp_path, keyed_upstream),
        "--api-key-env",
        "NEW_KEY",
        "--check",
        "--json",
    )
    payload = json.loads(out)
    assert payload["ok"] is True
    assert (payload["check"]["ok"], payload["check"]["status_code"]) == (True, 200)
    assert payload["check"]["version_id"] == payload["version"]["id"]
    assert CheckpointCheck.objects.get().version_id == services.current_version(variant).pk
    assert len(keyed_upstream.received) == 1


def test_swap_check_failing_inserts_nothing_and_exits_1_with_the_reason(
    keyed_upstream, tmp_path, monkeypatch, canary_key, caplog
):
    variant = serving_slot(keyed_upstream)
    versions, history = (
        VariantVersion.objects.filter(variant=variant).count(),
        LogEntry.objects.count(),
    )
    monkeypatch.setenv("NEW_KEY", canary_key)
    out, err = io.StringIO(), io.StringIO()
    with pytest.raises(CommandError) as failed:
        call_command(
            "experiment",
            "swap",
            str(variant.pk),
            "--upstream-file",
            upstream_file(tmp_path, keyed_upstream),
            "--api-key-env",
            "NEW_KEY",
            "--check",
            "--json",
            stdout=out,
            stderr=err,
        )
    assert failed.value.returncode == 1
    assert "failed: HTTP 401, " in str(failed.value)
    assert "Nothing was inserted (--force inserts it anyway)" in str(failed.value)
    payload = json.loads(out.getvalue())
    assert (payload["ok"], payload["version"]) == (False, None)
    assert (payload["check"]["ok"], payload["check"]["status_code"]) == (False, 401)
    assert payload["check"]["version_id"] is None
    assert canary_key not in out.getvalue() + err.getvalue() + str(failed.value)
    assert_nothing_saved(variant, versions, history)
    assert_not_in_logs(caplog, canary_key)


def test_rotate_key_check_force_inserts_despite_the_failure_and_warns(
    keyed_upstream, monkeypatch, canary_key
):
    variant = serving_slot(keyed_upstream)
    monkeypatch.setenv("NEW_KEY", canary_key)
    out, err = run(
        "rotate-key", str(variant.pk), "--api-key-env", "NEW_KEY", "--check", "--force", "--json"
    )
    payload = json.loads(out)
    assert payload["ok"] is True
    assert (payload["check"]["ok"], payload["check"]["status_code"]) == (False, 401)
    assert payload["check"]["version_id"] == payload["version"]["id"]
    assert err.startswith(
        "WARNING: Connection test of the new checkpoint (rc-old) failed: HTTP 401"
    )
    assert canary_key not in out + err
    new = services.current_version(variant)
    assert str(new.pk) == payload["version"]["id"]
    assert [(c.ok, c.status_code) for c in new.checks.all()] == [(False, 401)]


def test_force_without_a_test_is_refused(keyed_upstream, monkeypatch):
    variant = serving_slot(keyed_upstream)
    monkeypatch.setenv("NEW_KEY", PARTNER_API_KEY)
    with pytest.raises(CommandError, match="--force only applies when the checkpoint is tested"):
        run("rotate-key", str(variant.pk), "--api-key-env", "NEW_KEY", "--no-check", "--force")
    assert VariantVersion.objects.filter(variant=variant).count() == 2
    assert keyed_upstream.received == []


def test_a_swap_into_an_active_experiment_is_tested_without_being_asked(
    keyed_upstream, monkeypatch, canary_key, caplog
):
    """Operators' scripts get what the admin page does: in an active or paused experiment the
    new checkpoint is tested before it is inserted, --check or not."""
    variant = serving_slot(keyed_upstream)
    versions, history = (
        VariantVersion.objects.filter(variant=variant).count(),
        LogEntry.objects.count(),
    )
    monkeypatch.setenv("NEW_KEY", canary_key)  # the wrong key: the partner answers 401
    with pytest.raises(CommandError) as failed:
        run("rotate-key", str(variant.pk), "--api-key-env", "NEW_KEY")
    assert failed.value.returncode == 1
    assert "failed: HTTP 401, " in str(failed.value)
    assert canary_key not in str(failed.value)
    assert_nothing_saved(variant, versions, history)
    assert_not_in_logs(caplog, canary_key)
    monkeypatch.setenv("NEW_KEY", PARTNER_API_KEY)  # the right key: tested, then inserted
    out, err = run("rotate-key", str(variant.pk), "--api-key-env", "NEW_KEY")
    assert "WARNING" not in err
    new = services.current_version(variant)
    assert [(c.ok, c.status_code) for c in new.checks.all()] == [(True, 200)]
    assert len(keyed_upstream.received) == 2


def test_no_check_inserts_untested_with_a_warning(keyed_upstream, monkeypatch):
    variant = serving_slot(keyed_upstream)
    monkeypatch.setenv("NEW_KEY", PARTNER_API_KEY)
    _, err = run("rotate-key", str(variant.pk), "--api-key-env", "NEW_KEY", "--no-check")
    assert err.startswith(
        "WARNING: the new checkpoint goes untested into an experiment that is active"
    )
    assert keyed_upstream.received == []
    assert not services.current_version(variant).checks.exists()


def test_check_and_no_check_together_are_refused(keyed_upstream, monkeypatch):
    variant = serving_slot(keyed_upstream)
    monkeypatch.setenv("NEW_KEY", PARTNER_API_KEY)
    with pytest.raises(CommandError, match="not allowed with argument"):
        run("rotate-key", str(variant.pk), "--api-key-env", "NEW_KEY", "--check", "--no-check")
    assert VariantVersion.objects.filter(variant=variant).count() == 2


def test_swap_and_rotate_help_document_check_and_force(capsys):
    for subcommand in ("swap", "rotate-key"):
        with pytest.raises(SystemExit):
            call_command("experiment", subcommand, "--help")
        text = " ".join(capsys.readouterr().out.split())
        assert "BEFORE inserting it" in text and "when the test fails nothing is inserted" in text
        assert "active and paused experiments always test unless --no-check" in text
        assert "When the test fails" in text and "anyway" in text


def exploding_checker(probe):
    raise RuntimeError("the checker broke")


@pytest.mark.parametrize("page", ["hot_swap", "rotate_key"])
def test_an_error_report_of_a_checkpoint_page_masks_the_typed_key(
    client, keyed_upstream, canary_key, settings, caplog, page
):
    from django.views.debug import ExceptionReporter

    from tests.factories import SuperUserFactory

    settings.CHECKPOINT_CHECKER = "tests.test_tested_before_serving.exploding_checker"
    client.force_login(SuperUserFactory())
    client.raise_request_exception = False
    variant = serving_slot(keyed_upstream)
    url = hot_swap_url(variant) if page == "hot_swap" else rotate_url(variant)
    response = client.post(url, swap_form(keyed_upstream, canary_key, "_test"))
    assert response.status_code == 500
    [record] = [r for r in caplog.records if r.name == "django.request"]
    report = ExceptionReporter(record.request, *record.exc_info).get_traceback_text()
    assert "the checker broke" in report
    assert "api_key" in report
    assert canary_key not in report
    assert_not_in_logs(caplog, canary_key)
