"""Admin pages over the read side: stats, request browser, request detail, feedback.

Thin views: figures come from ``experiments.reports``. ``ExperimentAdmin.get_urls``
registers them under the ``admin:`` namespace, wrapped in the admin site's
``admin_view`` (staff login) and the model admin's ``has_view_permission``, so a
read-only viewer role sees results without any routing permission. Each view takes
the request, the model admin and the experiment.
"""

from __future__ import annotations

import csv
import io
import json
import uuid
from dataclasses import dataclass
from datetime import timedelta

from django.contrib.admin import ModelAdmin
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import reverse
from django.utils import timezone

from experiments.feedback import FeedbackItem, check_feedback, record_feedback
from experiments.models import (
    PROMPT_HASH_DELETED,
    PROMPT_HASH_FAILED,
    AllocationSubject,
    Experiment,
    FeedbackSource,
)
from experiments.prompts.answers import read_answer
from experiments.prompts.store import get_prompt_store, is_sha256_hex
from experiments.reports import charts
from experiments.reports.browser import (
    COMPARE_LIMIT,
    answered_requests,
    browse_requests,
    has_answered_siblings,
    request_detail,
)
from experiments.reports.feedback import feedback_join
from experiments.reports.filters import (
    BrowserFilters,
    ReportFilters,
    ReportInputError,
    parse_moment,
)
from experiments.reports.report import experiment_report
from experiments.reports.statistics import SRM_THRESHOLD
from experiments.selectors import slot_histories, version_labels
from experiments.significance import TUNING_SAMPLE_SIZE

#: Prompts are user content: seeing an experiment's results does not imply reading them.
#: Captured answers are read under the same permission.
PROMPT_PERMISSION = "experiments.view_prompt"
WINDOWS = {
    "hour": ("Last hour", timedelta(hours=1)),
    "day": ("Last day", timedelta(days=1)),
    "week": ("Last week", timedelta(days=7)),
    "all": ("All time", None),
    "custom": ("Custom", None),
}
FEEDBACK_MAX_IDS = 5000
FEEDBACK_MAX_UPLOAD_BYTES = 2 * 1024 * 1024
#: Storing feedback is a write: Django's "add" permission of the Feedback model.
FEEDBACK_ADD_PERMISSION = "experiments.add_feedback"
FEEDBACK_REQUIRED_COLUMNS = ("client_request_id", "rating")
#: Problems listed on the page at most (all rows are checked; the rest are counted).
FEEDBACK_MAX_LISTED_PROBLEMS = 50


def _context(
    request: HttpRequest, model_admin: ModelAdmin, experiment: Experiment, title: str, **extra
) -> dict:
    return {
        **model_admin.admin_site.each_context(request),
        "opts": Experiment._meta,
        "experiment": experiment,
        "title": title,
        "subtitle": str(experiment),
        "subject_kinds": AllocationSubject.choices,
        "nav": [
            ("Stats", reverse("admin:experiments_experiment_stats", args=[experiment.pk])),
            ("Requests", reverse("admin:experiments_experiment_requests", args=[experiment.pk])),
            (
                "Feedback",
                reverse("admin:experiments_experiment_feedback", args=[experiment.pk]),
            ),
        ],
        **extra,
    }


# --- stats --------------------------------------------------------------------


def _window_filters(params) -> tuple[str, ReportFilters]:
    window = params.get("window") or "all"
    if window not in WINDOWS:
        raise ReportInputError(f"Unknown window {window!r}.")
    subject_kind = params.get("subject") or None
    # Whole minutes: the rollups' finest bucket.
    now = timezone.now().replace(second=0, microsecond=0)
    since = until = None
    if window == "custom":
        since = parse_moment(params["since"], name="since") if params.get("since") else None
        until = parse_moment(params["until"], name="until") if params.get("until") else None
    elif WINDOWS[window][1] is not None:
        since = now - WINDOWS[window][1]
    return window, ReportFilters(since=since, until=until, subject_kind=subject_kind)


