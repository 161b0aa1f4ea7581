"""Per-checkpoint figures, SRM and comparisons for one experiment (SPEC §10).

The output is meant to be shared with the model provider: it carries
aggregate figures per checkpoint only — no user ids, machine ids, IPs, subject
hashes, client request ids, keys or ciphertext.
"""

from __future__ import annotations

import csv
import json
from typing import Any

from django.core.management.base import CommandError, CommandParser

from experiments.management.output import JsonCommand
from experiments.reports.figures import CheckpointStats
from experiments.reports.filters import ReportFilters, ReportInputError, parse_moment
from experiments.reports.report import ExperimentReport, experiment_report
from experiments.reports.statistics import SRM_THRESHOLD
from experiments.selectors import NotFound, find_experiment

CSV_COLUMNS = [
    "slot",
    "version_id",
    "version_number",
    "key_rotation",
    "key_rotated",
    "label",
    "internal_id",
    "effective_from",
    "effective_until",
    "requests",
    "distinct_subjects",
    "distinct_users",
    "messages",
    "errors",
    "error_rate",
    "ttfb_ms_p50",
    "ttfb_ms_p95",
    "total_ms_p50",
    "total_ms_p95",
    "total_ms_mean",
    "throughput_tok_s_p50",
    "throughput_tok_s_p95",
    "streamed",
    "input_tokens",
    "output_tokens",
]


#: A spreadsheet reads a cell starting with one of these as a formula (OWASP, "CSV injection").
FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(value: Any) -> Any:
    """Text that a spreadsheet would run as a formula, made inert with a leading quote.

    Labels and internal ids are typed by staff or partners; numbers are ours and stay numbers.
    """
    if isinstance(value, str) and value.startswith(FORMULA_TRIGGERS):
        return "'" + value
    return value


def _iso(moment) -> str | None:
    return moment.isoformat() if moment else None


def checkpoint_record(checkpoint: CheckpointStats) -> dict:
    return {
        "slot": checkpoint.slot_label,
        # The exact checkpoint (reports group by it) and the name people say for it.
        "version_id": str(checkpoint.version_id),
        "version_number": checkpoint.version_number,
        "key_rotation": checkpoint.key_rotation,
        "key_rotated": checkpoint.key_rotated,
        "label": checkpoint.label,
        "internal_id": checkpoint.internal_id,
        "effective_from": _iso(checkpoint.effective_from),
        "effective_until": _iso(checkpoint.effective_until) or "current",
        "requests": checkpoint.requests,
        "distinct_subjects": checkpoint.distinct_subjects,
        "distinct_users": checkpoint.distinct_users,
        "messages": checkpoint.distinct_messages,
        "errors": checkpoint.errors,
        "error_rate": checkpoint.error_rate,
        "ttfb_ms_p50": checkpoint.ttfb_p50,
        "ttfb_ms_p95": checkpoint.ttfb_p95,
        "total_ms_p50": checkpoint.total_p50,
        "total_ms_p95": checkpoint.total_p95,
        "total_ms_mean": checkpoint.total_mean,
        "throughput_tok_s_p50": checkpoint.throughput_p50,
        "throughput_tok_s_p95": checkpoint.throughput_p95,
        "streamed": checkpoint.streamed,
        "input_tokens": checkpoint.input_tokens,
        "output_tokens": checkpoint.output_tokens,
    }


def checkpoint_json(checkpoint: CheckpointStats) -> dict:
    """The CSV row plus the breakdowns that do not flatten into one."""
    return {
        **checkpoint_record(checkpoint),
        "status_classes": checkpoint.status_classes,
        "errors_by_kind": checkpoint.errors_by_kind,
    }


def report_record(report: ExperimentReport) -> dict:
    srm = report.srm
    return {
        "experiment": {
            "name": report.experiment.name,
            "public_model_id": report.experiment.public_model_id,
            "status": report.experiment.status,
        },
        "window": {
            "since": _iso(report.filters.since),
            "until": _iso(report.filters.until),
            "subject_kind": report.filters.subject_kind,
            "widened_to_whole_minutes": report.filters.widened,
        },
        "notes": report.notes,
        "generated_at": _iso(report.generated_at),
        "slots": [
            {
                "label": slot.label,
                "weight": slot.weight,
                "expected_share": slot.expected_share,
                "distinct_subjects": slot.distinct_subjects,
                "observed_share": slot.observed_share,
                "checkpoints": [checkpoint_json(c) for c in slot.checkpoints],
            }
            for slot in report.slots
        ],
        "srm": {
            "test": "chi-square goodness of fit, distinct subjects per slot vs weights",
            "observed": srm.observed,
            "expected": srm.expected,
            "chi_square": srm.chi_square,
            "degrees_of_freedom": srm.degrees_of_freedom,
            "p_value": srm.p_value,
            "mismatch": srm.mismatch,
            "threshold": SRM_THRESHOLD,
            "note": srm.reason,
        },
        "comparisons": [
            {
                "baseline": f"{c.baseline.slot_label}/{c.baseline.internal_id}",
                "candidate": f"{c.candidate.slot_label}/{c.candidate.internal_id}",
                "error_rate_difference": c.error_rate_difference,
                "error_rate_ci95_newcombe": list(c.error_rate_ci) if c.error_rate_ci else None,
                "ttfb_ms_p50_difference": c.ttfb_p50_difference,
                "total_ms_p50_difference": c.total_p50_difference,
                "total_ms_mean_difference": c.total_mean_difference,
                "total_ms_mean_ci95": list(c.total_mean_ci) if c.total_mean_ci else None,
            }
            for c in report.comparisons
        ],
    }


