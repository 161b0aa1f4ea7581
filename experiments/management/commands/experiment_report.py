"""Per-checkpoint figures, SRM and comparisons for one experiment (SPEC §10).

The output is meant to be shared with the model provider: it carries
aggregate figures per checkpoint only — no user ids, machine ids, IPs, subject
hashes, client request ids, keys or ciphertext.
"""

from __future__ import annotations

import csv
import json
import math
from typing import Any

from django.core.management.base import CommandError, CommandParser

from experiments.management.output import JsonCommand
from experiments.quality import ERROR_CATEGORIES, FINISH_REASONS
from experiments.reports.figures import UNCLASSIFIED, UNKNOWN_FINISH, CheckpointStats
from experiments.reports.filters import ReportFilters, ReportInputError, parse_moment
from experiments.reports.report import ExperimentReport, experiment_report
from experiments.reports.statistics import (
    METHOD_REFERENCE,
    SRM_THRESHOLD,
    Comparisons,
    MetricComparison,
)
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
    "tool_call_rate",
    "feedback_up",
    "feedback_down",
    "feedback_share_up",
    "feedback_ci95_low",
    "feedback_ci95_high",
]
#: The feedback columns of a CSV row; nested as ``feedback`` in the JSON.
FEEDBACK_COLUMNS = CSV_COLUMNS[-5:]
#: The per-checkpoint breakdowns, flattened for the CSV (one column per category).
ERROR_COLUMNS = [f"errors_{name}" for name in (*ERROR_CATEGORIES, UNCLASSIFIED)]
FINISH_COLUMNS = [f"finish_{name}" for name in (*FINISH_REASONS, UNKNOWN_FINISH)]
CSV_COLUMNS += [*ERROR_COLUMNS, *FINISH_COLUMNS]


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
        "tool_call_rate": checkpoint.tool_call_rate,
        "feedback_up": checkpoint.feedback_up,
        "feedback_down": checkpoint.feedback_down,
        "feedback_share_up": checkpoint.feedback_share_up,
        "feedback_ci95_low": ci[0] if (ci := checkpoint.feedback_ci95) else None,
        "feedback_ci95_high": ci[1] if ci else None,
    }


def feedback_json(checkpoint: CheckpointStats) -> dict:
    ci = checkpoint.feedback_ci95
    return {
        "up": checkpoint.feedback_up,
        "down": checkpoint.feedback_down,
        "share_up": checkpoint.feedback_share_up,
        "ci95": list(ci) if ci else None,
    }


def checkpoint_row(checkpoint: CheckpointStats) -> dict:
    """The CSV row: the record with the breakdowns flattened."""
    return {
        **checkpoint_record(checkpoint),
        **{
            f"errors_{name}": checkpoint.errors_by_kind.get(name, 0)
            for name in (*ERROR_CATEGORIES, UNCLASSIFIED)
        },
        **{f"finish_{name}": count for name, count in checkpoint.finish_reasons.items()},
    }


def checkpoint_json(checkpoint: CheckpointStats) -> dict:
    """The CSV row plus the breakdowns that do not flatten into one."""
    record = checkpoint_record(checkpoint)
    for name in FEEDBACK_COLUMNS:
        del record[name]
    return {
        **record,
        "status_classes": checkpoint.status_classes,
        "errors_by_kind": checkpoint.errors_by_kind,
        "feedback": feedback_json(checkpoint),
        "errors_by_raw_kind": checkpoint.errors_by_raw_kind,
        "finish_reasons": checkpoint.finish_reasons,
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
        **comparisons_record(report.comparisons),
    }


def _finite(value: float | None) -> float | None:
    """JSON has no infinity: an open side of an interval is null."""
    return None if value is None or math.isinf(value) else value


def _checkpoint_ref(checkpoint: CheckpointStats) -> dict:
    return {
        "slot": checkpoint.slot_label,
        "version_id": str(checkpoint.version_id),
        "label": checkpoint.label,
        "internal_id": checkpoint.internal_id,
    }


