"""The Django admin: a thin editing surface over ``experiments.services``.

No lifecycle rule lives here. Every write (create, edit, variants, hot-swap,
key rotation, transitions, delete) is a call into ``services``; a refusal comes
back as ``ExperimentError`` and is shown next to the field it names, and the
refused save changes nothing. The services also write the admin history
(LogEntry), so the ModelAdmin's own logging is switched off.

Django's change view saves the parent form and the inline formsets in
separate steps, and a failure after validation can no longer be shown as a
form error. So the whole save is applied at the end of validation (in the
variant formset's ``clean``, which runs after the parent form validated), in
a savepoint: on a refusal the savepoint rolls back and the errors are shown;
on success ``save_model``/``save_related`` have nothing left to do.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import wraps
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.actions import delete_selected as django_delete_selected
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.db.models import Count, Sum
from django.forms.models import BaseInlineFormSet
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join

from experiments import report_views, selectors, services
from experiments.forms import (
    ExperimentForm,
    HotSwapForm,
    RotateKeyForm,
    show_service_error,
    upstream_initial,
)
from experiments.models import Experiment, ExperimentStatus, Variant
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


def status_badge_html(experiment: Experiment) -> str:
    return format_html(
        '<span class="mx-status mx-status-{}" style="background:{};color:#fff;'
        'padding:2px 8px;border-radius:10px;font-size:11px;font-weight:600;">{}</span>',
        experiment.status,
        STATUS_COLOURS.get(experiment.status, "#6b7280"),
        experiment.get_status_display(),
    )


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


class VariantFormSet(BaseInlineFormSet):
    """Applies the whole change form through the services once everything validated."""

    #: Set per request by ``VariantInline.get_formset``.
    request: HttpRequest | None = None
    model_admin: ExperimentAdmin | None = None

    def clean(self) -> None:
        super().clean()
        if any(self.errors):
            return
        parent_form = getattr(self.request, "_experiment_parent_form", None)
        if parent_form is None:  # the parent form is invalid: show its errors, apply nothing
            return
        self.model_admin.apply_change_form(self.request, parent_form, self)


class VariantInline(admin.TabularInline):
    model = Variant
    formset = VariantFormSet
    fields = ("label", "weight", "share", "checkpoints", "checkpoint_links")
    readonly_fields = ("share", "checkpoints", "checkpoint_links")
    can_delete = True
    show_change_link = False
    verbose_name = "variant (slot)"
    verbose_name_plural = "variants (slots)"

    # The inline is part of the experiment: its permissions are the experiment's,
    # so the variant formset (which applies the save) is always present.
    def _experiment_perm(self, request: HttpRequest, action: str) -> bool:
        return request.user.has_perm(f"experiments.{action}_experiment")

    def has_view_permission(self, request, obj=None) -> bool:
        return self._experiment_perm(request, "view") or self._experiment_perm(request, "change")

    def has_add_permission(self, request, obj=None) -> bool:
        if obj is None:
            return self._experiment_perm(request, "add")
        return self._experiment_perm(request, "change") and obj.status == ExperimentStatus.DRAFT

    def has_change_permission(self, request, obj=None) -> bool:
        if obj is None:
            return self._experiment_perm(request, "add")
        return self._experiment_perm(request, "change") and obj.status != ExperimentStatus.COMPLETED

    def has_delete_permission(self, request, obj=None) -> bool:
        return self.has_add_permission(request, obj)

    def get_extra(self, request, obj=None, **kwargs) -> int:
        return 2 if obj is None else 0

    def get_readonly_fields(self, request, obj=None):
        fields = list(super().get_readonly_fields(request, obj))
        if obj is not None and obj.status != ExperimentStatus.DRAFT:
            fields.insert(0, "weight")  # structural: only in draft (SPEC §3)
        return fields

    def get_queryset(self, request):
        return selectors.with_version_history(super().get_queryset(request))

    def get_formset(self, request, obj=None, **kwargs):
        formset = super().get_formset(request, obj, **kwargs)
        self.request = request
        self.total_weight = (
            obj.variants.aggregate(total=Sum("weight"))["total"] if obj is not None else None
        )
        return type(
            formset.__name__,
            (formset,),
            {"request": request, "model_admin": self.admin_site._registry[Experiment]},
        )

    @admin.display(description="share")
    def share(self, variant: Variant) -> str:
        total = getattr(self, "total_weight", None)
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
            "<tr{}><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (
                    format_html(' class="mx-current-version" title="{}"', "current checkpoint")
                    if version.pk == current_id
                    else "",
                    version.internal_id,
                    version.base_url_host,
                    version.effective_at.strftime("%Y-%m-%d %H:%M:%S UTC"),
                    version.created_by.get_username() if version.created_by else "—",
                    # Every version is stored with a key (new or carried over); the key
                    # itself is never read here (the column is deferred).
                    f"Key configured (key {version.key_fingerprint or 'unknown'})",
                )
                for version in versions
            ),
        )
        return format_html(
            '<table class="mx-versions"><thead><tr><th>internal id</th><th>base URL host</th>'
            "<th>effective</th><th>who</th><th>key</th></tr></thead><tbody>{}</tbody></table>",
            rows,
        )

    @admin.display(description="checkpoint")
    def checkpoint_links(self, variant: Variant) -> str:
        request = getattr(self, "request", None)
        if variant._state.adding or request is None:
            return "Save first, then load a checkpoint."
        links = []
        if request.user.has_perm(HOTSWAP_PERMISSION):
            url = reverse(
                "admin:experiments_experiment_hot_swap", args=[variant.experiment_id, variant.pk]
            )
            links.append((url, "mx-hot-swap-link", "Hot-swap checkpoint"))
        if request.user.has_perm(ROTATE_KEY_PERMISSION):
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


@admin.register(Experiment)
class ExperimentAdmin(admin.ModelAdmin):
    form = ExperimentForm
    inlines = [VariantInline]
    list_display = (
        "name",
        "public_model_id",
        "status_badge",
        "variant_count",
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
        fieldsets = [(None, {"fields": ("name", "public_model_id", "description")})]
        if obj is not None:
            fieldsets.append(("Lifecycle", {"fields": self.lifecycle_fields}))
        return fieldsets

    def get_readonly_fields(self, request, obj=None):
        fields = list(self.lifecycle_fields)
        if obj is not None and obj.status != ExperimentStatus.DRAFT:
            fields.append("public_model_id")  # routing identity: only in draft (SPEC §3)
        return fields

    def get_queryset(self, request):
        return selectors.with_variant_counts(super().get_queryset(request))

    @admin.display(description="status", ordering="status")
    def status_badge(self, experiment: Experiment) -> str:
        return status_badge_html(experiment)

    @admin.display(description="variants", ordering="variant_count")
    def variant_count(self, experiment: Experiment) -> int:
        return experiment.variant_count

    # --- permissions ----------------------------------------------------------------

    def has_transition_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm(TRANSITION_PERMISSION)

    def has_delete_permission(self, request, obj=None) -> bool:
        # Mirrors the service rule only to hide the button; services.delete_experiment decides.
        allowed = super().has_delete_permission(request, obj)
        return allowed and (obj is None or obj.status == ExperimentStatus.DRAFT)

    # --- pages ----------------------------------------------------------------------

    def change_view(self, request, object_id, form_url="", extra_context=None):
        experiment = self.get_object(request, unquote(object_id))
        if experiment is not None:
            extra_context = {
                **(extra_context or {}),
                "key_warnings": services.key_warnings(experiment),
            }
        return super().change_view(request, object_id, form_url, extra_context)

    # --- saving through the services ------------------------------------------------

    def save_form(self, request, form, change):
        # Reached only when the parent form validated; the variant formset's clean
        # (next) applies the whole change through the services.
        request._experiment_parent_form = form
        return form.instance

    def apply_change_form(
        self, request: HttpRequest, form: forms.ModelForm, formset: VariantFormSet
    ) -> None:
        """Apply the change form through the services, all or nothing."""
        try:
            with transaction.atomic():
                experiment = self._apply_experiment_fields(request, form)
                self._apply_variant_forms(request, experiment, formset)
        except _VariantFormRefused as refused:
            show_service_error(refused.form, refused.error)
            raise ValidationError("Nothing was saved: see the error in the variants.") from None
        except ExperimentError as error:
            show_service_error(form, error)
            raise ValidationError("Nothing was saved: see the error above.") from None
        request._experiment_applied = True

    def _apply_experiment_fields(self, request, form) -> Experiment:
        instance = form.instance
        if instance._state.adding:
            created = services.create_experiment(
                public_model_id=form.cleaned_data["public_model_id"],
                name=form.cleaned_data["name"],
                description=form.cleaned_data.get("description", ""),
                by=request.user,
            )
            # The admin redirects with the form's instance: make it the created row.
            for field in Experiment._meta.concrete_fields:
                setattr(instance, field.attname, getattr(created, field.attname))
            instance._state.adding = False
            instance._state.db = created._state.db
            return created
        changes = {
            field: form.cleaned_data[field]
            for field in ("name", "description", "public_model_id")
            if field in form.changed_data
        }
        if changes:
            return services.update_experiment(experiment=instance, by=request.user, **changes)
        return instance

    def _apply_variant_forms(self, request, experiment: Experiment, formset) -> None:
        deleted, existing, new = [], [], []
        for variant_form in formset.forms:
            if not variant_form.has_changed() and variant_form.instance.pk is None:
                continue
            is_new = variant_form.instance._state.adding
            if variant_form.cleaned_data.get("DELETE"):
                if not is_new:
                    deleted.append(variant_form)
            elif is_new:
                new.append(variant_form)
            elif variant_form.changed_data:
                existing.append(variant_form)
        # Removals first, so a freed label can be reused in the same save.
        for variant_form in deleted:
            with _refusal_shown_on(variant_form):
                services.remove_variant(variant=variant_form.instance.pk, by=request.user)
        for variant_form in existing:
            variant = variant_form.instance
            with _refusal_shown_on(variant_form):
                if "label" in variant_form.changed_data:
                    services.rename_variant(
                        variant=variant.pk,
                        label=variant_form.cleaned_data["label"],
                        by=request.user,
                    )
                if "weight" in variant_form.changed_data:
                    services.set_variant_weight(
                        variant=variant.pk,
                        weight=variant_form.cleaned_data["weight"],
                        by=request.user,
                    )
        for variant_form in new:
            with _refusal_shown_on(variant_form):
                services.add_variant(
                    experiment=experiment,
                    label=variant_form.cleaned_data["label"],
                    weight=variant_form.cleaned_data["weight"],
                    by=request.user,
                )

    def save_model(self, request, obj, form, change):
        if not getattr(request, "_experiment_applied", False):
            raise PermissionDenied("The change was not applied through the services.")

    def save_related(self, request, form, formsets, change):
        """Already applied by ``apply_change_form``."""

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

    # --- actions --------------------------------------------------------------------

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

    def _run_transition(self, request: HttpRequest, queryset, name: str) -> None:
        service = services.TRANSITIONS[name]
        done, already = TRANSITION_RESULTS[name]
        for experiment in queryset.order_by("name", "pk"):
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

    @admin.action(description="Activate or resume selected experiments", permissions=["transition"])
    def activate(self, request, queryset):
        self._run_transition(request, queryset, "activate")

    @admin.action(description="Pause selected experiments", permissions=["transition"])
    def pause(self, request, queryset):
        self._run_transition(request, queryset, "pause")

    @admin.action(description="Complete selected experiments", permissions=["transition"])
    def complete(self, request, queryset):
        self._run_transition(request, queryset, "complete")

    @admin.action(description="Archive selected experiments", permissions=["transition"])
    def archive(self, request, queryset):
        self._run_transition(request, queryset, "archive")

    @admin.action(description="Unarchive selected experiments", permissions=["transition"])
    def unarchive(self, request, queryset):
        self._run_transition(request, queryset, "unarchive")

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

    # --- our own pages: hot-swap, key rotation, reports ---------------------------------

    def get_urls(self):
        reports = [
            ("stats/", report_views.experiment_stats, "stats"),
            ("requests/", report_views.experiment_requests, "requests"),
            ("requests/<uuid:usage_id>/", report_views.experiment_request_detail, "request_detail"),
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
                "<path:object_id>/variants/<uuid:variant_id>/hot-swap/",
                self.admin_site.admin_view(self.hot_swap_view),
                name="experiments_experiment_hot_swap",
            ),
            path(
                "<path:object_id>/variants/<uuid:variant_id>/rotate-key/",
                self.admin_site.admin_view(self.rotate_key_view),
                name="experiments_experiment_rotate_key",
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

    def _variant_for(self, request, object_id: str, variant_id, permission: str) -> Variant:
        if not request.user.has_perm(permission):
            raise PermissionDenied
        return get_object_or_404(
            Variant.objects.select_related("experiment"),
            pk=variant_id,
            experiment_id=unquote(object_id),
        )

    def _checkpoint_page(
        self, request, variant: Variant, form: forms.Form, title: str, template: str
    ) -> HttpResponse:
        current = selectors.current_version(variant)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": title,
            "experiment": variant.experiment,
            "status_badge": status_badge_html(variant.experiment),
            "variant": variant,
            "current_version": current,
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

    def hot_swap_view(self, request, object_id: str, variant_id) -> HttpResponse:
        variant = self._variant_for(request, object_id, variant_id, HOTSWAP_PERMISSION)
        current = selectors.current_version(variant)
        form = HotSwapForm(
            request.POST if request.method == "POST" else None,
            initial={"upstream": upstream_initial(current.upstream if current else None)},
            key_required=current is None,
        )
        if request.method == "POST" and form.is_valid():
            try:
                version = services.hot_swap(
                    variant=variant,
                    upstream=form.cleaned_data["upstream"],
                    api_key=form.cleaned_data["api_key"] or None,
                    by=request.user,
                )
            except ExperimentError as error:
                form.show_service_error(error)
            else:
                self.message_user(
                    request,
                    f"Variant {variant.label!r} now serves {version.internal_id!r}.",
                    messages.SUCCESS,
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
        )

    def rotate_key_view(self, request, object_id: str, variant_id) -> HttpResponse:
        variant = self._variant_for(request, object_id, variant_id, ROTATE_KEY_PERMISSION)
        form = RotateKeyForm(request.POST if request.method == "POST" else None)
        if request.method == "POST" and form.is_valid():
            try:
                services.rotate_key(
                    variant=variant, api_key=form.cleaned_data["api_key"], by=request.user
                )
            except ExperimentError as error:
                form.show_service_error(error)
            else:
                self.message_user(
                    request, f"Rotated the key of variant {variant.label!r}.", messages.SUCCESS
                )
                return self._back_to_experiment(variant)
        return self._checkpoint_page(
            request,
            variant,
            form,
            f"Rotate key: {variant.label}",
            "admin/experiments/experiment/rotate_key.html",
        )


def _lifecycle_state(experiment: Experiment) -> str:
    return f"{experiment.status}, archived" if experiment.is_archived else str(experiment.status)


class _VariantFormRefused(Exception):
    def __init__(self, form: forms.BaseForm, error: ExperimentError):
        self.form = form
        self.error = error


@contextmanager
def _refusal_shown_on(form: forms.BaseForm) -> Iterator[None]:
    """Tag a service refusal with the variant row it belongs to."""
    try:
        yield
    except ExperimentError as error:
        raise _VariantFormRefused(form, error) from None
