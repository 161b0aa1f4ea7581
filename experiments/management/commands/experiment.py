"""``manage.py experiment SUBCOMMAND``: the operator's scriptable twin of the admin.

Every write goes through ``experiments.services``, the one home of the lifecycle
rules; this module only parses arguments, resolves ids, reads partner keys and
formats output.

Conventions:

* An experiment is named by its id, a unique prefix of it or its public model id; a
  variant by its id, a unique prefix of it or ``EXPERIMENT:LABEL``
  (``experiments.selectors``).
* ``--json`` and ``--by USERNAME`` are accepted before or after the subcommand; output
  and exit status follow ``experiments.management.output`` (one JSON object with
  ``--json``; a refusal is exit status 1). An idempotent repeat (activating an
  active experiment) is a success that reports ``changed: false``.
* A partner key is read from the environment variable named by ``--api-key-env``
  or typed at a hidden prompt; never from an argument, which would land in shell
  history and process lists. Neither the key nor its ciphertext is ever printed.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import CommandError, CommandParser

from experiments import selectors, services
from experiments.management.output import CommandRefusal, JsonCommand, add_json_option
from experiments.models import (
    CheckpointCheck,
    Experiment,
    Variant,
    VariantVersion,
    checkpoint_label,
)

#: Larger upstream files are certainly a mistake (the allowlist is a handful of fields).
MAX_UPSTREAM_FILE_BYTES = 256 * 1024
ENV_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
EXPERIMENT_HELP = "Experiment: its id, a unique prefix of it, or its public model id."
VARIANT_HELP = "Variant: its id, a unique prefix of it, or EXPERIMENT:LABEL."


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def _timestamp(moment: datetime | None) -> str | None:
    return moment.isoformat(timespec="seconds") if moment else None


def _version_name(variant: Variant, version: VariantVersion) -> dict[str, Any]:
    """The checkpoint's number and name (SPEC §10), as every command output carries them."""
    return {
        "version_number": version.version_number,
        "key_rotation": version.key_rotation,
        "key_rotated": version.key_rotated,
        "label": checkpoint_label(variant.label, version.version_number, version.key_rotation),
    }


def _checkpoint_history(experiment: Experiment) -> list[dict[str, Any]]:
    """Every checkpoint of every slot, oldest first per slot, with its number and period."""
    return [
        {
            "variant_id": str(slot.slot_id),
            "slot": slot.label,
            "version_id": str(c.version_id),
            "version_number": c.version_number,
            "key_rotation": c.key_rotation,
            "key_rotated": c.key_rotated,
            "label": c.label,
            "internal_id": c.internal_id,
            "effective_from": _timestamp(c.effective_from),
            "effective_until": _timestamp(c.effective_until),
        }
        for slot in selectors.slot_histories(experiment)
        for c in slot.checkpoints
    ]


def _history_lines(history: list[dict[str, Any]]) -> list[str]:
    if not history:
        return []
    headers = ("CHECKPOINT", "INTERNAL ID", "VERSION ID", "EFFECTIVE FROM", "UNTIL")
    rows = [
        (
            c["label"],
            c["internal_id"],
            c["version_id"],
            c["effective_from"],
            c["effective_until"] or "current",
        )
        for c in history
    ]
    return ["", "Checkpoint history (per slot, oldest first; times UTC):", *_table(headers, rows)]


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [
        max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=False)
    ]
    return [
        "  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in (headers, *rows)
    ]


def _check_json(check: CheckpointCheck) -> dict[str, Any]:
    return {
        "ok": check.ok,
        "status_code": check.status_code,
        "latency_ms": check.latency_ms,
        "reason": check.reason,
        "checked_at": _timestamp(check.checked_at),
    }


def _check_cell(check: dict[str, Any] | None) -> str:
    if check is None:
        return "not tested"
    return f"{'passed' if check['ok'] else 'failed'} {check['checked_at']}"


def _capture_cell(experiment: Experiment) -> str:
    rate = experiment.response_capture_rate
    if not rate:
        return "none (response capture rate 0%)"
    return f"{services.format_rate(rate)} of requests"


def _key_cell(checkpoint: dict[str, Any]) -> str:
    if not checkpoint.get("key_configured"):
        return "-"
    fingerprint = checkpoint.get("key_fingerprint")
    return f"configured (key {fingerprint})" if fingerprint else "configured (key unknown)"


