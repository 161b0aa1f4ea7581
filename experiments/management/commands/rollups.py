"""``manage.py rollups rebuild|compact``: the rollups that reports read (SPEC §10)."""

from __future__ import annotations

import time

from django.core.management.base import BaseCommand, CommandParser

from experiments.feedback import rejoin
from experiments.management.progress import progress_bar
from experiments.reports import rollups


class Command(BaseCommand):
    help = "Rebuild every rollup from the raw attribution rows, or compact the writers' shares."

    def add_arguments(self, parser: CommandParser) -> None:
        actions = parser.add_subparsers(dest="action", required=True, metavar="{rebuild,compact}")
        actions.add_parser(
            "rebuild",
            help="Recompute every rollup and first-seen row from the attribution rows (after "
            "a restore), and join feedback to the checkpoints that served it. Gateways' "
            "writers wait until it commits; their records wait in the spool.",
        )
        actions.add_parser(
            "compact",
            help="Fold the rollup rows of every gateway process into one share per bucket "
            "(run it regularly, e.g. hourly: reports then read fewer rows).",
        )

    def handle(self, *args, **options) -> None:
        started = time.monotonic()
        if options["action"] == "rebuild":
            draw = progress_bar(self.stderr)
            rows = rollups.rebuild(progress=lambda done, days: draw("days", done, days))
            looked, changed = rejoin()
            self.stdout.write(
                f"Rebuilt the rollups from {rows:,} attribution row(s) "
                f"in {time.monotonic() - started:.1f} s."
            )
            self.stdout.write(
                f"Rejoined {looked:,} feedback row(s) to the checkpoints that served them "
                f"({changed:,} changed)."
            )
        else:
            folded = rollups.compact()
            self.stdout.write(
                f"Compacted {folded:,} rollup row(s) in {time.monotonic() - started:.1f} s."
            )