def experiment_stats(
    request: HttpRequest, model_admin: ModelAdmin, experiment: Experiment
) -> HttpResponse:
    context = _context(
        request,
        model_admin,
        experiment,
        "Stats",
        windows=[(key, label) for key, (label, _) in WINDOWS.items()],
        params=request.GET,
        srm_threshold=SRM_THRESHOLD,
        tuning_sample_size=TUNING_SAMPLE_SIZE,
    )
    try:
        window, filters = _window_filters(request.GET)
    except ReportInputError as exc:
        context["error"] = str(exc)
        return render(request, "admin/experiments/experiment/stats.html", context, status=400)
    all_checkpoints = request.GET.get("all_checkpoints") in ("1", "on", "true")
    report = experiment_report(experiment, filters, all_checkpoints=all_checkpoints)
    toggled = request.GET.copy()
    toggled.pop("all_checkpoints", None)
    if not all_checkpoints:
        toggled["all_checkpoints"] = "1"
    checkpoints = report.checkpoints
    context.update(
        window=window,
        report=report,
        colours=charts.checkpoint_colours(checkpoints),
        all_checkpoints_toggle=f"?{toggled.urlencode()}",
        # Nothing to draw: the page says so instead of showing empty axes.
        empty=not report.total_requests,
    )
    if report.total_requests:
        context.update(
            requests_chart=charts.requests_over_time(report.timeseries, checkpoints),
            latency_chart=charts.latency_percentiles(checkpoints),
            share_chart=charts.observed_vs_configured_share(report.slots),
        )
    return render(request, "admin/experiments/experiment/stats.html", context)


# --- request browser ----------------------------------------------------------


def _uuid_param(params, name: str) -> uuid.UUID | None:
    raw = params.get(name)
    if not raw:
        return None
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise ReportInputError(f"Bad {name} filter.") from None


def experiment_requests(
    request: HttpRequest, model_admin: ModelAdmin, experiment: Experiment
) -> HttpResponse:
    slots = slot_histories(experiment)
    context = _context(
        request, model_admin, experiment, "Requests", slots=slots, params=request.GET
    )
    try:
        filters = BrowserFilters(
            slot=_uuid_param(request.GET, "slot"),
            checkpoint=_uuid_param(request.GET, "checkpoint"),
            subject_kind=request.GET.get("subject") or None,
            status=request.GET.get("status") or None,
            client_request_id=(request.GET.get("client_request_id") or "").strip() or None,
        )
        page = browse_requests(experiment, filters, cursor=request.GET.get("cursor") or None)
    except ReportInputError as exc:
        context["error"] = str(exc)
        return render(request, "admin/experiments/experiment/requests.html", context, status=400)
    query = request.GET.copy()
    query.pop("cursor", None)
    next_query = None
    if page.next_cursor:
        query["cursor"] = page.next_cursor
        next_query = query.urlencode()
        query.pop("cursor")
    context.update(
        page=page,
        next_query=next_query,
        first_query=query.urlencode(),
        is_first_page=not request.GET.get("cursor"),
    )
    return render(request, "admin/experiments/experiment/requests.html", context)


@dataclass
class InflatedPrompt:
    state: str  # ok | failed | deleted | missing | corrupt
    pretty_json: str = ""
    messages: list[tuple[str, str]] | None = None
    raw_text: str = ""


def _content_text(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, dict) and part.get("type"):
                parts.append(f"[{part['type']}]")
            else:
                parts.append(json.dumps(part, ensure_ascii=False))
        return "\n".join(parts)
    return json.dumps(content, ensure_ascii=False, indent=2)


def _readable_messages(body) -> list[tuple[str, str]]:
    """(role, text) pairs from chat completions, Responses or Anthropic Messages bodies."""
    if not isinstance(body, dict):
        return []
    messages = []
    for key in ("system", "instructions"):
        if body.get(key):
            messages.append(("system", _content_text(body[key])))
    turns = body.get("messages")
    if turns is None:
        turns = body.get("input")
    if isinstance(turns, str):
        turns = [{"role": "user", "content": turns}]
    for turn in turns if isinstance(turns, list) else []:
        if not isinstance(turn, dict):
            continue
        text = _content_text(turn.get("content"))
        if turn.get("tool_calls"):
            text += "\n" + json.dumps(turn["tool_calls"], ensure_ascii=False, indent=2)
        messages.append((str(turn.get("role") or turn.get("type") or "?"), text))
    return messages


def inflate_prompt(sha256: str) -> InflatedPrompt:
    if sha256 == PROMPT_HASH_FAILED:
        return InflatedPrompt("failed")
    if sha256 == PROMPT_HASH_DELETED:
        return InflatedPrompt("deleted")
    try:
        canonical = get_prompt_store().get(sha256)
    except KeyError:
        return InflatedPrompt("missing")
    except Exception:  # a blob that fails its hash check or an unreachable store
        return InflatedPrompt("corrupt")
    text = canonical.decode("utf-8", errors="replace")
    try:
        body = json.loads(text)
    except ValueError:
        # Truncated bodies are cut at a code point, not at a JSON boundary.
        return InflatedPrompt("ok", raw_text=text, messages=[])
    return InflatedPrompt(
        "ok",
        pretty_json=json.dumps(body, indent=2, ensure_ascii=False),
        messages=_readable_messages(body),
    )


