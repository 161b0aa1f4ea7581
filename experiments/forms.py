"""Admin forms. They collect input; every rule is enforced by ``experiments.services``.

A service refusal (``ExperimentError``) is turned into form errors next to the
field it names by ``show_service_error``, so staff see why nothing was saved.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from django import forms
from django.core.exceptions import ValidationError
from django.forms.models import BaseInlineFormSet
from django_jsonform.utils import join_coords
from django_jsonform.widgets import JSONFormWidget

from experiments import selectors, services
from experiments.models import Experiment, Variant
from experiments.services import ExperimentError, InvalidInput
from experiments.upstream import upstream_json_schema


def _by_service(cleaner: Callable[[Any], Any], value: Any) -> Any:
    """Apply a service's input rule in a form, so its wording shows next to the field."""
    try:
        return cleaner(value)
    except InvalidInput as refused:
        raise ValidationError(refused.message) from None


class ExperimentForm(forms.ModelForm):
    """Name, public id and description; the services' rules apply at validation time."""

    class Meta:
        model = Experiment
        fields = ["name", "public_model_id", "description", "response_capture_rate"]
        widgets = {
            # A one-line id; the model's TextField would otherwise render a textarea.
            "public_model_id": forms.TextInput(attrs={"size": 40}),
        }

    #: Not a model column: ``Variant.is_control``, set through ``services.set_control``.
    #: Present only on an existing experiment's page (``ExperimentAdmin.get_fieldsets``).
    control = forms.ModelChoiceField(
        queryset=Variant.objects.none(),
        label="Control slot",
        required=False,
        empty_label=None,
        help_text="The slot the Stats page compares every other slot against (its current "
        "checkpoint). Editable until the experiment is completed; never moves users.",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_response_capture_rate()
        control = self.fields.get("control")
        if control is None:
            return
        # The admin excludes read-only fields, but a declared field stays on the class.
        if self.instance.pk is None or "control" in (self._meta.exclude or ()):
            del self.fields["control"]
            return
        control.queryset = Variant.objects.filter(experiment=self.instance).order_by(
            "created_at", "id"
        )
        current = selectors.control_slot(self.instance)
        # Not required: a post without it (a script, an old page) leaves the control as is.
        control.initial = current.pk if current else None
        control.error_messages["invalid_choice"] = (
            "Choose one of this experiment's slots as the control."
        )

    def _init_response_capture_rate(self) -> None:
        if "response_capture_rate" in self.fields:
            # Text, so "abc", "150" or "1.234" reach the service's rule and its wording.
            self.fields["response_capture_rate"] = forms.CharField(
                label="Response capture rate (%)",
                initial="0",
                required=False,
                help_text=(
                    "Share of requests whose answer is stored next to the prompt in the "
                    "prompt store (0 to 100, up to two decimals; 0 stores no answers). "
                    "Requests are sampled by a hash of their id."
                ),
                widget=forms.TextInput(attrs={"size": 8, "inputmode": "decimal"}),
            )
            if self.instance.pk is not None:
                self.initial["response_capture_rate"] = (
                    f"{self.instance.response_capture_rate.normalize():f}"
                )

    def clean_name(self) -> str:
        return _by_service(services.clean_name, self.cleaned_data["name"])

    def clean_public_model_id(self) -> str:
        return _by_service(services.clean_public_model_id, self.cleaned_data["public_model_id"])

    def clean_description(self) -> str:
        return _by_service(services.clean_description, self.cleaned_data["description"])

    def clean_response_capture_rate(self):
        value = self.cleaned_data["response_capture_rate"]
        if value in (None, ""):
            return self.instance.response_capture_rate  # left empty: unchanged
        return _by_service(services.clean_response_capture_rate, value)


class VariantForm(forms.ModelForm):
    """One slot row. A new slot's weight starts at 1."""

    class Meta:
        model = Variant
        fields = ["label", "weight"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if "weight" in self.fields:
            # Text, so "1.5" or "abc" reach the service's rule and its wording.
            self.fields["weight"] = forms.CharField(
                label="Weight",
                initial=1,
                widget=forms.NumberInput(attrs={"min": 1, "step": 1, "style": "width: 6em"}),
            )

    def clean_label(self) -> str:
        return _by_service(services.clean_label, self.cleaned_data["label"])

    def clean_weight(self) -> int:
        return _by_service(services.clean_weight, self.cleaned_data["weight"])

    def validate_unique(self) -> None:
        """Labels are compared across the whole formset instead (VariantFormSet.clean),
        with every row's new value; the services check again when saving."""


class VariantFormSet(BaseInlineFormSet):
    def clean(self) -> None:
        super().clean()
        rows: dict[str, list[forms.BaseForm]] = {}
        for form in self.forms:
            if not hasattr(form, "cleaned_data") or self._should_delete_form(form):
                continue
            label = form.cleaned_data.get("label", form.instance.label if form.instance.pk else "")
            if label:
                rows.setdefault(label, []).append(form)
        for label, forms_with_label in rows.items():
            if len(forms_with_label) > 1:
                for form in forms_with_label:
                    form.add_error(
                        "label" if "label" in form.fields else None,
                        f"Two slots are labelled {label!r}; labels must differ.",
                    )

    def validate_unique(self) -> None:
        """Replaced by ``clean``: Django's wording names model internals."""


def show_service_error(form: forms.BaseForm, error: ExperimentError) -> None:
    """Attach a service refusal to the form field it concerns (or the whole form).

    Refusals with several locations (an upstream document's fields) show every message:
    each is a sentence naming the field it is about.
    """
    target = error.field if error.field in form.fields else None
    locations = error.errors if isinstance(error, InvalidInput) else {}
    if locations:
        form.add_error(target, [message for messages in locations.values() for message in messages])
    else:
        form.add_error(target, error.message)


def _optional_upstream_fields() -> set[str]:
    schema = upstream_json_schema()
    return set(schema["properties"]) - set(schema.get("required", []))


def editor_value_to_upstream(value: Any) -> Any:
    """Drop the blanks the JSON editor emits for optional fields nobody filled in.

    The editor renders every property of the schema and submits ``""`` for an
    untouched choice, ``{}``/``[]`` for untouched containers. Those mean "not
    set"; anything else (including unknown keys) is passed on untouched so the
    strict validator in ``services.hot_swap`` judges it.
    """
    if not isinstance(value, dict):
        return value
    optional = _optional_upstream_fields()
    cleaned: dict[str, Any] = {}
    for key, item in value.items():
        if key in optional and key.endswith("_settings") and isinstance(item, dict):
            item = {k: v for k, v in item.items() if v not in ("", None)}
        if key in optional and item in ("", None, {}, []):
            continue
        cleaned[key] = item
    return cleaned


class UpstreamEditorField(forms.JSONField):
    """The upstream JSON, edited with django-jsonform from the strict pydantic schema."""

    default_error_messages = {"invalid": "The upstream is not valid JSON."}

    def __init__(self, **kwargs):
        kwargs.setdefault("widget", JSONFormWidget(schema=upstream_json_schema))
        super().__init__(**kwargs)

    def to_python(self, value: Any) -> Any:
        try:
            return super().to_python(value)
        except RecursionError:  # the JSON parser recurses once per nesting level
            raise ValidationError(
                "The upstream JSON is nested too deeply.", code="invalid"
            ) from None

    def bound_data(self, data: Any, initial: Any) -> Any:
        try:
            return super().bound_data(data, initial)
        except RecursionError:  # re-shown after the error: start from the form's value
            return initial

    def show_errors_in_editor(self, errors: dict[str, list[str]]) -> None:
        """Highlight the offending inputs inside the editor too."""
        error_map = {}
        for location, messages in errors.items():
            coords = [] if location == "upstream" else location.split(".")
            error_map[join_coords(*coords)] = messages
        self.widget.add_error(error_map)


class ApiKeyField(forms.CharField):
    """Write-only: the submitted key is never rendered back into the page."""

    def __init__(self, **kwargs):
        kwargs.setdefault(
            "widget",
            forms.PasswordInput(
                render_value=False, attrs={"autocomplete": "new-password", "size": 50}
            ),
        )
        kwargs.setdefault("strip", True)
        super().__init__(**kwargs)


class CheckpointForm(forms.Form):
    """What the hot-swap and rotate pages share: the key, the test before saving, and the
    "anyway" confirmation offered once a test of the new checkpoint has failed."""

    test_before_saving = forms.BooleanField(
        label="Test connection before saving",
        required=False,
        initial=True,
        help_text="Sends one small request to the new checkpoint first; when it fails, "
        "nothing is saved unless you confirm.",
    )
    anyway = forms.BooleanField(required=False)

    #: The confirmation's wording: "Swap anyway" / "Rotate anyway".
    anyway_label = ""

    def __init__(self, *args, test_required: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.test_required = test_required
        if test_required:
            # The experiment routes (or resumes routing): the test is not optional.
            del self.fields["test_before_saving"]
        self.fields["anyway"].label = self.anyway_label

    @property
    def test_first(self) -> bool:
        return self.test_required or bool(self.cleaned_data.get("test_before_saving"))

    def show_service_error(self, error: ExperimentError) -> None:
        show_service_error(self, error)


class HotSwapForm(CheckpointForm):
    anyway_label = "Swap anyway"
    field_order = ["upstream", "api_key", "test_before_saving"]

    upstream = UpstreamEditorField(
        label="Upstream",
        help_text="Exactly the allowed fields; the partner key goes in the key field below.",
    )
    api_key = ApiKeyField(
        label="Partner API key",
        required=False,
        help_text="Leave empty to keep the current key.",
    )

    def __init__(self, *args, key_required: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        if key_required:
            self.fields["api_key"].help_text = "Required: this slot has no checkpoint yet."
        #: Upstream locations the validator refused ("base_url", "extra_body.x", ...).
        self.refused_locations: set[str] = set()

    def clean_upstream(self) -> Any:
        return editor_value_to_upstream(self.cleaned_data["upstream"])

    def show_service_error(self, error: ExperimentError) -> None:
        super().show_service_error(error)
        if isinstance(error, InvalidInput) and error.field == "upstream" and error.errors:
            self.refused_locations = set(error.errors)
            self.fields["upstream"].show_errors_in_editor(error.errors)

    def redact_for_redisplay(self) -> None:
        """Show a refused submission again without anything that may be a partner key.

        The key input is never rendered back; the upstream editor would be, and a key
        pasted into it is the likeliest thing to be refused (an ``api_key`` field, a key
        as ``base_url``). So refused values, and any text holding the submitted key, are
        left out; unreadable JSON shows the form's starting point instead.
        """
        try:
            submitted = json.loads(self.data.get("upstream") or "")
        except (ValueError, RecursionError):
            submitted = None
        if not isinstance(submitted, dict) or "upstream" in self.refused_locations:
            shown = self.initial.get("upstream") or {}
        else:
            key = (self.data.get("api_key") or "").strip()
            shown = _without_refused_or_key(submitted, self.refused_locations, key, "")
        data = self.data.copy()
        data["upstream"] = json.dumps(shown)
        self.data = data


def _without_refused_or_key(value: Any, refused: set[str], key: str, where: str) -> Any:
    if isinstance(value, dict):
        kept = {}
        for name, item in value.items():
            location = f"{where}.{name}" if where else str(name)
            if location in refused or (key and key in str(name)):
                continue
            kept[name] = _without_refused_or_key(item, refused, key, location)
        return kept
    if isinstance(value, list):
        return [
            _without_refused_or_key(item, refused, key, f"{where}.{index}")
            for index, item in enumerate(value)
            if f"{where}.{index}" not in refused
        ]
    if isinstance(value, str) and key and key in value:
        return ""
    return value


class RotateKeyForm(CheckpointForm):
    anyway_label = "Rotate anyway"
    field_order = ["api_key", "test_before_saving"]

    api_key = ApiKeyField(label="New partner API key", required=True)


def upstream_initial(upstream: dict[str, Any] | None) -> dict[str, Any]:
    """The editor's seed: the current checkpoint's upstream (it never holds a key)."""
    return dict(upstream) if upstream else {"internal_id": "", "base_url": ""}
