"""Admin pages over the read side: stats, request browser, request detail, feedback join.

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
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import reverse
from django.utils import timezone

from experiments.models import (
    PROMPT_HASH_DELETED,
    PROMPT_HASH_FAILED,
    AllocationSubject,
    Experiment,
)
from experiments.prompts.store import get_prompt_store
from experiments.reports import charts
from experiments.reports.browser import browse_requests, request_detail
from experiments.reports.feedback import feedback_join
from experiments.reports.filters import (
    BrowserFilters,
    ReportFilters,
    ReportInputError,
    parse_moment,
)
from experiments.reports.report import experiment_report
from experiments.reports.statistics import SRM_THRESHOLD
from experiments.selectors import slot_histories

#: Prompts are user content: seeing an experiment's results does not imply reading them.
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
                "Feedback join",
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
    )
    try:
        window, filters = _window_filters(request.GET)
    except ReportInputError as exc:
        context["error"] = str(exc)
        return render(request, "admin/experiments/experiment/stats.html", context, status=400)
    report = experiment_report(experiment, filters)
    checkpoints = report.checkpoints
    context.update(
        window=window,
        report=report,
        colours=charts.checkpoint_colours(checkpoints),
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


def experiment_request_detail(
    request: HttpRequest, model_admin: ModelAdmin, experiment: Experiment, usage_id: uuid.UUID
) -> HttpResponse:
    row = request_detail(experiment, usage_id)
    if row is None:
        raise Http404("No such request in this experiment.")
    context = _context(
        request,
        model_admin,
        experiment,
        "Request",
        row=row,
        prompt=(
            inflate_prompt(row.request_body_sha256)
            if request.user.has_perm(PROMPT_PERMISSION)
            else None
        ),
        back=request.GET.get("back", ""),
    )
    return render(request, "admin/experiments/experiment/request_detail.html", context)


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


def experiment_feedback(
    request: HttpRequest, model_admin: ModelAdmin, experiment: Experiment
) -> HttpResponse:
    context = _context(
        request, model_admin, experiment, "Feedback join", pasted=request.POST.get("ids", "")
    )
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
