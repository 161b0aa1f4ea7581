"""``manage.py retention apply --older-than DAYS [--dry-run]``: drop old raw rows."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError, CommandParser

from experiments.partitions import apply_retention, plan_retention, retention_cutoff
from experiments.prompts.maintenance import collect_garbage
from experiments.prompts.store import get_prompt_store


class Command(BaseCommand):
    help = (
        "Drop raw usage and attribution rows older than DAYS: whole monthly partitions on "
        "PostgreSQL, then the prompts no remaining row references. Rollups, reports and "
        "the sample-ratio check are unchanged."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        actions = parser.add_subparsers(dest="action", required=True, metavar="{apply}")
        apply = actions.add_parser("apply", help="Drop raw rows older than --older-than days.")
        apply.add_argument("--older-than", required=True, help="Age in days (at least 1).")
        apply.add_argument("--dry-run", action="store_true", help="Report, change nothing.")

    def handle(self, *args, **options) -> None:
        raw = options["older_than"]
        try:
            days = int(raw)
        except ValueError:
            raise CommandError(f"--older-than {raw!r} is not a whole number of days") from None
        if days < 1:
            raise CommandError("--older-than must be at least 1 day")
        plan = plan_retention(retention_cutoff(days))
        verb = "Would drop" if options["dry_run"] else "Dropping"
        self.stdout.write(f"Cutoff: {plan.cutoff.isoformat()} (rows older than {days} days).")
        for name, rows in plan.partitions:
            self.stdout.write(f"{verb} partition {name} (~{rows:,} rows).")
        self.stdout.write(f"{verb} {plan.loose_rows:,} older row(s) outside those partitions.")
        if options["dry_run"]:
            self.stdout.write("Dry run: nothing was changed.")
            return
        apply_retention(plan)
        try:
            summary = collect_garbage(get_prompt_store())
        except (ValueError, ImportError) as error:
            raise CommandError(
                f"raw rows dropped, but the prompt store is not usable: {error}; "
                "run `prompts gc` once it is"
            ) from None
        removed = sum(tally.count for tally in summary.removed.values())
        self.stdout.write(
            f"Done. Prompts no remaining row references: {removed} blob(s) removed. "
            "Rollups, reports and the sample-ratio check are unchanged."
        )
