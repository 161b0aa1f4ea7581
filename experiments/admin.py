"""The Django admin: a thin editing surface over ``experiments.services``.

No lifecycle rule lives here. What is shown and editable follows the model's
predicates (``structure_editable``, ``can_activate``, …), which the services enforce
too; every write is a call into ``services``. Inputs are checked with the services'
own rules while the forms validate, so every error of a submit shows at once; the
valid change is then applied through the services in ``save_model`` and
``save_related``, inside the admin's transaction. The services write the admin
history (LogEntry) themselves, so the ModelAdmin's own logging is switched off.

Pages of our own (lifecycle transitions, hot-swap, key rotation, connection tests)
are registered in ``ExperimentAdmin.get_urls`` and wrapped by ``admin_view``.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import wraps
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.actions import delete_selected as django_delete_selected
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.contrib.admin.utils import unquote
from django.contrib.admin.views.main import ChangeList
from django.core.exceptions import PermissionDenied
from django.db.models import Count
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.decorators import method_decorator
from django.utils.html import format_html, format_html_join
from django.views.decorators.debug import sensitive_post_parameters

from experiments import report_views, selectors, services
from experiments.forms import (
    ExperimentForm,
    HotSwapForm,
    RotateKeyForm,
    VariantForm,
    VariantFormSet,
    upstream_initial,
)
from experiments.models import (
    CheckpointCheck,
    Experiment,
    ExperimentStatus,
    Variant,
    VariantVersion,
    checkpoint_label,
)
from experiments.services import ExperimentError

TRANSITION_PERMISSION = "experiments.transition_experiment"
HOTSWAP_PERMISSION = "experiments.hotswap_variant"
ROTATE_KEY_PERMISSION = "experiments.rotate_key_variant"

STATUS_COLOURS = {
    ExperimentStatus.DRAFT: "#6b7280",
    ExperimentStatus.ACTIVE: "#15803d",
    ExperimentStatus.PAUSED: "#b45309",
    ExperimentStatus.COMPLETED: "#1d4ed8",
}

#: Transitions whose consequences staff confirm on a page of their own first.
CONFIRMED_TRANSITIONS = ("complete", "archive")


def status_badge_html(experiment: Experiment) -> str:
    return format_html(
        '<span class="mx-status mx-status-{}" style="background:{};color:#fff;'
        'padding:2px 8px;border-radius:10px;font-size:11px;font-weight:600;">{}</span>',
        experiment.status,
        STATUS_COLOURS.get(experiment.status, "#6b7280"),
        experiment.get_status_display(),
    )


def transition_label(experiment: Experiment, action: str) -> str:
    if action == "activate" and experiment.status == ExperimentStatus.PAUSED:
        return "Resume"
    return action.capitalize()


def transition_consequences(experiment: Experiment, action: str) -> list[str]:
    """What a transition does, in the words of its confirmation page."""
    public_id = experiment.public_model_id
    if action == "complete":
        return [
            f"{public_id!r} stops routing to this experiment at once: clients calling it get "
            "404 model_not_found, or the default upstream when one is configured.",
            "Completing is final: the experiment cannot be resumed, and its slots and "
            "checkpoints can no longer change.",
            "Its requests, stats and history stay.",
        ]
    if action == "archive":
        lines = ["It leaves the default experiment list; the “archived” filter shows it."]
        if experiment.status == ExperimentStatus.PAUSED:
            lines.append(
                f"It stays paused: {public_id!r} does not route (clients get 404 "
                "model_not_found) and it cannot be resumed until it is unarchived."
            )
        elif experiment.status == ExperimentStatus.DRAFT:
            lines.append("It cannot be activated until it is unarchived.")
        return lines
    if action == "activate":
        return [f"{public_id!r} starts routing to this experiment's checkpoints."]
    if action == "pause":
        return [
            f"{public_id!r} stops routing: clients get 404 model_not_found until it is "
            "resumed; users keep their slot."
        ]
    return ["It shows in the default experiment list again."]


class ArchivedFilter(admin.SimpleListFilter):
    """Archived experiments are hidden unless asked for (SPEC §3: archive hides)."""

    title = "archived"
    parameter_name = "archived"

    def lookups(self, request, model_admin):
        return (("yes", "Yes"), ("all", "All"))

    def choices(self, changelist):
        for value, label in ((None, "No"), ("yes", "Yes"), ("all", "All")):
            yield {
                "selected": self.value() == value,
                "query_string": changelist.get_query_string(
                    {self.parameter_name: value} if value else {},
                    [] if value else [self.parameter_name],
                ),
                "display": label,
            }

    def queryset(self, request, queryset):
        if self.value() == "all":
            return queryset
        return queryset.filter(is_archived=self.value() == "yes")


# --- variants inline ------------------------------------------------------------------


def _checkpoint_operations(request: HttpRequest, experiment: Experiment | None) -> set[str]:
    """The per-slot checkpoint pages this user may open for this experiment now."""
    if experiment is None or not experiment.checkpoints_editable:
        return set()
    allowed = set()
    if request.user.has_perm(HOTSWAP_PERMISSION):
        allowed.add("hot_swap")
    if request.user.has_perm(ROTATE_KEY_PERMISSION):
        allowed.add("rotate_key")
    return allowed


def may_test_checkpoints(request: HttpRequest) -> bool:
    """A test sends one request with the partner key; anyone who may load or rotate
    checkpoints, or activate them, may run it."""
    return any(
        request.user.has_perm(permission)
        for permission in (HOTSWAP_PERMISSION, ROTATE_KEY_PERMISSION, TRANSITION_PERMISSION)
    )


def check_html(check: CheckpointCheck | None) -> str:
    if check is None:
        return format_html('<span class="mx-check mx-check-none">{}</span>', "not tested")
    return format_html(
        '<span class="mx-check mx-check-{}" title="{}">{} {}</span>',
        "ok" if check.ok else "failed",
        check.checked_at.strftime("%Y-%m-%d %H:%M:%S UTC"),
        "✓" if check.ok else "✗",
        check.summary,
    )


class VariantInline(admin.TabularInline):
    model = Variant
    form = VariantForm
    formset = VariantFormSet
    fields = ("label", "weight", "share", "checkpoints", "checkpoint_links")
    readonly_fields = ("share", "checkpoints", "checkpoint_links")
    can_delete = True
    show_change_link = False
    verbose_name = "variant (slot)"
    verbose_name_plural = "variants (slots), in the order they were created"

    # The inline is part of the experiment: its permissions are the experiment's.
    def _experiment_perm(self, request: HttpRequest, action: str) -> bool:
        return request.user.has_perm(f"experiments.{action}_experiment")

    def has_view_permission(self, request, obj=None) -> bool:
        return self._experiment_perm(request, "view") or self._experiment_perm(request, "change")

    def has_add_permission(self, request, obj=None) -> bool:
        if obj is None:
            return self._experiment_perm(request, "add")
        return self._experiment_perm(request, "change") and obj.structure_editable

    def has_change_permission(self, request, obj=None) -> bool:
        if obj is None:
            return self._experiment_perm(request, "add")
        return self._experiment_perm(request, "change") and obj.labels_editable

    def has_delete_permission(self, request, obj=None) -> bool:
        return self.has_add_permission(request, obj)

    def get_extra(self, request, obj=None, **kwargs) -> int:
        # Rows for the two slots an experiment needs at least.
        if obj is None:
            return 2
        return max(0, 2 - obj.variants.count()) if obj.structure_editable else 0

    def get_readonly_fields(self, request, obj=None):
        fields = list(super().get_readonly_fields(request, obj))
        if obj is not None and not obj.structure_editable:
            fields.insert(0, "weight")  # moves bucket boundaries: draft only (SPEC §3)
        return fields

    def get_queryset(self, request):
        return (
            selectors.with_version_history(super().get_queryset(request))
            # Creation order for people; users are bucketed in id order, never shown.
            .order_by("created_at", "id")
        )

    def get_formset(self, request, obj=None, **kwargs):
        # Inline instances are made per request (ModelAdmin.get_inline_instances), so the
        # user's checkpoint operations for this experiment can live on this one.
        self.checkpoint_operations = _checkpoint_operations(request, obj)
        return super().get_formset(request, obj, **kwargs)

    @admin.display(description="share")
    def share(self, variant: Variant) -> str:
        total = getattr(variant, "total_weight", None)
        if variant._state.adding or not total:
            return "—"
        return f"{variant.weight / total * 100:.1f}%"

    @admin.display(description="checkpoint history (newest first)")
    def checkpoints(self, variant: Variant) -> str:
        if variant._state.adding:
            return "—"
        versions = list(variant.versions.all())
        if not versions:
            return format_html('<span class="mx-no-checkpoint">{}</span>', "No checkpoint yet")
        current_id = getattr(variant, "current_version_id", None)
        rows = format_html_join(
            "",
            "<tr{}><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>"
            "</tr>",
            (
                (
                    format_html(' class="mx-current-version" title="{}"', "current checkpoint")
                    if version.pk == current_id
                    else "",
                    checkpoint_label(variant.label, version.version_number, version.key_rotation),
                    version.internal_id,
                    version.base_url_host,
                    version.effective_at.strftime("%Y-%m-%d %H:%M:%S UTC"),
                    version.created_by.get_username() if version.created_by else "—",
                    # Every version is stored with a key (new or carried over); the key
                    # itself is never read here (the column is deferred).
                    f"Key configured (key {version.key_fingerprint or 'unknown'})",
                    check_html(version.recent_checks[0] if version.recent_checks else None),
                )
                for version in versions
            ),
        )
        return format_html(
            '<table class="mx-versions"><thead><tr><th>version</th><th>internal id</th>'
            "<th>base URL host</th>"
            "<th>effective</th><th>who</th><th>key</th><th>last connection test</th></tr>"
            "</thead><tbody>{}</tbody></table>",
            rows,
        )

    @admin.display(description="checkpoint")
    def checkpoint_links(self, variant: Variant) -> str:
        if variant._state.adding:
            return "Save first, then load a checkpoint."
        operations = getattr(self, "checkpoint_operations", set())
        links = []
        if "hot_swap" in operations:
            url = reverse(
                "admin:experiments_experiment_hot_swap", args=[variant.experiment_id, variant.pk]
            )
            links.append((url, "mx-hot-swap-link", "Hot-swap checkpoint"))
        if "rotate_key" in operations and getattr(variant, "current_version_id", None):
            url = reverse(
                "admin:experiments_experiment_rotate_key", args=[variant.experiment_id, variant.pk]
            )
            links.append((url, "mx-rotate-key-link", "Rotate key"))
        if not links:
            return "—"
        return format_html_join(" | ", '<a href="{}" class="{}">{}</a>', links)


# --- experiments ----------------------------------------------------------------------

TRANSITION_RESULTS = {
    "activate": ("Activated", "already active"),
    "pause": ("Paused", "already paused"),
    "complete": ("Completed", "already completed"),
    "archive": ("Archived", "already archived"),
    "unarchive": ("Unarchived", "not archived"),
}


class ExperimentChangeList(ChangeList):
    """The changelist, with each listed experiment's traffic of the last 24 hours read in
    one aggregate query for the whole page (not one per row)."""

    def get_results(self, request: HttpRequest) -> None:
        super().get_results(request)
        traffic = selectors.recent_traffic([experiment.pk for experiment in self.result_list])
        for experiment in self.result_list:
            experiment.recent_traffic = traffic.get(experiment.pk, selectors.Traffic())


@admin.register(Experiment)
class ExperimentAdmin(admin.ModelAdmin):
    form = ExperimentForm
    inlines = [VariantInline]
    list_display = (
        "name",
        "public_model_id",
        "status_badge",
        "variant_count",
        "requests_last_day",
        "error_rate_last_day",
        "stats_link",
        "started_at",
        "ended_at",
        "is_archived",
    )
    list_display_links = ("name",)
    list_filter = (ArchivedFilter, "status")
    search_fields = ("name", "public_model_id")
    ordering = ("-created_at",)
    actions = ["activate", "pause", "complete", "archive", "unarchive", "delete_selected"]
    lifecycle_fields = (
        "status_badge",
        "is_archived",
        "started_at",
        "ended_at",
        "created_by",
        "created_at",
        "updated_at",
    )

    def get_fieldsets(self, request, obj=None):
        fields = ("name", "public_model_id", "description")
        fieldsets = [
            (None, {"fields": fields if obj is None else (*fields, "control")}),
            ("Response capture", {"fields": ("response_capture_rate",)}),
        ]
        if obj is not None:
            fieldsets.append(("Lifecycle", {"fields": self.lifecycle_fields}))
        return fieldsets

    def get_readonly_fields(self, request, obj=None):
        fields = list(self.lifecycle_fields)
        if obj is not None and not obj.structure_editable:
            fields.append("public_model_id")  # routing identity: only in draft (SPEC §3)
        if obj is not None and not obj.labels_editable:
            fields.append("control")  # a completed experiment's comparisons stay as they were
        return fields

    def get_queryset(self, request):
        return selectors.with_variant_counts(super().get_queryset(request))

    def get_changelist(self, request, **kwargs):
        return ExperimentChangeList

    # --- columns --------------------------------------------------------------------

    @admin.display(description="status", ordering="status")
    def status_badge(self, experiment: Experiment) -> str:
        return status_badge_html(experiment)

    @admin.display(description="control slot")
    def control(self, experiment: Experiment) -> str:
        """The control, where the form field is read-only (completed, or view only)."""
        slot = selectors.control_slot(experiment)
        return slot.label if slot else "—"

    @admin.display(description="variants", ordering="variant_count")
    def variant_count(self, experiment: Experiment) -> int:
        return experiment.variant_count

    @admin.display(description="requests (24 h)")
    def requests_last_day(self, experiment: Experiment) -> int:
        return experiment.recent_traffic.requests

    @admin.display(description="errors (24 h)")
    def error_rate_last_day(self, experiment: Experiment) -> str:
        rate = experiment.recent_traffic.error_rate
        return "—" if rate is None else f"{rate * 100:.1f}%"

    @admin.display(description="stats")
    def stats_link(self, experiment: Experiment) -> str:
        url = reverse("admin:experiments_experiment_stats", args=[experiment.pk])
        return format_html('<a href="{}" class="mx-stats-link">Stats</a>', url)

    # --- permissions ----------------------------------------------------------------

    def has_transition_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm(TRANSITION_PERMISSION)

    def has_delete_permission(self, request, obj=None) -> bool:
        allowed = super().has_delete_permission(request, obj)
        return allowed and (obj is None or obj.deletable)

    # --- the change page: the control room ----------------------------------------------

    def change_view(self, request, object_id, form_url="", extra_context=None):
        experiment = self.get_object(request, unquote(object_id))
        if experiment is not None:
            extra_context = {**(extra_context or {}), **self._control_room(request, experiment)}
        return super().change_view(request, object_id, form_url, extra_context)

    def _control_room(self, request: HttpRequest, experiment: Experiment) -> dict[str, Any]:
        transitions = []
        if self.has_transition_permission(request):
            transitions = [
                {
                    "name": action,
                    "label": transition_label(experiment, action),
                    "url": reverse(
                        "admin:experiments_experiment_transition", args=[experiment.pk, action]
                    ),
                    "confirm": action in CONFIRMED_TRANSITIONS,
                }
                for action in experiment.available_transitions()
            ]
        checklist = []
        if experiment.can_activate:
            slots = {variant.label: variant.pk for variant in experiment.variants.all()}
            may_test = may_test_checkpoints(request)
            for item in services.activation_checklist(experiment):
                slot = item.key.partition("test:")[2]
                test_url = ""
                if slot and may_test:
                    test_url = reverse(
                        "admin:experiments_experiment_test_connection",
                        args=[experiment.pk, slots[slot]],
                    )
                checklist.append({"item": item, "test_url": test_url})
        return {
            "key_warnings": services.key_warnings(experiment),
            "transitions": transitions,
            "checklist": checklist,
            "status_badge": status_badge_html(experiment),
        }

    # --- saving through the services ------------------------------------------------

    def changeform_view(self, request, object_id=None, form_url="", extra_context=None):
        try:
            return super().changeform_view(request, object_id, form_url, extra_context)
        except ExperimentError as refused:
            # Every input was checked while validating, so only a change made by someone
            # else since the page loaded gets here; the save's transaction rolled back.
            self.message_user(request, f"Nothing was saved: {refused.message}", messages.ERROR)
            return HttpResponseRedirect(request.get_full_path())

    def save_form(self, request, form, change):
        return form.instance  # written by save_model through the services

    def save_model(self, request, obj, form, change):
        if change:
            changes = {
                field: form.cleaned_data[field]
                for field in ("name", "description", "public_model_id", "response_capture_rate")
                if field in form.changed_data
            }
            if changes:
                services.update_experiment(experiment=obj, by=request.user, **changes)
            if "control" in form.changed_data and form.cleaned_data.get("control"):
                services.set_control(variant=form.cleaned_data["control"], by=request.user)
            return
        created = services.create_experiment(
            public_model_id=form.cleaned_data["public_model_id"],
            name=form.cleaned_data["name"],
            description=form.cleaned_data.get("description", ""),
            response_capture_rate=form.cleaned_data.get("response_capture_rate") or 0,
            by=request.user,
        )
        # The admin redirects to the form's instance: make it the created row.
        for field in Experiment._meta.concrete_fields:
            setattr(obj, field.attname, getattr(created, field.attname))
        obj._state.adding, obj._state.db = False, created._state.db

    def save_related(self, request, form, formsets, change):
        for formset in formsets:  # the variants inline is the only one
            self._save_variants(request, form.instance, formset)

    @staticmethod
    def _save_variants(request, experiment: Experiment, formset: VariantFormSet) -> None:
        deleted = [form for form in formset.deleted_forms if form in formset.initial_forms]
        # Removals first, so a freed label can be reused in the same save.
        for form in deleted:
            services.remove_variant(variant=form.instance.pk, by=request.user)
        for form in formset.initial_forms:
            if form in deleted:
                continue
            if "label" in form.changed_data:
                services.rename_variant(
                    variant=form.instance.pk, label=form.cleaned_data["label"], by=request.user
                )
            if "weight" in form.changed_data:
                services.set_variant_weight(
                    variant=form.instance.pk, weight=form.cleaned_data["weight"], by=request.user
                )
        for form in formset.extra_forms:
            if form.has_changed() and not form.cleaned_data.get("DELETE"):
                services.add_variant(
                    experiment=experiment,
                    label=form.cleaned_data["label"],
                    weight=form.cleaned_data["weight"],
                    by=request.user,
                )

    def delete_model(self, request, obj):
        try:
            services.delete_experiment(experiment=obj, by=request.user)
        except ExperimentError as error:
            raise PermissionDenied(error.message) from None

    # The services write the history (who and when) themselves.
    def construct_change_message(self, request, form, formsets, add=False):
        return ""

    def log_addition(self, request, obj, message):
        return None

    def log_change(self, request, obj, message):
        return None

    def log_deletions(self, request, queryset):
        return None

    def get_deleted_objects(self, objs, request):
        """Summarise what goes with a draft without loading checkpoint rows (and ciphertext)."""
        summary: list[Any] = []
        variant_count = version_count = 0
        for experiment in objs:
            variants = list(
                Variant.objects.filter(experiment=experiment).annotate(
                    version_total=Count("versions")
                )
            )
            summary.append(f"Experiment: {experiment}")
            summary.append(
                [f"Variant: {v.label} ({v.version_total} checkpoint versions)" for v in variants]
            )
            variant_count += len(variants)
            version_count += sum(v.version_total for v in variants)
        model_count = {
            "experiments": len(objs),
            "variants": variant_count,
            "checkpoint versions": version_count,
        }
        perms_needed = set() if self.has_delete_permission(request) else {"experiment"}
        return summary, model_count, perms_needed, []

    # --- transitions: buttons on the change page, and the changelist's actions --------------

    def changelist_view(self, request, extra_context=None):
        if any("\x00" in value for values in request.GET.lists() for value in values[1]):
            # PostgreSQL text cannot hold NUL: filtering by it would be a server error.
            self.message_user(
                request, "A filter contained a NUL character; filters were reset.", messages.ERROR
            )
            return HttpResponseRedirect(reverse("admin:experiments_experiment_changelist"))
        chosen = request.POST.get("action") if request.method == "POST" else None
        if chosen and chosen not in self.get_actions(request):
            # A viewer posting an action is refused outright, not silently ignored.
            raise PermissionDenied
        return super().changelist_view(request, extra_context)

    def _run_transition(self, request: HttpRequest, experiments: Iterable[Experiment], name: str):
        service = services.TRANSITIONS[name]
        done, already = TRANSITION_RESULTS[name]
        for experiment in experiments:
            before = _lifecycle_state(experiment)
            try:
                after = service(experiment=experiment, by=request.user)
            except ExperimentError as error:
                self.message_user(request, f"{experiment.name}: {error.message}", messages.ERROR)
                continue
            if _lifecycle_state(after) == before:
                self.message_user(
                    request, f"{experiment.name}: {already}; nothing changed.", messages.INFO
                )
            else:
                self.message_user(
                    request,
                    f"{experiment.name}: {done} ({before} → {_lifecycle_state(after)}).",
                    messages.SUCCESS,
                )

    def _transition_action(self, request: HttpRequest, queryset, name: str):
        experiments = list(queryset.order_by("name", "pk"))
        confirm = name in CONFIRMED_TRANSITIONS or (
            name == "activate"
            and any(e.can_activate and services.activation_warnings(e) for e in experiments)
        )
        if confirm and request.POST.get("post") != "yes":
            hidden = [("action", name), ("post", "yes")] + [
                (ACTION_CHECKBOX_NAME, str(e.pk)) for e in experiments
            ]
            return self._confirmation_page(
                request,
                experiments,
                name,
                form_url=request.get_full_path(),
                hidden=hidden,
                cancel_url=request.get_full_path(),
            )
        self._run_transition(request, experiments, name)
        return None

    @admin.action(description="Activate or resume selected experiments", permissions=["transition"])
    def activate(self, request, queryset):
        return self._transition_action(request, queryset, "activate")

    @admin.action(description="Pause selected experiments", permissions=["transition"])
    def pause(self, request, queryset):
        return self._transition_action(request, queryset, "pause")

    @admin.action(description="Complete selected experiments…", permissions=["transition"])
    def complete(self, request, queryset):
        return self._transition_action(request, queryset, "complete")

    @admin.action(description="Archive selected experiments…", permissions=["transition"])
    def archive(self, request, queryset):
        return self._transition_action(request, queryset, "archive")

    @admin.action(description="Unarchive selected experiments", permissions=["transition"])
    def unarchive(self, request, queryset):
        return self._transition_action(request, queryset, "unarchive")

    @admin.action(description="Delete selected draft experiments", permissions=["delete"])
    def delete_selected(self, request, queryset):
        experiments = list(queryset.order_by("name", "pk"))
        if request.POST.get("post") != "yes":
            refused = [e for e in experiments if not self.has_delete_permission(request, e)]
            for experiment in refused:
                self.message_user(
                    request,
                    f"{experiment.name}: Cannot delete: experiment is {experiment.status}. "
                    "Only draft experiments can be deleted.",
                    messages.ERROR,
                )
            if refused:
                return None
            return django_delete_selected(self, request, queryset)  # confirmation page
        for experiment in experiments:
            name = experiment.name
            try:
                services.delete_experiment(experiment=experiment, by=request.user)
            except ExperimentError as error:
                self.message_user(request, f"{name}: {error.message}", messages.ERROR)
            else:
                self.message_user(request, f"{name}: deleted.", messages.SUCCESS)
        return None

    def transition_view(self, request: HttpRequest, object_id: str, action: str) -> HttpResponse:
        """A lifecycle button of the change page; confirms first when it must."""
        if action not in services.TRANSITIONS:
            raise Http404
        experiment = self.get_object(request, unquote(object_id))
        if experiment is None:
            raise Http404
        if not (
            self.has_transition_permission(request)
            and self.has_view_or_change_permission(request, experiment)
        ):
            raise PermissionDenied
        change_url = reverse("admin:experiments_experiment_change", args=[experiment.pk])
        warned = action == "activate" and experiment.can_activate
        needs_confirmation = action in CONFIRMED_TRANSITIONS or (
            warned and bool(services.activation_warnings(experiment))
        )
        confirmed = request.POST.get("confirmed") == "yes"
        if request.method == "POST" and (confirmed or not needs_confirmation):
            self._run_transition(request, [experiment], action)
            return HttpResponseRedirect(change_url)
        return self._confirmation_page(
            request,
            [experiment],
            action,
            form_url=request.path,
            hidden=[("confirmed", "yes")],
            cancel_url=change_url,
        )

    def _confirmation_page(
        self,
        request: HttpRequest,
        experiments: list[Experiment],
        action: str,
        *,
        form_url: str,
        hidden: list[tuple[str, str]],
        cancel_url: str,
    ) -> TemplateResponse:
        verb = transition_label(experiments[0], action) if len(experiments) == 1 else action
        rows = [
            {
                "experiment": experiment,
                "status_badge": status_badge_html(experiment),
                "consequences": transition_consequences(experiment, action),
                "warnings": services.activation_warnings(experiment)
                if action == "activate" and experiment.can_activate
                else [],
            }
            for experiment in experiments
        ]
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": f"{verb.capitalize()} {_names(experiments)}?",
            "action": action,
            "verb": verb.capitalize(),
            "rows": rows,
            "warned": any(row["warnings"] for row in rows),
            "form_url": form_url,
            "hidden": hidden,
            "cancel_url": cancel_url,
        }
        return TemplateResponse(
            request, "admin/experiments/experiment/transition_confirm.html", context
        )

    # --- pages of our own --------------------------------------------------------------

    def get_urls(self):
        reports = [
            ("stats/", report_views.experiment_stats, "stats"),
            ("requests/", report_views.experiment_requests, "requests"),
            ("requests/<uuid:usage_id>/", report_views.experiment_request_detail, "request_detail"),
            ("compare/<str:prompt_sha256>/", report_views.experiment_compare, "compare"),
            ("feedback/", report_views.experiment_feedback, "feedback"),
        ]
        own = [
            *(
                path(
                    f"<path:object_id>/{route}",
                    self.admin_site.admin_view(self._report_page(view)),
                    name=f"experiments_experiment_{name}",
                )
                for route, view, name in reports
            ),
            path(
                "<path:object_id>/transition/<str:action>/",
                self.admin_site.admin_view(self.transition_view),
                name="experiments_experiment_transition",
            ),
            path(
                "<path:object_id>/variants/<uuid:variant_id>/hot-swap/",
                self.admin_site.admin_view(self.hot_swap_view),
                name="experiments_experiment_hot_swap",
            ),
            path(
                "<path:object_id>/variants/<uuid:variant_id>/rotate-key/",
                self.admin_site.admin_view(self.rotate_key_view),
                name="experiments_experiment_rotate_key",
            ),
            path(
                "<path:object_id>/variants/<uuid:variant_id>/test-connection/",
                self.admin_site.admin_view(self.test_connection_view),
                name="experiments_experiment_test_connection",
            ),
        ]
        return own + super().get_urls()

    def _report_page(self, view):
        """A report page of one experiment, behind the admin's view permission hook."""

        @wraps(view)
        def page(request: HttpRequest, object_id: str, **kwargs) -> HttpResponse:
            experiment = self.get_object(request, unquote(object_id))
            if experiment is None:
                raise Http404("No such experiment.")
            if not self.has_view_permission(request, experiment):
                raise PermissionDenied
            return view(request, self, experiment, **kwargs)

        return page

    def _variant_for(self, request, object_id: str, variant_id) -> Variant:
        return get_object_or_404(
            Variant.objects.select_related("experiment"),
            pk=variant_id,
            experiment_id=unquote(object_id),
        )

    def _checkpoint_page(
        self,
        request,
        variant: Variant,
        form: forms.Form,
        title: str,
        template: str,
        return_to: str,
        *,
        candidate_check: CheckpointCheck | None = None,
    ) -> HttpResponse:
        current = selectors.current_version(variant)
        context = {
            # The result of testing the checkpoint in the form (not saved, no version).
            "candidate_check": candidate_check,
            "test_required": services.checkpoint_test_required(variant.experiment),
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": title,
            "experiment": variant.experiment,
            "status_badge": status_badge_html(variant.experiment),
            "variant": variant,
            "current_version": current,
            "last_check": selectors.latest_checks([current.pk]).get(current.pk)
            if current
            else None,
            "test_url": reverse(
                "admin:experiments_experiment_test_connection",
                args=[variant.experiment_id, variant.pk],
            )
            if current
            else "",
            "return_to": return_to,
            "form": form,
            "media": self.media + form.media,
            "change_url": reverse(
                "admin:experiments_experiment_change", args=[variant.experiment_id]
            ),
            "has_view_permission": self.has_view_permission(request, variant.experiment),
        }
        return TemplateResponse(request, template, context)

    def _back_to_experiment(self, variant: Variant) -> HttpResponseRedirect:
        return HttpResponseRedirect(
            reverse("admin:experiments_experiment_change", args=[variant.experiment_id])
        )

    def _checkpoint_slot(
        self, request, object_id: str, variant_id, permission: str, what: str
    ) -> tuple[Variant, HttpResponse | None]:
        """The slot of a checkpoint page, and the way back when its experiment's status no
        longer allows the operation (None: go ahead)."""
        if not request.user.has_perm(permission):
            raise PermissionDenied
        variant = self._variant_for(request, object_id, variant_id)
        if variant.experiment.checkpoints_editable:
            return variant, None
        self.message_user(
            request, f"Cannot {what}: experiment is {variant.experiment.status}.", messages.ERROR
        )
        return variant, self._back_to_experiment(variant)

    def _report_check(self, request, variant: Variant, check: CheckpointCheck) -> None:
        verdict = "passed" if check.ok else "failed"
        self.message_user(
            request,
            f"Slot {variant.label!r}: connection test {verdict} ({check.summary}).",
            messages.SUCCESS if check.ok else messages.ERROR,
        )

    def _saved_message(self, request, text: str, version: VariantVersion, anyway: str) -> None:
        """The success message, naming the test run before the insert (if one was)."""
        check = selectors.latest_checks([version.pk]).get(version.pk)
        if check is None:
            self.message_user(request, f"{text}.", messages.SUCCESS)
        elif check.ok:
            self.message_user(
                request, f"{text}; connection test passed ({check.summary}).", messages.SUCCESS
            )
        else:
            self.message_user(
                request,
                f"{text} although its connection test failed ({check.summary}); "
                f"{anyway} anyway as confirmed.",
                messages.WARNING,
            )

    def _checkpoint_submit(self, request, form, *, check, save):
        """Run the submitted button of a checkpoint page: "Test connection" tests the
        unsaved checkpoint in the form; saving tests it first when it must. Returns the
        saved version (or None) and the result of a test of the unsaved checkpoint."""
        try:
            if "_test" in request.POST:
                return None, check()
            return save(test=form.test_first, force=bool(form.cleaned_data.get("anyway"))), None
        except services.CheckpointTestFailed as failed:
            return None, failed.check
        except ExperimentError as error:
            form.show_service_error(error)
            return None, None

    # Error reports of these pages (Django's, e.g. to ADMINS) never carry the typed key.
    @method_decorator(sensitive_post_parameters("api_key"))
    def hot_swap_view(self, request, object_id: str, variant_id) -> HttpResponse:
        variant, refused = self._checkpoint_slot(
            request, object_id, variant_id, HOTSWAP_PERMISSION, "hot-swap"
        )
        if refused:
            return refused
        current = selectors.current_version(variant)
        form = HotSwapForm(
            request.POST if request.method == "POST" else None,
            initial={"upstream": upstream_initial(current.upstream if current else None)},
            key_required=current is None,
            test_required=services.checkpoint_test_required(variant.experiment),
        )
        candidate_check = None
        if request.method == "POST" and form.is_valid():
            candidate = {
                "variant": variant,
                "upstream": form.cleaned_data["upstream"],
                "api_key": form.cleaned_data["api_key"] or None,
                "by": request.user,
            }
            version, candidate_check = self._checkpoint_submit(
                request,
                form,
                check=lambda: services.check_hot_swap(**candidate),
                save=lambda **test: services.hot_swap(**candidate, **test),
            )
            if version is not None:
                self._saved_message(
                    request,
                    f"Variant {variant.label!r} now serves {version.internal_id!r} "
                    f"as {version.label}",
                    version,
                    "swapped",
                )
                return self._back_to_experiment(variant)
        if form.is_bound:
            form.redact_for_redisplay()
        return self._checkpoint_page(
            request,
            variant,
            form,
            f"Hot-swap checkpoint: {variant.label}",
            "admin/experiments/experiment/hot_swap.html",
            "hot_swap",
            candidate_check=candidate_check,
        )

    @method_decorator(sensitive_post_parameters("api_key"))
    def rotate_key_view(self, request, object_id: str, variant_id) -> HttpResponse:
        variant, refused = self._checkpoint_slot(
            request, object_id, variant_id, ROTATE_KEY_PERMISSION, "rotate the key"
        )
        if refused:
            return refused
        form = RotateKeyForm(
            request.POST if request.method == "POST" else None,
            test_required=services.checkpoint_test_required(variant.experiment),
        )
        candidate_check = None
        if request.method == "POST" and form.is_valid():
            candidate = {
                "variant": variant,
                "api_key": form.cleaned_data["api_key"],
                "by": request.user,
            }
            version, candidate_check = self._checkpoint_submit(
                request,
                form,
                check=lambda: services.check_rotation(**candidate),
                save=lambda **test: services.rotate_key(**candidate, **test),
            )
            if version is not None:
                self._saved_message(
                    request,
                    f"Rotated the key of variant {variant.label!r}; it now serves {version.label}",
                    version,
                    "rotated",
                )
                return self._back_to_experiment(variant)
        return self._checkpoint_page(
            request,
            variant,
            form,
            f"Rotate key: {variant.label}",
            "admin/experiments/experiment/rotate_key.html",
            "rotate_key",
            candidate_check=candidate_check,
        )

    def test_connection_view(self, request, object_id: str, variant_id) -> HttpResponse:
        """POST: test the slot's current checkpoint, then go back where the button was."""
        variant = self._variant_for(request, object_id, variant_id)
        if not (
            may_test_checkpoints(request)
            and self.has_view_or_change_permission(request, variant.experiment)
        ):
            raise PermissionDenied
        if request.method != "POST":
            return self._back_to_experiment(variant)
        try:
            check = services.check_slot(variant=variant, by=request.user)
        except ExperimentError as error:
            self.message_user(request, error.message, messages.ERROR)
        else:
            self._report_check(request, variant, check)
        back = request.POST.get("return_to")
        if back in ("hot_swap", "rotate_key"):
            return HttpResponseRedirect(
                reverse(
                    f"admin:experiments_experiment_{back}",
                    args=[variant.experiment_id, variant.pk],
                )
            )
        return self._back_to_experiment(variant)


def _lifecycle_state(experiment: Experiment) -> str:
    return f"{experiment.status}, archived" if experiment.is_archived else str(experiment.status)


def _names(experiments: list[Experiment]) -> str:
    if len(experiments) == 1:
        return repr(experiments[0].name)
    return f"{len(experiments)} experiments"
