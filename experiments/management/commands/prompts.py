"""``manage.py prompts wipe|gc``: remove stored prompts (and captured answers) of an
experiment, collect orphan blobs."""

from __future__ import annotations

import dataclasses
import sys
from datetime import datetime, timedelta

from django.core.management.base import CommandError, CommandParser
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime

from experiments.management.output import JsonCommand, add_json_option
from experiments.management.progress import progress_bar
from experiments.prompts.maintenance import (
    DEFAULT_GRACE,
    MIN_GRACE,
    GcSummary,
    Tally,
    collect_garbage,
    count_wipeable,
    wipe_prompts,
)
from experiments.prompts.store import get_prompt_store
from experiments.selectors import NotFound, find_experiment


def parse_before(raw: str) -> datetime:
    """A date (midnight, server time zone) or an ISO datetime (naive = server time zone)."""
    try:
        moment = parse_datetime(raw)
        if moment is None:
            day = parse_date(raw)
            if day is None:
                raise ValueError
            moment = datetime(day.year, day.month, day.day)
    except ValueError:
        raise CommandError(f"--before {raw!r} is not a date (YYYY-MM-DD) or ISO datetime") from None
    if timezone.is_naive(moment):
        moment = timezone.make_aware(moment)
    return moment


def format_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


class Command(JsonCommand):
    help = "Wipe an experiment's stored prompts, or garbage-collect unreferenced prompt blobs."

    def add_arguments(self, parser: CommandParser) -> None:
        actions = parser.add_subparsers(dest="action", required=True, metavar="{wipe,gc}")
        wipe = actions.add_parser(
            "wipe", help="Replace an experiment's prompt and answer hashes with __deleted__."
        )
        wipe.add_argument(
            "--experiment",
            required=True,
            help="The experiment: its id, a unique prefix of it, or its public model id.",
        )
        wipe.add_argument("--before", help="Only rows created before this date or ISO datetime.")
        wipe.add_argument("--yes", action="store_true", help="Do not ask for confirmation.")
        gc = actions.add_parser("gc", help="Delete blobs no row and no live manifest references.")
        gc.add_argument("--dry-run", action="store_true", help="Report, delete nothing.")
        gc.add_argument(
            "--grace-minutes",
            default=str(int(DEFAULT_GRACE.total_seconds() // 60)),
            help="Never delete a blob younger than this (default %(default)s, "
            f"minimum {int(MIN_GRACE.total_seconds() // 60)}).",
        )
        for subparser in (wipe, gc):
            add_json_option(subparser, after_subcommand=True)

    def handle(self, *args, **options) -> None:
        if options["action"] == "wipe":
            self.wipe(options)
        else:
            self.gc(options)

    # --- wipe ---

    def wipe(self, options: dict) -> None:
        try:
            experiment = find_experiment(options["experiment"])
        except NotFound as exc:
            raise CommandError(str(exc)) from None
        before = parse_before(options["before"]) if options["before"] else None

        pending = count_wipeable(experiment=experiment, before=before)
        scope = f" before {before.isoformat()}" if before else ""
        if pending and not options["yes"]:
            if not sys.stdin.isatty():
                raise CommandError(
                    "refusing to wipe without confirmation: pass --yes (stdin is not a terminal)"
                )
            # The question goes to stderr so stdout stays clean for scripts (and --json).
            self.stderr.write(
                f"Wipe the stored prompts and answers of {pending} request(s) of experiment "
                f"{experiment.name!r}{scope}? [y/N] ",
                ending="",
            )
            self.stderr.flush()
            if sys.stdin.readline().strip().lower() not in {"y", "yes"}:
                raise CommandError("aborted: nothing was changed")
        result = wipe_prompts(experiment=experiment, before=before)
        self.emit(
            f"experiment {experiment.pk}{scope}: wiped {result.wiped} prompt hash(es) and "
            f"{result.answers_wiped} answer hash(es); "
            f"{result.already_deleted} already deleted; "
            f"{result.failed_left} failed capture(s) left as __failed__. "
            "Attribution rows are unchanged; run `prompts gc` to free the blobs.",
            {
                "experiment_id": str(experiment.pk),
                "before": before.isoformat() if before else None,
                **dataclasses.asdict(result),
            },
        )

    # --- gc ---

    def gc(self, options: dict) -> None:
        raw_grace = options["grace_minutes"]
        try:
            grace = timedelta(minutes=int(raw_grace))
        except ValueError:
            raise CommandError(f"--grace-minutes {raw_grace!r} is not a whole number") from None
        if grace < MIN_GRACE:
            raise CommandError(
                f"--grace-minutes must be at least {int(MIN_GRACE.total_seconds() // 60)} "
                "so writes in flight stay safe"
            )
        try:
            store = get_prompt_store()
        except (ValueError, ImportError) as error:
            raise CommandError(f"prompt store is not usable: {error}") from None
        summary = collect_garbage(
            store, grace=grace, dry_run=options["dry_run"], progress=progress_bar(self.stderr)
        )
        if self.as_json:
            grace_minutes = int(grace.total_seconds() // 60)
            self.emit("", {"grace_minutes": grace_minutes, **dataclasses.asdict(summary)})
        else:
            self._print_summary(summary, grace)

    def _print_summary(self, summary: GcSummary, grace: timedelta) -> None:
        def line(label: str, bucket: dict[str, Tally]) -> str:
            total = Tally(
                count=sum(t.count for t in bucket.values()),
                bytes=sum(t.bytes for t in bucket.values()),
            )
            detail = ", ".join(
                f"{kind}s {tally.count} ({format_bytes(tally.bytes)})"
                for kind, tally in sorted(bucket.items())
            )
            return f"{label}: {total.count} blob(s), {format_bytes(total.bytes)}" + (
                f" [{detail}]" if detail else ""
            )

        removed_label = "would remove" if summary.dry_run else "removed"
        self.stdout.write(line("kept, referenced", summary.kept_referenced))
        minutes = int(grace.total_seconds() // 60)
        self.stdout.write(line(f"kept, younger than {minutes} min", summary.kept_young))
        self.stdout.write(line(removed_label, summary.removed))
        if summary.skipped_changed:
            self.stdout.write(f"kept, touched during the run: {summary.skipped_changed}")
        if summary.unreadable_manifests:
            self.stdout.write(f"unreadable manifests (kept): {summary.unreadable_manifests}")
        if summary.missing_referenced:
            self.stdout.write(f"rows pointing at a missing blob: {summary.missing_referenced}")
        if summary.stopped_early:
            self.stdout.write("stopped early: the run outlasted its safety window; run gc again")
        if summary.dry_run:
            self.stdout.write("dry run: nothing was deleted")