@dataclass
class InflatedAnswer:
    state: str  # none | ok | failed | deleted | missing | corrupt
    text: str = ""
    tool_calls: list[dict] | None = None
    truncated: bool = False


def inflate_answer(sha256: str | None) -> InflatedAnswer:
    if sha256 is None:
        return InflatedAnswer("none")
    if sha256 == PROMPT_HASH_FAILED:
        return InflatedAnswer("failed")
    if sha256 == PROMPT_HASH_DELETED:
        return InflatedAnswer("deleted")
    try:
        document = read_answer(sha256)
    except KeyError as exc:
        # A KeyError naming only the blob key means "absent"; with a reason, it is corrupt.
        return InflatedAnswer("corrupt" if "(" in str(exc) else "missing")
    except Exception:  # an unreachable store
        return InflatedAnswer("corrupt")
    calls = []
    for call in document.get("tool_calls") or []:
        if isinstance(call, dict):
            calls.append(
                {
                    "name": str(call.get("name", "")),
                    "arguments": _pretty_arguments(str(call.get("arguments", ""))),
                }
            )
    return InflatedAnswer(
        "ok",
        text=str(document.get("text", "")),
        tool_calls=calls,
        truncated=bool(document.get("truncated")),
    )


def _pretty_arguments(arguments: str) -> str:
    try:
        return json.dumps(json.loads(arguments), indent=2, ensure_ascii=False)
    except (ValueError, RecursionError):
        return arguments


def experiment_request_detail(
    request: HttpRequest, model_admin: ModelAdmin, experiment: Experiment, usage_id: uuid.UUID
) -> HttpResponse:
    row = request_detail(experiment, usage_id)
    if row is None:
        raise Http404("No such request in this experiment.")
    may_read = request.user.has_perm(PROMPT_PERMISSION)
    compare_url = ""
    if may_read and has_answered_siblings(experiment, row):
        compare_url = reverse(
            "admin:experiments_experiment_compare",
            args=[experiment.pk, row.request_body_sha256],
        )
    context = _context(
        request,
        model_admin,
        experiment,
        "Request",
        row=row,
        prompt=inflate_prompt(row.request_body_sha256) if may_read else None,
        answer=inflate_answer(row.response_sha256) if may_read else None,
        compare_url=compare_url,
        back=request.GET.get("back", ""),
    )
    return render(request, "admin/experiments/experiment/request_detail.html", context)


# --- answer compare -------------------------------------------------------------


@dataclass
class ComparedAnswer:
    answer: InflatedAnswer
    requests: list  # RequestRow, newest first


@dataclass
class ComparedCheckpoint:
    version_id: uuid.UUID
    slot_label: str
    internal_id: str
    answers: list[ComparedAnswer]


def compare_checkpoints(rows) -> list[ComparedCheckpoint]:
    """Rows grouped by checkpoint (slot label, then internal id), identical answers once."""
    checkpoints: dict[uuid.UUID, ComparedCheckpoint] = {}
    by_answer: dict[tuple[uuid.UUID, str], ComparedAnswer] = {}
    loaded: dict[str, InflatedAnswer] = {}
    for row in rows:
        checkpoint = checkpoints.setdefault(
            row.version_id, ComparedCheckpoint(row.version_id, row.slot_label, row.internal_id, [])
        )
        key = (row.version_id, row.response_sha256)
        if key not in by_answer:
            if row.response_sha256 not in loaded:
                loaded[row.response_sha256] = inflate_answer(row.response_sha256)
            by_answer[key] = ComparedAnswer(loaded[row.response_sha256], [])
            checkpoint.answers.append(by_answer[key])
        by_answer[key].requests.append(row)
    return sorted(checkpoints.values(), key=lambda c: (c.slot_label, c.internal_id))


