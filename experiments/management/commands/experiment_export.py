"""``manage.py experiment_export EXPERIMENT --out DIR``: a provider-safe bundle (issue 10).

A folder with ``manifest.json``, ``report.json`` and, with ``--samples N``, redacted
``samples.jsonl``; written whole or not at all (see experiments/export/bundle.py).
"""

from __future__ import annotations

import secrets
from pathlib import Path

from django.conf import settings
from django.core.management.base import CommandError, CommandParser

from experiments.export.bundle import (
    MAX_SAMPLES,
    ExportError,
    ExportRequest,
    check_destination,
    write_bundle,
)
from experiments.export.redact import RedactionPatternError, compile_extra_patterns
from experiments.management.output import JsonCommand
from experiments.management.progress import progress_bar
from experiments.reports.filters import ReportFilters, ReportInputError, parse_moment
from experiments.reports.report import experiment_report
from experiments.selectors import NotFound, find_experiment

#: Seeds are recorded in the manifest; 63 bits keep them exact in any JSON reader's int.
MAX_SEED = 2**63 - 1


def _count(raw: str, *, name: str, maximum: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise CommandError(f"Bad {name} {raw!r}: give a whole number.") from None
    if not 0 <= value <= maximum:
        raise CommandError(f"Bad {name} {raw!r}: give a number from 0 to {maximum:,}.")
    return value


class Command(JsonCommand):
    help = (
        "Write a provider-safe bundle for an experiment: manifest.json, report.json and "
        "optionally redacted samples.jsonl. No user, machine, IP, request or usage ids, "
        "keys or upstream details."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "experiment_id",
            metavar="EXPERIMENT",
            help="The experiment: its id, a unique prefix of it, or its public model id.",
        )
        parser.add_argument(
            "--out",
            required=True,
            metavar="DIR",
            help="The bundle's folder: must not exist yet, or be empty.",
        )
        parser.add_argument("--since", help="ISO 8601 date or time (UTC when no offset).")
        parser.add_argument("--until", help="ISO 8601 date or time, exclusive.")
        parser.add_argument(
            "--samples",
            default="0",
            metavar="N",
            help=f"Redacted request/answer pairs per checkpoint (0, the default: none; "
            f"at most {MAX_SAMPLES:,}).",
        )
        parser.add_argument(
            "--seed",
            metavar="SEED",
            help="The sampling seed (default: a random one). The manifest records it: the "
            "same seed picks the same requests again.",
        )
        parser.add_argument(
            "--redact",
            action="append",
            default=[],
            metavar="PATTERN",
            help="An extra regular expression to replace with [redacted] (repeatable; "
            "added to the EXPORT_REDACT_PATTERNS setting).",
        )

    def handle(self, *args, **options) -> None:
        try:
            experiment = find_experiment(options["experiment_id"])
        except NotFound as exc:
            raise CommandError(str(exc)) from None
        try:
            since = parse_moment(options["since"], name="--since") if options["since"] else None
            until = parse_moment(options["until"], name="--until") if options["until"] else None
            filters = ReportFilters(since=since, until=until)
        except ReportInputError as exc:
            raise CommandError(str(exc)) from None
        samples = _count(options["samples"], name="--samples", maximum=MAX_SAMPLES)
        seed = (
            _count(options["seed"], name="--seed", maximum=MAX_SEED)
            if options["seed"] is not None
            else secrets.randbelow(2**32)
        )
        try:
            extra = compile_extra_patterns(
                settings.EXPORT_REDACT_PATTERNS, source="EXPORT_REDACT_PATTERNS"
            ) + compile_extra_patterns(options["redact"], source="--redact")
        except RedactionPatternError as exc:
            raise CommandError(str(exc)) from None
        try:
            check_destination(Path(options["out"]))
        except ExportError as exc:
            raise CommandError(str(exc)) from None
        report = experiment_report(experiment, filters)
        try:
            summary = write_bundle(
                Path(options["out"]),
                report,
                ExportRequest(since=since, until=until, samples=samples, seed=seed),
                extra_patterns=extra,
                progress=progress_bar(self.stderr),
            )
        except ExportError as exc:
            raise CommandError(str(exc)) from None
        names = ", ".join(sorted([*summary.files, "manifest.json"]))
        lines = [
            f"Wrote {summary.out}: {names}.",
            f"{summary.checkpoints} checkpoint(s); {summary.samples} sample(s)"
            + (f" (seed {seed})" if samples else "")
            + ".",
        ]
        if summary.redactions:
            replaced = ", ".join(f"{kind} {n}" for kind, n in sorted(summary.redactions.items()))
            lines.append(f"Redacted: {replaced}.")
        self.emit(
            lines,
            {
                "out": str(summary.out),
                "files": summary.files,
                "checkpoints": summary.checkpoints,
                "samples": summary.samples,
                "seed": seed if samples else None,
                "redacted": summary.redactions,
            },
        )