def _number(value, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _percent(value) -> str:
    return "-" if value is None else f"{value * 100:.2f}%"


def _signed_percent(value) -> str:
    return "-" if value is None else f"{value * 100:+.2f} pp"


def render_table(report: ExperimentReport) -> str:
    lines = [
        f"Experiment {report.experiment.name} ({report.experiment.public_model_id}), "
        f"status {report.experiment.status}",
        f"Window: since {_iso(report.filters.since) or 'the start'}, "
        f"until {_iso(report.filters.until) or 'now'}; "
        f"subjects: {report.filters.subject_kind or 'all kinds'}",
        "",
    ]
    header = (
        "slot",
        "checkpoint",
        "effective (UTC)",
        "requests",
        "subjects",
        "users",
        "messages",
        "errors",
        "ttfb p50/p95 ms",
        "total p50/p95 ms",
        "tokens in/out",
    )
    table = [header]
    for slot in report.slots:
        for c in slot.checkpoints:
            table.append(
                (
                    slot.label,
                    f"{c.label} ({c.internal_id})",
                    f"{c.effective_from:%Y-%m-%d %H:%M:%S} → "
                    + (
                        f"{c.effective_until:%Y-%m-%d %H:%M:%S}" if c.effective_until else "current"
                    ),
                    _number(c.requests),
                    _number(c.distinct_subjects),
                    _number(c.distinct_users),
                    _number(c.distinct_messages),
                    _percent(c.error_rate),
                    f"{_number(c.ttfb_p50)} / {_number(c.ttfb_p95)}",
                    f"{_number(c.total_p50)} / {_number(c.total_p95)}",
                    f"{_number(c.input_tokens)} / {_number(c.output_tokens)}",
                )
            )
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for index, row in enumerate(table):
        cells = zip(row, widths, strict=True)
        lines.append("  ".join(str(cell).ljust(width) for cell, width in cells))
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    lines += ["", *report.notes]
    srm = report.srm
    lines += ["", "Sample-ratio check (distinct subjects per slot vs weights, chi-square):"]
    for slot in report.slots:
        lines.append(
            f"  {slot.label}: {slot.distinct_subjects:,} observed "
            f"({_percent(slot.observed_share)}), configured {_percent(slot.expected_share)}"
        )
    if srm.p_value is None:
        lines.append(f"  not tested: {srm.reason}")
    else:
        lines.append(
            f"  chi-square {srm.chi_square:.3f}, {srm.degrees_of_freedom} df, p = {srm.p_value:.3g}"
        )
        if srm.mismatch:
            lines.append(
                f"  WARNING: SAMPLE RATIO MISMATCH (p < {SRM_THRESHOLD}): the split does not "
                "match the weights; figures may be biased."
            )
    lines += ["", "Comparisons (candidate − baseline; 95% CI, Newcombe for error rates):"]
    if not report.comparisons:
        lines.append("  fewer than two checkpoints have requests")
    for c in report.comparisons:
        ci = (
            f"[{_signed_percent(c.error_rate_ci[0])}, {_signed_percent(c.error_rate_ci[1])}]"
            if c.error_rate_ci
            else ""
        )
        mean_ci = (
            f" [{c.total_mean_ci[0]:+.0f}, {c.total_mean_ci[1]:+.0f}]" if c.total_mean_ci else ""
        )
        lines.append(
            f"  {c.candidate.slot_label}/{c.candidate.internal_id} vs "
            f"{c.baseline.slot_label}/{c.baseline.internal_id}: "
            f"error rate {_signed_percent(c.error_rate_difference)} {ci}; "
            f"total p50 {_number(c.total_p50_difference)} ms, "
            f"mean {_number(c.total_mean_difference)} ms{mean_ci}"
        )
    return "\n".join(lines) + "\n"


class Command(JsonCommand):
    help = (
        "Print per-checkpoint figures, the sample-ratio check and comparisons for an "
        "experiment. Safe to share with the provider: no user, machine, IP or request ids."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "experiment_id",
            metavar="EXPERIMENT",
            help="The experiment: its id, a unique prefix of it, or its public model id.",
        )
        parser.add_argument(
            "-f",
            "--format",
            default="table",
            help="table (default), json (indented, to share as a file), csv",
        )
        parser.add_argument("--since", help="ISO 8601 date or time (UTC when no offset).")
        parser.add_argument("--until", help="ISO 8601 date or time, exclusive.")
        parser.add_argument("--subject-kind", help="user, machine or ip")

    def handle(self, *args, **options) -> None:
        fmt = options["format"]
        if fmt not in ("table", "json", "csv"):
            raise CommandError(f"Unknown format {fmt!r}; use table, json or csv.")
        try:
            experiment = find_experiment(options["experiment_id"])
        except NotFound as exc:
            raise CommandError(str(exc)) from None
        try:
            filters = ReportFilters(
                since=parse_moment(options["since"], name="--since") if options["since"] else None,
                until=parse_moment(options["until"], name="--until") if options["until"] else None,
                subject_kind=options["subject_kind"],
            )
        except ReportInputError as exc:
            raise CommandError(str(exc)) from None
        report = experiment_report(experiment, filters)
        if self.as_json:
            self.emit("", {"report": report_record(report)})
        elif fmt == "json":
            self.stdout.write(json.dumps(report_record(report), indent=2))
        elif fmt == "csv":
            # RFC 4180 line ends: the writer then also quotes a cell holding a bare CR,
            # which with "\n" alone it leaves bare and so breaks the row.
            writer = csv.DictWriter(self.stdout, fieldnames=CSV_COLUMNS, lineterminator="\r\n")
            writer.writeheader()
            for checkpoint in report.checkpoints:
                writer.writerow(
                    {name: csv_safe(value) for name, value in checkpoint_record(checkpoint).items()}
                )
        else:
            self.stdout.write(render_table(report), ending="")