def _redact_unrecognized(error: Callable[[str], Any]) -> Callable[[str], Any]:
    """Wrap a parser's ``error`` so a mistyped ``--api-key sk-...`` is never echoed back."""

    def redacted(message: str) -> Any:
        prefix = "unrecognized arguments:"
        if message.startswith(prefix):
            tokens = message[len(prefix) :].split()
            names = [token.split("=", 1)[0] for token in tokens if token.startswith("--")]
            message = " ".join([prefix, *names, "(values not shown)"])
        return error(message)

    return redacted


class Command(JsonCommand):
    help = (
        "Manage model experiments: list, show, create, edit variants, hot-swap checkpoints, "
        "rotate keys and move through the lifecycle. All rules live in experiments.services."
    )

    # --- arguments -------------------------------------------------------------------

    def create_parser(self, prog_name: str, subcommand: str, **kwargs: Any) -> CommandParser:
        # No prefix matching: `--api-key sk-...` must not be taken for `--api-key-env`.
        kwargs.setdefault("allow_abbrev", False)
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        parser.error = _redact_unrecognized(parser.error)
        return parser

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--by", metavar="USERNAME", help="Record this user in the history.")
        # The same options after the subcommand; SUPPRESS keeps a value given before it.
        shared = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        add_json_option(shared, after_subcommand=True)
        shared.add_argument(
            "--by",
            metavar="USERNAME",
            default=argparse.SUPPRESS,
            help="Record this user in the history.",
        )
        sub = parser.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")

        def add(name: str, help_text: str) -> CommandParser:
            return sub.add_parser(name, help=help_text, parents=[shared], allow_abbrev=False)

        self._add_read_commands(add)
        self._add_experiment_commands(add)
        self._add_variant_commands(add)
        self._add_checkpoint_commands(add)
        for action, verb in (
            ("activate", "Activate a draft or resume a paused experiment."),
            ("pause", "Pause an active experiment (its id answers 404 until resumed)."),
            ("complete", "Complete an active or paused experiment (terminal)."),
            ("archive", "Hide an experiment from default lists (not while active)."),
            ("unarchive", "Show an archived experiment in default lists again."),
        ):
            add(action, verb).add_argument("id", help=EXPERIMENT_HELP)

    @staticmethod
    def _add_read_commands(add: Callable[[str, str], CommandParser]) -> None:
        listing = add("list", "List experiments (archived ones only with --all).")
        listing.add_argument("--all", action="store_true", help="Include archived experiments.")
        add("show", "Show an experiment, its variants and their current checkpoints.").add_argument(
            "id", help=EXPERIMENT_HELP
        )

    @staticmethod
    def _add_experiment_commands(add: Callable[[str, str], CommandParser]) -> None:
        create = add("create", "Create a draft experiment; prints its id.")
        create.add_argument("--public-model-id", required=True, help="e.g. kilo/preview-foo")
        create.add_argument("--name", required=True)
        create.add_argument("--description", default="")
        update = add("update", "Change name, description or (draft only) public model id.")
        update.add_argument("id", help=EXPERIMENT_HELP)
        update.add_argument("--name")
        update.add_argument("--description")
        update.add_argument("--public-model-id")
        # A string on purpose: the service owns the "0 to 100, two decimals" rule.
        update.add_argument(
            "--response-capture-rate",
            metavar="PERCENT",
            help="Percent of requests whose answer is captured (0 to 100; 0 = none).",
        )
        delete = add("delete", "Delete a draft experiment (asks for confirmation).")
        delete.add_argument("id", help=EXPERIMENT_HELP)
        delete.add_argument("--yes", action="store_true", help="Do not ask for confirmation.")

    @staticmethod
    def _add_variant_commands(add: Callable[[str, str], CommandParser]) -> None:
        variant = add("add-variant", "Add a variant slot to a draft; prints its id.")
        variant.add_argument("id", help=EXPERIMENT_HELP)
        variant.add_argument("--label", required=True)
        # Strings on purpose: the service owns the "positive whole number" rule.
        variant.add_argument("--weight", required=True)
        add("remove-variant", "Remove a variant slot from a draft.").add_argument(
            "variant_id", help=VARIANT_HELP
        )
        label = add("label", "Relabel a variant (cosmetic; never rebuckets).")
        label.add_argument("variant_id", help=VARIANT_HELP)
        label.add_argument("label")
        weight = add("weight", "Set a variant's weight (draft only).")
        weight.add_argument("variant_id", help=VARIANT_HELP)
        weight.add_argument("weight")
        add(
            "set-control",
            "Make a variant the control slot the reports compare the others against "
            "(any status except completed; never moves users).",
        ).add_argument("variant_id", help=VARIANT_HELP)

    @staticmethod
    def _add_checkpoint_commands(add: Callable[[str, str], CommandParser]) -> None:
        swap = add("swap", "Hot-swap a new checkpoint into a variant slot.")
        swap.add_argument("variant_id", help=VARIANT_HELP)
        swap.add_argument(
            "--upstream-file",
            required=True,
            metavar="PATH|-",
            help="Upstream JSON (SPEC §5 allowlist); '-' reads stdin.",
        )
        swap.add_argument(
            "--api-key-env",
            metavar="VAR",
            help="Environment variable holding a new partner key (omit to keep the current key).",
        )
        rotate = add("rotate-key", "Rotate a variant's partner key (same upstream).")
        rotate.add_argument("variant_id", help=VARIANT_HELP)
        rotate.add_argument(
            "--api-key-env",
            metavar="VAR",
            help="Environment variable holding the new key (prompted for when omitted).",
        )
        for command, verb in ((swap, "swap"), (rotate, "rotate")):
            testing = command.add_mutually_exclusive_group()
            testing.add_argument(
                "--check",
                action="store_true",
                help="Test the new checkpoint with one small request BEFORE inserting it, in "
                "any status (active and paused experiments always test unless --no-check); "
                "when the test fails nothing is inserted and the exit status is 1. The result "
                "is recorded with the new version.",
            )
            testing.add_argument(
                "--no-check",
                action="store_true",
                help="Do not test the new checkpoint first, even in an active or paused "
                "experiment (a WARNING says it goes in untested).",
            )
            command.add_argument(
                "--force",
                action="store_true",
                help=f"When the test fails, {verb} anyway (a WARNING names the failure, the "
                "failed result is recorded with the new version, exit status 0).",
            )
        add(
            "check",
            "Test a variant's current checkpoint with one small request (exit status 1 when "
            "it fails); the result is recorded.",
        ).add_argument("variant_id", help=VARIANT_HELP)

    # --- dispatch --------------------------------------------------------------------

    def handle(self, *args: Any, **options: Any) -> None:
        name = options["subcommand"]
        self.actor = self._resolve_actor(options["by"])
        if name in services.TRANSITIONS:
            self._transition(name, options)
        else:
            getattr(self, "_cmd_" + name.replace("-", "_"))(options)

    @staticmethod
    def _call(service: Callable[..., Any], **kwargs: Any) -> Any:
        try:
            return service(**kwargs)
        except services.ExperimentError as exc:
            raise CommandError(_one_line(exc.message)) from None

    # --- lookups ---------------------------------------------------------------------

    @staticmethod
    def _resolve_actor(username: str | None):
        if username is None:
            return None  # the services record their service user
        User = get_user_model()
        try:
            return User.objects.get(**{User.USERNAME_FIELD: username})
        except User.DoesNotExist:
            raise CommandError(f"No user matches {username!r} (--by).") from None

    @staticmethod
    def _experiment(reference: str) -> Experiment:
        try:
            return selectors.find_experiment(reference)
        except selectors.NotFound as exc:
            raise CommandError(str(exc)) from None

    @staticmethod
    def _variant(reference: str) -> Variant:
        try:
            return selectors.find_variant(reference)
        except selectors.NotFound as exc:
            raise CommandError(str(exc)) from None

    # --- reading ---------------------------------------------------------------------

    @staticmethod
    def _summary(experiment: Experiment) -> dict[str, Any]:
        return {
            "id": str(experiment.pk),
            "public_model_id": experiment.public_model_id,
            "name": experiment.name,
            "description": experiment.description,
            "status": experiment.status,
            "is_archived": experiment.is_archived,
            "created_by": experiment.created_by.get_username() if experiment.created_by else None,
            "created_at": _timestamp(experiment.created_at),
            "updated_at": _timestamp(experiment.updated_at),
            "started_at": _timestamp(experiment.started_at),
            "ended_at": _timestamp(experiment.ended_at),
            "response_capture_percent": float(experiment.response_capture_rate),
        }

    @staticmethod
    def _current_checkpoint(variant: Variant) -> dict[str, Any] | None:
        # The default manager defers the ciphertext; "key configured" is computed in SQL
        # so the ciphertext itself is never selected.
        version = selectors.current_version_with_key_state(variant)
        if version is None:
            return None
        check = selectors.latest_checks([version.pk]).get(version.pk)
        return {
            "id": str(version.pk),
            **_version_name(variant, version),
            "internal_id": version.internal_id,
            "base_url_host": version.base_url_host,
            "effective_at": _timestamp(version.effective_at),
            "key_configured": bool(version.key_configured),
            "key_fingerprint": version.key_fingerprint or None,
            "last_check": _check_json(check) if check else None,
        }

    def _variants(self, experiment: Experiment) -> list[dict[str, Any]]:
        variants = list(experiment.variants.order_by("created_at", "id"))
        total = sum(v.weight for v in variants)
        control = selectors.control_slot(experiment)
        return [
            {
                "id": str(v.pk),
                "label": v.label,
                "weight": v.weight,
                "share_percent": round(100 * v.weight / total, 2) if total else 0.0,
                "is_control": control is not None and v.pk == control.pk,
                "current_checkpoint": self._current_checkpoint(v),
            }
            for v in variants
        ]

    def _cmd_list(self, options: dict[str, Any]) -> None:
        experiments = selectors.with_variant_counts(Experiment.objects.all())
        if not options["all"]:
            experiments = experiments.filter(is_archived=False)
        rows = [
            {**self._summary(exp), "variant_count": exp.variant_count}
            for exp in experiments.order_by("-created_at", "id")
        ]
        headers = ("ID", "STATUS", "ARCHIVED", "VARIANTS", "PUBLIC MODEL ID", "NAME")
        cells = [
            (
                row["id"],
                row["status"],
                "yes" if row["is_archived"] else "no",
                str(row["variant_count"]),
                row["public_model_id"],
                row["name"],
            )
            for row in rows
        ]
        text = _table(headers, cells) if rows else ["No experiments."]
        self.emit(text, {"experiments": rows})

    def _cmd_show(self, options: dict[str, Any]) -> None:
        experiment = self._experiment(options["id"])
        summary = {
            **self._summary(experiment),
            "variants": self._variants(experiment),
            "checkpoint_history": _checkpoint_history(experiment),
            "key_warnings": services.key_warnings(experiment),
        }
        lines = [
            f"Experiment {summary['id']}",
            *(
                f"  {label:<16} {value if value not in (None, '') else '-'}"
                for label, value in (
                    ("name", summary["name"]),
                    ("public model id", summary["public_model_id"]),
                    ("status", summary["status"]),
                    ("archived", "yes" if summary["is_archived"] else "no"),
                    ("description", summary["description"]),
                    ("created", f"{summary['created_at']} by {summary['created_by'] or '-'}"),
                    ("started", summary["started_at"]),
                    ("ended", summary["ended_at"]),
                    ("answers captured", _capture_cell(experiment)),
                )
            ),
            "",
            *self._variant_lines(summary["variants"]),
            *_history_lines(summary["checkpoint_history"]),
            *(f"WARNING: {_one_line(warning)}" for warning in summary["key_warnings"]),
        ]
        self.emit(lines, {"experiment": summary})

    @staticmethod
    def _variant_lines(variants: list[dict[str, Any]]) -> list[str]:
        if not variants:
            return ["No variants."]
        headers = ("VARIANT ID", "LABEL", "WEIGHT", "SHARE", "VERSION", "CHECKPOINT", "VERSION ID")
        headers += ("BASE URL HOST", "EFFECTIVE AT", "KEY", "LAST TEST")
        rows = []
        for v in variants:
            cp = v["current_checkpoint"] or {}
            rows.append(
                (
                    v["id"],
                    f"{v['label']} (control)" if v["is_control"] else v["label"],
                    str(v["weight"]),
                    f"{v['share_percent']:.1f}%",
                    cp.get("label", "-"),
                    cp.get("internal_id", "(no checkpoint)"),
                    cp.get("id", "-"),
                    cp.get("base_url_host", "-"),
                    cp.get("effective_at", "-"),
                    _key_cell(cp),
                    _check_cell(cp.get("last_check")),
                )
            )
        return ["Variants (in the order they were created):", *_table(headers, rows)]

    # --- experiments -----------------------------------------------------------------

    def _cmd_create(self, options: dict[str, Any]) -> None:
        experiment = self._call(
            services.create_experiment,
            public_model_id=options["public_model_id"],
            name=options["name"],
            description=options["description"],
            by=self.actor,
        )
        self.emit(
            str(experiment.pk), {"id": str(experiment.pk), "experiment": self._summary(experiment)}
        )

    def _cmd_update(self, options: dict[str, Any]) -> None:
        names = ("name", "description", "public_model_id", "response_capture_rate")
        fields = {k: options[k] for k in names}
        if all(value is None for value in fields.values()):
            raise CommandError(
                "Nothing to update: pass --name, --description, --public-model-id or "
                "--response-capture-rate."
            )
        experiment = self._experiment(options["id"])
        updated = self._call(
            services.update_experiment, experiment=experiment, by=self.actor, **fields
        )
        self.emit(f"Updated experiment {updated.pk}.", {"experiment": self._summary(updated)})

    def _cmd_delete(self, options: dict[str, Any]) -> None:
        experiment = self._experiment(options["id"])
        if not options["yes"]:
            self._confirm_delete(experiment)
        self._call(services.delete_experiment, experiment=experiment, by=self.actor)
        self.emit(f"Deleted experiment {experiment.pk}.", {"id": str(experiment.pk)})

    def _confirm_delete(self, experiment: Experiment) -> None:
        if not sys.stdin.isatty():
            raise CommandError("Refusing to delete without confirmation: pass --yes.")
        # The prompt goes to stderr so stdout stays clean for scripts.
        self.stderr.write(
            f"Delete experiment {experiment.name!r} ({experiment.pk})? Type 'yes' to confirm: ",
            ending="",
        )
        self.stderr.flush()
        if sys.stdin.readline().strip().lower() != "yes":
            raise CommandError("Not confirmed; nothing was deleted.")

    # --- variants --------------------------------------------------------------------

    def _cmd_add_variant(self, options: dict[str, Any]) -> None:
        experiment = self._experiment(options["id"])
        variant = self._call(
            services.add_variant,
            experiment=experiment,
            label=options["label"],
            weight=options["weight"],
            by=self.actor,
        )
        self.emit(str(variant.pk), {"id": str(variant.pk), "variant": self._variant_json(variant)})

    def _cmd_remove_variant(self, options: dict[str, Any]) -> None:
        variant = self._variant(options["variant_id"])
        self._call(services.remove_variant, variant=variant, by=self.actor)
        self.emit(f"Removed variant {variant.pk}.", {"id": str(variant.pk)})

    def _cmd_label(self, options: dict[str, Any]) -> None:
        variant = self._variant(options["variant_id"])
        renamed = self._call(
            services.rename_variant, variant=variant, label=options["label"], by=self.actor
        )
        self.emit(
            f"Variant {renamed.pk} is labelled {renamed.label!r}.",
            {"variant": self._variant_json(renamed)},
        )

    def _cmd_weight(self, options: dict[str, Any]) -> None:
        variant = self._variant(options["variant_id"])
        updated = self._call(
            services.set_variant_weight, variant=variant, weight=options["weight"], by=self.actor
        )
        self.emit(
            f"Variant {updated.pk} has weight {updated.weight}.",
            {"variant": self._variant_json(updated)},
        )

    def _cmd_set_control(self, options: dict[str, Any]) -> None:
        variant = self._variant(options["variant_id"])
        before = selectors.control_slot(variant.experiment)
        control = self._call(services.set_control, variant=variant, by=self.actor)
        changed = before is None or before.pk != control.pk
        if changed:
            was = f" (was {before.label!r})" if before is not None else ""
            text = f"Variant {control.pk} ({control.label!r}) is the control slot{was}."
        else:
            text = f"Variant {control.pk} ({control.label!r}): nothing to do; already the control."
        self.emit(text, {"changed": changed, "variant": self._variant_json(control)})

    @staticmethod
    def _variant_json(variant: Variant) -> dict[str, Any]:
        return {
            "id": str(variant.pk),
            "experiment_id": str(variant.experiment_id),
            "label": variant.label,
            "weight": variant.weight,
            "is_control": variant.pk
            == getattr(selectors.control_slot(variant.experiment), "pk", None),
        }

    # --- checkpoints -----------------------------------------------------------------

    def _cmd_swap(self, options: dict[str, Any]) -> None:
        variant = self._variant(options["variant_id"])
        from_stdin = options["upstream_file"] == "-"
        upstream = self._read_upstream(options["upstream_file"])
        if options["api_key_env"]:
            api_key = self._key_from_env(options["api_key_env"])
        elif not from_stdin and sys.stdin.isatty():
            api_key = self._prompt_key(
                f"Partner API key for {variant.label!r} (empty keeps the current key): "
            )
        else:
            api_key = None  # the service reuses the previous ciphertext, or refuses
        version = self._insert(
            services.hot_swap,
            options,
            variant=variant,
            upstream=upstream,
            api_key=api_key,
            by=self.actor,
        )
        self._emit_version("Hot-swapped", variant, version, new_key=api_key is not None)

    def _cmd_rotate_key(self, options: dict[str, Any]) -> None:
        variant = self._variant(options["variant_id"])
        if options["api_key_env"]:
            api_key = self._key_from_env(options["api_key_env"])
        elif sys.stdin.isatty():
            api_key = self._prompt_key(f"New partner API key for {variant.label!r}: ")
        else:
            raise CommandError(
                "rotate-key needs a key: pass --api-key-env VAR or run it in a terminal."
            )
        version = self._insert(
            services.rotate_key, options, variant=variant, api_key=api_key, by=self.actor
        )
        self._emit_version("Rotated the key of", variant, version, new_key=True)

    def _cmd_check(self, options: dict[str, Any]) -> None:
        variant = self._variant(options["variant_id"])
        check = self._call(services.check_slot, variant=variant, by=self.actor)
        line, payload = self._check_result(variant, check)
        self.emit(line, payload)

    @staticmethod
    def _check_result(variant: Variant, check: CheckpointCheck) -> tuple[str, dict[str, Any]]:
        """The test's line and JSON; raises (exit status 1) when the checkpoint failed it."""
        version = VariantVersion.objects.get(pk=check.version_id)
        subject = f"Connection test of slot {variant.label!r} ({version.internal_id})"
        payload = {"check": {"version_id": str(check.version_id), **_check_json(check)}}
        if not check.ok:
            raise CommandRefusal(f"{subject} failed: {check.summary}.", payload)
        return f"{subject} passed: {check.summary}.", payload

    def _insert(self, service: Callable[..., VariantVersion], options: dict[str, Any], **kwargs):
        """Insert a checkpoint, tested first in an active or paused experiment (or with
        --check in a draft); a failed test inserts nothing (exit status 1) unless --force."""
        variant = kwargs["variant"]
        required = services.checkpoint_test_required(variant.experiment)
        test = options["check"] or (required and not options["no_check"])
        if options["force"] and not test:
            raise CommandError(
                "--force only applies when the checkpoint is tested: nothing is tested here "
                "(a draft without --check, or --no-check)."
            )
        if not test and required:
            self.stderr.write(
                "WARNING: the new checkpoint goes untested into an experiment that is "
                f"{variant.experiment.status} (--no-check)."
            )
        try:
            return service(**kwargs, test=test, force=options["force"])
        except services.CheckpointTestFailed as failed:
            check = failed.check
            raise CommandRefusal(
                f"Connection test of the new checkpoint for slot {variant.label!r} failed: "
                f"{check.summary}. Nothing was inserted (--force inserts it anyway).",
                {"version": None, "check": {"version_id": None, **_check_json(check)}},
            ) from None
        except services.ExperimentError as exc:
            raise CommandError(_one_line(exc.message)) from None

    def _emit_version(
        self, verb: str, variant: Variant, version: VariantVersion, *, new_key: bool
    ) -> None:
        checkpoint = {
            "id": str(version.pk),
            **_version_name(variant, version),
            "variant_id": str(variant.pk),
            "internal_id": version.internal_id,
            "base_url_host": version.base_url_host,
            "effective_at": _timestamp(version.effective_at),
            "new_key": new_key,
        }
        lines = [
            f"{verb} variant {variant.label!r}: {checkpoint['label']}, version {version.pk} "
            f"({version.internal_id} at {version.base_url_host}, effective "
            f"{checkpoint['effective_at']}), key {'replaced' if new_key else 'kept'}."
        ]
        payload: dict[str, Any] = {"version": checkpoint}
        check = selectors.latest_checks([version.pk]).get(version.pk)
        if check is not None:
            subject = f"Connection test of the new checkpoint ({version.internal_id})"
            if check.ok:
                lines.append(f"{subject} passed before it was inserted: {check.summary}.")
            else:
                # --force: inserted on purpose despite the failure, which is said, not hidden.
                self.stderr.write(
                    f"WARNING: {subject} failed: {_one_line(check.summary)}; inserted anyway "
                    "(--force)."
                )
            payload["check"] = {"version_id": str(version.pk), **_check_json(check)}
        self.emit(lines, payload)

    @staticmethod
    def _read_upstream(path: str) -> Any:
        source = "stdin" if path == "-" else f"upstream file {path}"
        try:
            if path == "-":
                text = sys.stdin.read(MAX_UPSTREAM_FILE_BYTES + 1)
            else:
                with open(path, encoding="utf-8") as handle:
                    text = handle.read(MAX_UPSTREAM_FILE_BYTES + 1)
        except OSError as exc:
            raise CommandError(f"Cannot read {source}: {exc.strerror or exc}.") from None
        except UnicodeDecodeError:
            raise CommandError(f"Cannot read {source}: not UTF-8 text.") from None
        if len(text) > MAX_UPSTREAM_FILE_BYTES:
            raise CommandError(f"The {source} is larger than {MAX_UPSTREAM_FILE_BYTES} bytes.")
        try:
            return json.loads(text)
        except RecursionError:
            raise CommandError(
                f"The {source} is nested too deeply to be an upstream configuration."
            ) from None
        except json.JSONDecodeError as exc:
            # Position only: the file's text is never echoed (it might hold a key by mistake).
            raise CommandError(
                f"The {source} is not valid JSON ({exc.msg} at line {exc.lineno} "
                f"column {exc.colno})."
            ) from None

    @staticmethod
    def _key_from_env(name: str) -> str:
        # The operator names the variable; reading it here is the whole point of the option.
        # The name is never echoed: a key pasted in its place must not reach the output.
        if not ENV_VAR_NAME.fullmatch(name):
            raise CommandError(
                "--api-key-env takes the NAME of an environment variable holding the key, "
                "not the key itself."
            )
        value = os.environ.get(name)
        if value is None:
            raise CommandError("The environment variable named by --api-key-env is not set.")
        if not value.strip():
            raise CommandError("The environment variable named by --api-key-env is empty.")
        return value

    @staticmethod
    def _prompt_key(prompt: str) -> str | None:
        value = getpass.getpass(prompt)
        return value if value.strip() else None

    # --- lifecycle -------------------------------------------------------------------

    def _transition(self, action: str, options: dict[str, Any]) -> None:
        experiment = self._experiment(options["id"])
        before = (experiment.status, experiment.is_archived)
        warnings = (
            services.activation_warnings(experiment)
            if action == "activate" and experiment.can_activate
            else []
        )
        after = self._call(services.TRANSITIONS[action], experiment=experiment, by=self.actor)
        for warning in warnings:
            # Staff may activate despite a failed test, as in the admin; it is said, not hidden.
            self.stderr.write(f"WARNING: {_one_line(warning)}")
        changed = (after.status, after.is_archived) != before
        state = f"{after.status}, {'archived' if after.is_archived else 'not archived'}"
        text = (
            f"Experiment {after.pk}: {action} done; now {state}."
            if changed
            else f"Experiment {after.pk}: {action}: nothing to do; already {state}."
        )
        self.emit(
            text,
            {
                "action": action,
                "changed": changed,
                "warnings": warnings,
                "experiment": self._summary(after),
            },
        )
