"""``manage.py partitions ensure``: create the raw tables' coming monthly partitions."""

from __future__ import annotations

from datetime import date

from django.core.management.base import BaseCommand, CommandError, CommandParser

from experiments.partitions import MONTHS_AHEAD, ensure_partitions


def parse_month(raw: str) -> date:
    try:
        year, month = raw.split("-")
        return date(int(year), int(month), 1)
    except ValueError:
        raise CommandError(f"--from {raw!r} is not a month (YYYY-MM)") from None


class Command(BaseCommand):
    help = (
        "Create the monthly partitions of gateway_usage, model_experiment_request and "
        "model_experiment_checkpoint_message (PostgreSQL) ahead of time; run it daily."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        actions = parser.add_subparsers(dest="action", required=True, metavar="{ensure}")
        ensure = actions.add_parser("ensure", help="Create missing monthly partitions.")
        ensure.add_argument(
            "--months-ahead",
            type=int,
            default=MONTHS_AHEAD,
            help="Months after the current one to create (default %(default)s).",
        )
        ensure.add_argument("--from", dest="first", help="First month, YYYY-MM (default: now).")

    def handle(self, *args, **options) -> None:
        if options["months_ahead"] < 0:
            raise CommandError("--months-ahead must not be negative")
        first = parse_month(options["first"]) if options["first"] else None
        result = ensure_partitions(first_month=first, months_ahead=options["months_ahead"])
        self.stdout.write(
            f"Created {len(result.created)} partition(s)"
            + (f": {', '.join(result.created)}" if result.created else "")
            + "."
        )
        for name in result.held_in_default:
            self.stdout.write(
                f"Not created: {name}; the default partition holds rows of that month "
                "(they stay there, counted and readable)."
            )