def experiment_compare(
    request: HttpRequest, model_admin: ModelAdmin, experiment: Experiment, prompt_sha256: str
) -> HttpResponse:
    if not is_sha256_hex(prompt_sha256):
        raise Http404("Not a prompt hash.")
    context = _context(
        request, model_admin, experiment, "Compare answers", prompt_sha256=prompt_sha256
    )
    if not request.user.has_perm(PROMPT_PERMISSION):
        context["error"] = (
            "Comparing answers needs the permission to read prompts and answers (“Can read "
            "the captured prompts of an experiment's requests”, experiments.view_prompt); ask "
            "an administrator for it."
        )
        return render(request, "admin/experiments/experiment/compare.html", context, status=403)
    rows, more = answered_requests(experiment, prompt_sha256)
    context.update(
        prompt=inflate_prompt(prompt_sha256) if rows else None,
        checkpoints=compare_checkpoints(rows),
        shown=len(rows),
        more=more,
        limit=COMPARE_LIMIT,
    )
    return render(request, "admin/experiments/experiment/compare.html", context)


# --- feedback join ------------------------------------------------------------


class FeedbackInputError(ValueError):
    pass


def _ids_from_csv(upload) -> list[str]:
    if upload.size > FEEDBACK_MAX_UPLOAD_BYTES:
        raise FeedbackInputError(
            f"The file is larger than {FEEDBACK_MAX_UPLOAD_BYTES // (1024 * 1024)} MiB."
        )
    try:
        text = upload.read().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise FeedbackInputError("The file is not UTF-8 text; upload a CSV file.") from None
    if "\x00" in text:
        raise FeedbackInputError("The file is not a CSV file (it contains binary data).")
    try:
        rows = [row for row in csv.reader(io.StringIO(text)) if any(c.strip() for c in row)]
    except csv.Error as exc:
        raise FeedbackInputError(f"The CSV file could not be read: {exc}.") from None
    if not rows:
        raise FeedbackInputError("The CSV file is empty.")
    header = [cell.strip().lower() for cell in rows[0]]
    if "client_request_id" in header:
        column = header.index("client_request_id")
        rows = rows[1:]
    else:
        column = 0
    return [row[column].strip() for row in rows if len(row) > column and row[column].strip()]


def _feedback_ids(request: HttpRequest) -> list[str]:
    upload = request.FILES.get("file")
    ids = _ids_from_csv(upload) if upload else []
    ids += [line.strip() for line in request.POST.get("ids", "").splitlines() if line.strip()]
    unique = list(dict.fromkeys(ids))
    if any("\x00" in client_request_id for client_request_id in unique):
        # PostgreSQL text cannot hold NUL, so no stored id can match it.
        raise FeedbackInputError(
            "A client request id contains a NUL character; nothing was looked up."
        )
    if not unique:
        raise FeedbackInputError("Paste at least one client request id or upload a CSV file.")
    if len(unique) > FEEDBACK_MAX_IDS:
        raise FeedbackInputError(f"At most {FEEDBACK_MAX_IDS:,} ids at a time.")
    return unique


class FeedbackUploadError(ValueError):
    """Problems with an uploaded feedback file, each safe to show, with line numbers."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


def _read_csv_text(upload) -> str:
    if upload.size > FEEDBACK_MAX_UPLOAD_BYTES:
        raise FeedbackUploadError(
            [f"The file is larger than {FEEDBACK_MAX_UPLOAD_BYTES // (1024 * 1024)} MiB."]
        )
    try:
        text = upload.read().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise FeedbackUploadError(["The file is not UTF-8 text; upload a CSV file."]) from None
    if "\x00" in text:
        raise FeedbackUploadError(["The file is not a CSV file (it contains binary data)."])
    return text


def _comment_with_extras(comment: str, extras: list[tuple[str, str]]) -> str:
    """The comment, then each extra column's non-empty value as ``name: value``."""
    lines = [f"{name}: {value}" for name, value in extras if value.strip()]
    return "\n".join([comment, *lines] if comment else lines)