def comparison_record(row: MetricComparison) -> dict:
    return {
        "metric": row.metric.key,
        "label": row.metric.label,
        "unit": row.metric.unit,
        "control_version_id": str(row.control.version_id),
        "candidate_version_id": str(row.candidate.version_id),
        "candidate": _checkpoint_ref(row.candidate),
        "control_value": _finite(row.control_value),
        "candidate_value": _finite(row.candidate_value),
        "estimate": _finite(row.estimate),
        "ci": [_finite(row.ci[0]), _finite(row.ci[1])] if row.ci else None,
        "ci_alpha": row.level,
        "p_value": row.p_value,
        "adjusted_p_value": row.adjusted_p_value,
        "verdict": row.verdict,
        "lower_is_better": row.metric.lower_is_better,
        "method": row.metric.method,
        "note": row.note,
    }


def comparisons_record(comparisons: Comparisons) -> dict:
    control = comparisons.control
    return {
        "control": (
            {"slot": comparisons.control_slot_label, **_checkpoint_ref(control)}
            if control is not None
            else (
                {"slot": comparisons.control_slot_label, "version_id": None}
                if comparisons.control_slot_label
                else None
            )
        ),
        "comparison_method": {
            "name": METHOD_REFERENCE,
            "alpha": comparisons.alpha,
            "correction": "holm",
            "all_checkpoints": comparisons.all_checkpoints,
            "note": comparisons.reason,
        },
        "comparisons": [comparison_record(row) for row in comparisons.rows],
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
        "feedback up/down",
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
                    f"{_number(c.feedback_up)} / {_number(c.feedback_down)}",
                )
            )
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for index, row in enumerate(table):
        cells = zip(row, widths, strict=True)
        lines.append("  ".join(str(cell).ljust(width) for cell, width in cells))
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    lines += ["", "Quality signals (finish reasons: shares of successful answers):"]
    for c in report.checkpoints:
        counts = c.errors_by_kind
        errors = ", ".join(
            f"{label} {counts.get(name, 0):,}" for name, label in report.error_kind_columns
        )
        answered = c.successes
        finishes = ", ".join(
            f"{label} {_percent(c.finish_reasons.get(name, 0) / answered if answered else None)}"
            for name, label in report.finish_columns
        )
        lines += [
            f"  {c.slot_label}/{c.internal_id}:",
            f"    errors by kind: {errors}",
            f"    finish reasons: {finishes}",
            f"    tool-call rate {_percent(c.tool_call_rate)}; throughput p50/p95 "
            f"{_number(c.throughput_p50, 1)} / {_number(c.throughput_p95, 1)} tok/s",
        ]
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
    lines += ["", *_comparison_lines(report.comparisons)]
    return "\n".join(lines) + "\n"


def _difference(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "+inf" if value > 0 else "-inf"
    if unit == "rate":
        return f"{value * 100:+.2f} pp"
    return f"{value:+,.1f} {unit}"


def _comparison_lines(comparisons: Comparisons) -> list[str]:
    control = comparisons.control
    title = (
        f"Comparisons against the control {comparisons.control_slot_label}/"
        f"{control.internal_id} (candidate − control):"
        if control is not None
        else f"Comparisons against the control slot {comparisons.control_slot_label}:"
    )
    lines = [title]
    if not comparisons.rows:
        lines.append(f"  none: {comparisons.reason}")
        return lines
    for row in comparisons.rows:
        unit = row.metric.unit
        interval = (
            f"[{_difference(row.ci[0], unit)}, {_difference(row.ci[1], unit)}]"
            if row.ci
            else f"({row.note})"
        )
        adjusted = (
            f", Holm p = {row.adjusted_p_value:.3g}" if row.adjusted_p_value is not None else ""
        )
        direction = "lower is better" if row.metric.lower_is_better else "higher is better"
        lines.append(
            f"  {row.candidate.slot_label}/{row.candidate.internal_id}  {row.metric.label}: "
            f"{_difference(row.estimate, unit)} {interval}{adjusted} -> {row.verdict.upper()} "
            f"({direction})"
        )
    lines.append(f"  Method: {METHOD_REFERENCE}.")
    return lines


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
        parser.add_argument(
            "--all-checkpoints",
            action="store_true",
            help="Compare every checkpoint with requests (not only each slot's current one) "
            "with the control slot's current checkpoint.",
        )

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
        report = experiment_report(experiment, filters, all_checkpoints=options["all_checkpoints"])
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
                    {name: csv_safe(value) for name, value in checkpoint_row(checkpoint).items()}
                )
        else:
            self.stdout.write(render_table(report), ending="")