def feedback_items_from_csv(upload) -> list[FeedbackItem]:
    """Every row of a feedback CSV (header ``client_request_id,rating[,comment][,…]``),
    checked; raises FeedbackUploadError naming every bad row by its line."""
    text = _read_csv_text(upload)
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    items: list[FeedbackItem] = []
    problems: list[str] = []
    line = 1
    try:
        for row in reader:
            row_line, line = line, reader.line_num + 1
            if not any(cell.strip() for cell in row):
                continue
            if header is None:
                header = [cell.strip().lower() for cell in row]
                missing = [c for c in FEEDBACK_REQUIRED_COLUMNS if c not in header]
                if missing:
                    raise FeedbackUploadError(
                        [
                            f"Line {row_line}: the header must name the columns "
                            "client_request_id and rating (and may name comment and any "
                            f"others); {' and '.join(missing)} is missing. Found: "
                            f"{', '.join(header) or 'nothing'}."
                        ]
                    )
                repeated = sorted({c for c in header if c and header.count(c) > 1})
                if repeated or "" in header:
                    raise FeedbackUploadError(
                        [
                            f"Line {row_line}: every header column needs a distinct name"
                            + (f" ({', '.join(repeated)} repeated)." if repeated else ".")
                        ]
                    )
                continue
            if len(row) > len(header):
                problems.append(
                    f"Line {row_line}: {len(row)} values but the header names {len(header)} "
                    "columns."
                )
                continue
            cells = dict(zip(header, [*row, *[""] * (len(header) - len(row))], strict=True))
            extras = [
                (name, cells[name])
                for name in header
                if name not in ("client_request_id", "rating", "comment")
            ]
            item, wrong = check_feedback(
                cells["client_request_id"],
                cells["rating"],
                _comment_with_extras(cells.get("comment", ""), extras),
            )
            problems += [f"Line {row_line}: {problem}" for problem in wrong]
            items.append(item)
    except csv.Error as exc:
        problem = f"Line {line}: the CSV file could not be read ({exc})."
        raise FeedbackUploadError([problem]) from None
    if header is None:
        raise FeedbackUploadError(["The CSV file is empty."])
    if problems:
        raise FeedbackUploadError(problems)
    if not items:
        raise FeedbackUploadError(["The CSV file has a header but no feedback rows."])
    if len(items) > FEEDBACK_MAX_IDS:
        raise FeedbackUploadError([f"At most {FEEDBACK_MAX_IDS:,} feedback rows at a time."])
    return items


@dataclass
class StoredFeedback:
    client_request_id: str
    rating: str
    comment: str
    #: "joined" (this experiment), "elsewhere" (another experiment's request), "pending"
    state: str
    slot_label: str = ""
    internal_id: str = ""


def _upload_feedback(request: HttpRequest, experiment: Experiment, context: dict) -> HttpResponse:
    if not request.user.has_perm(FEEDBACK_ADD_PERMISSION):
        raise PermissionDenied
    template = "admin/experiments/experiment/feedback.html"
    try:
        items = feedback_items_from_csv(request.FILES["feedback_csv"])
    except FeedbackUploadError as exc:
        listed = exc.problems[:FEEDBACK_MAX_LISTED_PROBLEMS]
        more = len(exc.problems) - len(listed)
        context.update(
            upload_problems=listed,
            upload_more_problems=more,
            error=(
                f"Nothing was stored: {len(exc.problems)} problem"
                f"{'s' if len(exc.problems) != 1 else ''} in the file. Fix "
                f"{'them' if len(exc.problems) != 1 else 'it'} and upload the file again."
            ),
        )
        return render(request, template, context, status=400)
    stored = record_feedback(items, source=FeedbackSource.CSV, submitted_by_id=request.user.pk)
    labels = version_labels(experiment)
    rows = []
    for row in stored:
        if row.variant_version_id in labels:
            identity = labels[row.variant_version_id]
            slot_label, internal_id = identity.label, identity.internal_id
            state = "joined"
        else:
            slot_label = internal_id = ""
            state = "elsewhere" if row.variant_version_id else "pending"
        rows.append(
            StoredFeedback(
                row.client_request_id, row.rating, row.comment, state, slot_label, internal_id
            )
        )
    context.update(
        stored=rows,
        stored_joined=sum(1 for r in rows if r.state == "joined"),
        stored_elsewhere=sum(1 for r in rows if r.state == "elsewhere"),
        stored_pending=sum(1 for r in rows if r.state == "pending"),
    )
    return render(request, template, context)


def experiment_feedback(
    request: HttpRequest, model_admin: ModelAdmin, experiment: Experiment
) -> HttpResponse:
    context = _context(
        request,
        model_admin,
        experiment,
        "Feedback",
        pasted=request.POST.get("ids", ""),
        can_upload=request.user.has_perm(FEEDBACK_ADD_PERMISSION),
    )
    if request.method == "POST" and "feedback_csv" in request.FILES:
        return _upload_feedback(request, experiment, context)
    if request.method == "POST":
        try:
            ids = _feedback_ids(request)
        except FeedbackInputError as exc:
            context["error"] = str(exc)
            return render(
                request, "admin/experiments/experiment/feedback.html", context, status=400
            )
        matches = feedback_join(experiment, ids)
        context.update(
            matches=matches,
            found=sum(1 for m in matches if m.rows),
            not_found=sum(1 for m in matches if not m.rows),
        )
    return render(request, "admin/experiments/experiment/feedback.html", context)
