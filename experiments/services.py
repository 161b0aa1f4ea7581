"""Every write rule of the experiment lifecycle (SPEC §3), in one place.

Admin actions, admin views, management commands and tests call these
functions; none of them re-implements a rule. Each function takes keyword
arguments, runs in one transaction and either completes or changes nothing.
The database constraints are the final authority: an IntegrityError from them
is translated into the same domain error that the friendly pre-check raises.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from django.conf import settings
from django.contrib.admin.models import ADDITION, CHANGE, DELETION, LogEntry
from django.contrib.auth import get_user_model
from django.contrib.contenttypes.models import ContentType
from django.db import IntegrityError, transaction
from django.db.models import Model
from django.utils import timezone
from django.utils.module_loading import import_string

from experiments import crypto, selectors
from experiments.models import (
    ROUTING_STATUSES,
    CheckpointCheck,
    Experiment,
    ExperimentStatus,
    Variant,
    VariantVersion,
)
from experiments.probes import CheckOutcome, CheckpointProbe
from experiments.selectors import current_version
from experiments.upstream import UpstreamInvalid, validate_upstream

S = ExperimentStatus


class ExperimentError(Exception):
    """A refused operation. The message is safe to show to staff and operators."""

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field


class TransitionRefused(ExperimentError):
    pass


class ActivationConflict(TransitionRefused):
    pass


class StructureLocked(ExperimentError):
    pass


class InvalidInput(ExperimentError):
    def __init__(self, message: str, *, field: str | None = None, errors: dict | None = None):
        super().__init__(message, field=field)
        self.errors = errors or ({field: [message]} if field else {})


class EncryptionUnavailable(ExperimentError):
    pass


# --- audit -------------------------------------------------------------------

_SERVICE_USERNAME = "manage.py"


def service_user():
    """The actor recorded for operator commands run without ``--by``."""
    User = get_user_model()
    user, _ = User.objects.get_or_create(
        username=_SERVICE_USERNAME,
        defaults={"is_active": False, "first_name": "Operator commands"},
    )
    if user.has_usable_password():
        user.set_unusable_password()
        user.save(update_fields=["password"])
    return user


def record_history(*, obj: Model, by, action: int, message: str) -> None:
    """Write an admin history entry (who and when) for ``obj``; without a user (an
    operator command run without ``--by``) the service user ``manage.py`` is recorded."""
    actor = by if by is not None and getattr(by, "pk", None) else service_user()
    LogEntry.objects.create(
        user_id=actor.pk,
        content_type=ContentType.objects.get_for_model(type(obj)),
        object_id=str(obj.pk),
        object_repr=str(obj)[:200],
        action_flag=action,
        change_message=message if message else json.dumps([{"changed": {"fields": []}}]),
    )


def _actor(by):
    return by if by is not None and getattr(by, "pk", None) else None


# --- helpers -----------------------------------------------------------------


def _locked_experiment(experiment: Experiment | Any) -> Experiment:
    pk = experiment.pk if isinstance(experiment, Experiment) else experiment
    try:
        return Experiment.objects.select_for_update().get(pk=pk)
    except Experiment.DoesNotExist:
        raise ExperimentError(f"No experiment matches '{pk}'.") from None


def _locked_variant(variant: Variant | Any) -> Variant:
    pk = variant.pk if isinstance(variant, Variant) else variant
    try:
        return Variant.objects.select_for_update().select_related("experiment").get(pk=pk)
    except Variant.DoesNotExist:
        raise ExperimentError(f"No variant matches '{pk}'.") from None


def _require_draft(experiment: Experiment, what: str) -> None:
    if not experiment.structure_editable:
        raise StructureLocked(
            f"Cannot {what}: experiment is {experiment.status}. Structural changes are only "
            "allowed in draft, because they would move bucket boundaries; create a new "
            "experiment instead."
        )


#: How messages name the fields (the admin's labels, the commands' options).
FIELD_NAMES = {
    "name": "Name",
    "description": "Description",
    "public_model_id": "Public model id",
    "label": "Label",
    "weight": "Weight",
    "response_capture_rate": "Response capture rate",
}


def _clean_text(value: str | None, *, field: str, max_length: int, required: bool) -> str:
    text = (value or "").strip()
    if required and not text:
        raise InvalidInput(f"{FIELD_NAMES[field]} is required.", field=field)
    if len(text) > max_length:
        raise InvalidInput(
            f"{FIELD_NAMES[field]} must be at most {max_length} characters.", field=field
        )
    return text


# The cleaners below are the one wording of each input rule: the services apply them,
# and the admin's forms call them too, so every error of a submit shows at once.


def clean_name(value: str | None) -> str:
    return _clean_text(value, field="name", max_length=200, required=True)


def clean_description(value: str | None) -> str:
    return _clean_text(value, field="description", max_length=2000, required=False)


def clean_public_model_id(value: str | None) -> str:
    text = _clean_text(value, field="public_model_id", max_length=255, required=True)
    if any(ch.isspace() for ch in text):
        raise InvalidInput("Public model id must not contain spaces.", field="public_model_id")
    return text


def clean_label(value: str | None) -> str:
    return _clean_text(value, field="label", max_length=64, required=True)


def clean_weight(value: Any) -> int:
    message = "Weight must be a positive whole number."
    if isinstance(value, bool):
        raise InvalidInput(message, field="weight")
    try:
        weight = int(value)
    except (TypeError, ValueError):
        raise InvalidInput(message, field="weight") from None
    if str(value).strip() not in (str(weight), f"+{weight}") or weight <= 0:
        raise InvalidInput(message, field="weight")
    if weight > 1_000_000:
        raise InvalidInput("Weight must be at most 1000000.", field="weight")
    return weight


RESPONSE_CAPTURE_RATE_RULE = (
    "Response capture rate must be a percentage from 0 to 100 with at most two decimals "
    "(for example 0, 5 or 12.5)."
)


def clean_response_capture_rate(value: Any) -> Decimal:
    """A percentage of requests, 0-100 with at most two decimals; "12.5%" is accepted."""
    if isinstance(value, bool) or value is None:
        raise InvalidInput(RESPONSE_CAPTURE_RATE_RULE, field="response_capture_rate")
    text = str(value).strip().removesuffix("%").strip()
    try:
        rate = Decimal(text)
    except InvalidOperation:
        raise InvalidInput(RESPONSE_CAPTURE_RATE_RULE, field="response_capture_rate") from None
    if not rate.is_finite() or rate < 0 or rate > 100 or rate != rate.quantize(Decimal("0.01")):
        raise InvalidInput(RESPONSE_CAPTURE_RATE_RULE, field="response_capture_rate")
    return rate.quantize(Decimal("0.01"))


def format_rate(rate: Decimal) -> str:
    """ "12.5%", "0%", "100%": a capture rate as people write it."""
    return f"{rate.normalize():f}%"


# --- experiments -------------------------------------------------------------


def create_experiment(
    *,
    public_model_id: str,
    name: str,
    description: str = "",
    response_capture_rate: Any = 0,
    by=None,
) -> Experiment:
    experiment = Experiment(
        public_model_id=clean_public_model_id(public_model_id),
        name=clean_name(name),
        description=clean_description(description),
        response_capture_rate=clean_response_capture_rate(response_capture_rate),
        created_by=_actor(by),
    )
    message = "Created experiment (draft)."
    if experiment.response_capture_rate:
        message = (
            "Created experiment (draft), capturing "
            f"{format_rate(experiment.response_capture_rate)} of answers."
        )
    with transaction.atomic():
        experiment.save()
        record_history(obj=experiment, by=by, action=ADDITION, message=message)
    return experiment


def update_experiment(
    *,
    experiment: Experiment,
    by=None,
    name: str | None = None,
    description: str | None = None,
    public_model_id: str | None = None,
    response_capture_rate: Any = None,
) -> Experiment:
    """Change what is given. The capture rate may change in any status (it is read by
    the gateway with the routing payload, so saving it moves the routing generation)."""
    rate = (
        None
        if response_capture_rate is None
        else clean_response_capture_rate(response_capture_rate)
    )
    with transaction.atomic():
        exp = _locked_experiment(experiment)
        changed: list[str] = []
        notes: list[str] = []
        if name is not None:
            exp.name = clean_name(name)
            changed.append("name")
        if description is not None:
            exp.description = clean_description(description)
            changed.append("description")
        if public_model_id is not None:
            new_id = clean_public_model_id(public_model_id)
            if new_id != exp.public_model_id:
                _require_draft(exp, "change the public model id")
                exp.public_model_id = new_id
                changed.append("public_model_id")
        if rate is not None and rate != exp.response_capture_rate:
            notes.append(
                f"response capture rate {format_rate(exp.response_capture_rate)} → "
                f"{format_rate(rate)}"
            )
            exp.response_capture_rate = rate
            changed.append("response_capture_rate")
        if changed:
            exp.save(update_fields=[*changed, "updated_at"])
            fields = [name for name in changed if name != "response_capture_rate"]
            message = "; ".join(
                ([f"Changed {', '.join(fields)}"] if fields else [])
                + [f"Changed {note}" for note in notes]
            )
            record_history(obj=exp, by=by, action=CHANGE, message=f"{message}.")
    return exp


def delete_experiment(*, experiment: Experiment, by=None) -> None:
    with transaction.atomic():
        exp = _locked_experiment(experiment)
        if not exp.deletable:
            raise TransitionRefused(
                f"Cannot delete: experiment is {exp.status}. Only draft experiments can be "
                "deleted; complete and archive it instead."
            )
        record_history(obj=exp, by=by, action=DELETION, message="Deleted draft experiment.")
        _delete_versions(VariantVersion.with_ciphertext.filter(variant__experiment=exp))
        exp.delete()


def _delete_versions(versions) -> None:
    """Delete a draft's checkpoint rows (and their connection tests) in SQL.

    Versions are insert-only, so VariantVersion.delete() refuses; a draft's versions go
    with their slot. Their tests go first: the raw delete skips Django's cascade.
    """
    CheckpointCheck.objects.filter(version__in=versions.values("pk"))._raw_delete(
        CheckpointCheck.objects.db
    )
    versions._raw_delete(versions.db)


# --- variants ----------------------------------------------------------------


def add_variant(*, experiment: Experiment, label: str, weight: Any, by=None) -> Variant:
    label = clean_label(label)
    weight = clean_weight(weight)
    with transaction.atomic():
        exp = _locked_experiment(experiment)
        _require_draft(exp, "add a variant")
        if exp.variants.filter(label=label).exists():
            raise InvalidInput(f"A variant labelled {label!r} already exists.", field="label")
        try:
            with transaction.atomic():
                variant = Variant.objects.create(experiment=exp, label=label, weight=weight)
        except IntegrityError:
            raise InvalidInput(
                f"A variant labelled {label!r} already exists.", field="label"
            ) from None
        record_history(
            obj=exp, by=by, action=CHANGE, message=f"Added variant {label!r} (weight {weight})."
        )
    return variant


def remove_variant(*, variant: Variant, by=None) -> None:
    with transaction.atomic():
        var = _locked_variant(variant)
        exp = _locked_experiment(var.experiment_id)
        _require_draft(exp, "remove a variant")
        record_history(obj=exp, by=by, action=CHANGE, message=f"Removed variant {var.label!r}.")
        _delete_versions(VariantVersion.with_ciphertext.filter(variant=var))
        var.delete()


def set_variant_weight(*, variant: Variant, weight: Any, by=None) -> Variant:
    weight = clean_weight(weight)
    with transaction.atomic():
        var = _locked_variant(variant)
        exp = _locked_experiment(var.experiment_id)
        if var.weight != weight:
            _require_draft(exp, "change a weight")
            old = var.weight
            var.weight = weight
            var.save(update_fields=["weight", "updated_at"])
            record_history(
                obj=exp, by=by, action=CHANGE, message=f"Weight of {var.label!r}: {old} → {weight}."
            )
    return var


def rename_variant(*, variant: Variant, label: str, by=None) -> Variant:
    label = clean_label(label)
    with transaction.atomic():
        var = _locked_variant(variant)
        exp = _locked_experiment(var.experiment_id)
        if var.label == label:
            return var
        if not exp.labels_editable:
            raise StructureLocked(f"Cannot relabel: experiment is {exp.status}.")
        if exp.variants.filter(label=label).exclude(pk=var.pk).exists():
            raise InvalidInput(f"A variant labelled {label!r} already exists.", field="label")
        old = var.label
        var.label = label
        try:
            with transaction.atomic():
                var.save(update_fields=["label", "updated_at"])
        except IntegrityError:
            raise InvalidInput(
                f"A variant labelled {label!r} already exists.", field="label"
            ) from None
        record_history(
            obj=exp, by=by, action=CHANGE, message=f"Relabelled variant {old!r} → {label!r}."
        )
    return var


def set_control(*, variant: Variant | Any, by=None) -> Variant:
    """Make ``variant`` its experiment's control slot: the slot the reports compare every
    other slot against. Any status but completed (a completed experiment's report is
    history); changes no routing. Setting the current control again is a no-op."""
    with transaction.atomic():
        var = _locked_variant(variant)
        exp = _locked_experiment(var.experiment_id)
        if not exp.labels_editable:
            raise StructureLocked(
                f"Cannot change the control slot: experiment is {exp.status}. A completed "
                "experiment's comparisons stay as they were."
            )
        previous = selectors.control_slot(exp)
        if previous is not None and previous.pk == var.pk and var.is_control:
            return var
        # One marked slot per experiment (a partial unique index): unmark first. Queryset
        # updates: the control is not routing state, so no routing generation is bumped.
        now = timezone.now()
        Variant.objects.filter(experiment=exp, is_control=True).exclude(pk=var.pk).update(
            is_control=False, updated_at=now
        )
        Variant.objects.filter(pk=var.pk).update(is_control=True, updated_at=now)
        var.is_control, var.updated_at = True, now
        if previous is None or previous.pk != var.pk:
            was = f" (was {previous.label!r})" if previous is not None else ""
            record_history(
                obj=exp, by=by, action=CHANGE, message=f"Control slot: {var.label!r}{was}."
            )
    return var


# --- checkpoints -------------------------------------------------------------


def _next_effective_at(var: Variant):
    """Now, but strictly after the slot's newest version, so the newest insert is current."""
    now = timezone.now()
    latest = (
        VariantVersion.objects.filter(variant=var)
        .order_by("-effective_at")
        .values_list("effective_at", flat=True)
        .first()
    )
    if latest is not None and latest >= now:
        return latest + timedelta(microseconds=1)
    return now


def _encrypt(api_key: str) -> dict[str, str]:
    try:
        return crypto.encrypt_api_key(api_key)
    except crypto.EncryptionKeyError as exc:
        raise EncryptionUnavailable(str(exc)) from None


def _fingerprint_of(version: VariantVersion) -> str:
    """The fingerprint a reused ciphertext carries on: its own, or, for a row written
    before fingerprints were recorded, the key in use here when that key opens it."""
    if version.key_fingerprint:
        return version.key_fingerprint
    if crypto.can_decrypt(version.encrypted_api_key):
        return crypto.key_fingerprint()
    return ""


def _clean_api_key(api_key: str | None) -> str | None:
    if api_key is None:
        return None
    key = api_key.strip()
    if not key:
        return None
    if any(ch.isspace() for ch in key) or len(key) > 4096:
        raise InvalidInput("The API key must be one line without spaces.", field="api_key")
    return key


def checkpoint_test_required(experiment: Experiment) -> bool:
    """A checkpoint going into an experiment that routes (or resumes routing) is tested
    before it is inserted; in a draft, testing is the staff's choice."""
    return experiment.status in ROUTING_STATUSES


class CheckpointTestFailed(ExperimentError):
    """A new checkpoint failed its connection test, so nothing was inserted.

    ``check`` is the (unsaved) result: status, latency, blinded reason; never the key.
    """

    def __init__(self, message: str, *, check: CheckpointCheck):
        super().__init__(message)
        self.check = check


@dataclass(frozen=True)
class _Candidate:
    """A checkpoint about to be inserted into a slot: what a test and the insert share."""

    variant: Variant
    upstream: dict[str, Any]
    #: A newly typed key; None: the ciphertext of ``reused`` is carried over.
    api_key: str | None = field(repr=False)
    reused: VariantVersion | None


def _latest_version(var: Variant, *, with_ciphertext: bool = False) -> VariantVersion | None:
    manager = VariantVersion.with_ciphertext if with_ciphertext else VariantVersion.objects
    return manager.filter(variant=var).order_by("-effective_at", "-id").first()


def _key_source(var: Variant) -> VariantVersion | None:
    """The version whose ciphertext a hot-swap without a new key carries over."""
    return current_version(var, with_ciphertext=True) or _latest_version(var, with_ciphertext=True)


def _valid_upstream(upstream: Any) -> dict[str, Any]:
    try:
        return validate_upstream(upstream)
    except UpstreamInvalid as exc:
        raise InvalidInput(
            f"Invalid upstream: {exc}", field="upstream", errors=exc.errors
        ) from None


def _hot_swap_candidate(variant: Variant | Any, upstream: Any, api_key: str | None) -> _Candidate:
    config = _valid_upstream(upstream)
    api_key = _clean_api_key(api_key)
    var = _existing_variant(variant)
    if not var.experiment.checkpoints_editable:
        raise StructureLocked(f"Cannot hot-swap: experiment is {var.experiment.status}.")
    reused = None if api_key is not None else _key_source(var)
    if api_key is None and reused is None:
        raise InvalidInput(
            "An API key is required: this variant has no checkpoint yet.", field="api_key"
        )
    return _Candidate(var, config, api_key, reused)


def _rotation_candidate(variant: Variant | Any, api_key: str | None) -> _Candidate:
    api_key = _clean_api_key(api_key)
    if api_key is None:
        raise InvalidInput("A new API key is required to rotate.", field="api_key")
    var = _existing_variant(variant)
    if not var.experiment.checkpoints_editable:
        raise StructureLocked(f"Cannot rotate the key: experiment is {var.experiment.status}.")
    latest = _latest_version(var)
    if latest is None:
        raise InvalidInput(
            "This variant has no checkpoint yet; hot-swap one in first.", field="api_key"
        )
    return _Candidate(var, latest.upstream, api_key, None)


def _existing_variant(variant: Variant | Any) -> Variant:
    pk = variant.pk if isinstance(variant, Variant) else variant
    var = Variant.objects.select_related("experiment").filter(pk=pk).first()
    if var is None:
        raise ExperimentError(f"No variant matches '{pk}'.")
    return var


def _test_candidate(candidate: _Candidate, by) -> CheckpointCheck:
    """Send the candidate's one test request; the result, not yet saved (it has no version)."""
    if candidate.api_key is not None:
        outcome = _probe(candidate.variant.experiment, candidate.upstream, candidate.api_key)
    else:
        outcome = _probe_envelope(
            candidate.variant.experiment, candidate.upstream, candidate.reused.encrypted_api_key
        )
    return _check_row(outcome, by)


def check_hot_swap(*, variant: Variant, upstream: Any, api_key: str | None = None, by=None):
    """Test a checkpoint before it is hot-swapped in: the new upstream with the typed key,
    or with the slot's current key when none is typed. Saves nothing; returns the result
    as an unsaved ``CheckpointCheck``."""
    return _test_candidate(_hot_swap_candidate(variant, upstream, api_key), by)


def check_rotation(*, variant: Variant, api_key: str, by=None) -> CheckpointCheck:
    """Test a new key before it is rotated in: the slot's latest upstream with it. Saves
    nothing; returns the result as an unsaved ``CheckpointCheck``."""
    return _test_candidate(_rotation_candidate(variant, api_key), by)


def _tested_first(candidate: _Candidate, *, test: bool, force: bool, by):
    """The candidate's test result when asked for; refuses when it failed, unless forced."""
    if not test:
        return None
    check = _test_candidate(candidate, by)
    if not check.ok and not force:
        raise CheckpointTestFailed(
            f"Nothing was saved: the connection test of the new checkpoint failed "
            f"({check.summary}).",
            check=check,
        )
    return check


def _tested_note(check: CheckpointCheck | None, anyway: str) -> str:
    if check is None:
        return ""
    if check.ok:
        return f"; connection test passed ({check.summary})"
    return f"; connection test failed ({check.summary}), {anyway} anyway"


def hot_swap(
    *,
    variant: Variant,
    upstream: Any,
    api_key: str | None = None,
    by=None,
    test: bool = False,
    force: bool = False,
) -> VariantVersion:
    """Insert a new checkpoint into a slot. Without a key the previous ciphertext is reused.

    With ``test`` the checkpoint is tested first (no transaction is held while the partner
    answers); when the test fails nothing is inserted (``CheckpointTestFailed``) unless
    ``force``. The result is stored against the new version.
    """
    candidate = _hot_swap_candidate(variant, upstream, api_key)
    # Refuse before touching anything when the server cannot encrypt.
    try:
        crypto.check_key()
    except crypto.EncryptionKeyError as exc:
        raise EncryptionUnavailable(str(exc)) from None
    check = _tested_first(candidate, test=test, force=force, by=by)
    config, api_key = candidate.upstream, candidate.api_key
    with transaction.atomic():
        var = _locked_variant(candidate.variant)
        exp = var.experiment
        if not exp.checkpoints_editable:
            raise StructureLocked(f"Cannot hot-swap: experiment is {exp.status}.")
        previous = _key_source(var)
        if api_key is not None:
            envelope, fingerprint = _encrypt(api_key), crypto.key_fingerprint()
        elif previous is not None:
            if check is not None and previous.pk != candidate.reused.pk:
                # The key tested is no longer the key that would be carried over.
                raise ExperimentError(
                    f"Nothing was saved: slot {var.label!r} changed while its new checkpoint "
                    "was tested; try again."
                )
            envelope, fingerprint = previous.encrypted_api_key, _fingerprint_of(previous)
        else:
            raise InvalidInput(
                "An API key is required: this variant has no checkpoint yet.", field="api_key"
            )
        version = VariantVersion(
            variant=var,
            upstream=config,
            encrypted_api_key=envelope,
            key_fingerprint=fingerprint,
            effective_at=_next_effective_at(var),
            created_by=_actor(by),
        )
        version.save()
        _save_check(check, version)
        key_note = "new key" if api_key is not None else "key reused"
        record_history(
            obj=exp,
            by=by,
            action=CHANGE,
            message=f"Hot-swapped variant {var.label!r} to {config['internal_id']!r} "
            f"({key_note}{_tested_note(check, 'swapped')}).",
        )
    return version


def rotate_key(
    *, variant: Variant, api_key: str, by=None, test: bool = False, force: bool = False
) -> VariantVersion:
    """A hot-swap that copies the latest upstream and takes a new key (tested first with
    ``test``, as in ``hot_swap``)."""
    candidate = _rotation_candidate(variant, api_key)
    try:
        crypto.check_key()
    except crypto.EncryptionKeyError as exc:
        raise EncryptionUnavailable(str(exc)) from None
    check = _tested_first(candidate, test=test, force=force, by=by)
    with transaction.atomic():
        var = _locked_variant(candidate.variant)
        exp = var.experiment
        if not exp.checkpoints_editable:
            raise StructureLocked(f"Cannot rotate the key: experiment is {exp.status}.")
        latest = _latest_version(var)
        if check is not None and latest.upstream != candidate.upstream:
            raise ExperimentError(
                f"Nothing was saved: slot {var.label!r} changed while the new key was tested; "
                "try again."
            )
        version = VariantVersion(
            variant=var,
            upstream=latest.upstream,
            encrypted_api_key=_encrypt(candidate.api_key),
            key_fingerprint=crypto.key_fingerprint(),
            effective_at=_next_effective_at(var),
            created_by=_actor(by),
        )
        version.save()
        _save_check(check, version)
        record_history(
            obj=exp,
            by=by,
            action=CHANGE,
            message=f"Rotated the key of variant {var.label!r}{_tested_note(check, 'rotated')}.",
        )
    return version


def _save_check(check: CheckpointCheck | None, version: VariantVersion) -> None:
    if check is not None:
        check.version = version
        check.save()


# --- lifecycle ---------------------------------------------------------------


def _conflict_message(exp: Experiment) -> str:
    # Deliberately names no holder: the pre-check and the unique-index path must
    # give the very same message, and only the pre-check could see the holder.
    return (
        f"Cannot activate: another experiment is already active or paused on "
        f"{exp.public_model_id!r}. Complete it first."
    )


def _public_id_held_by_another(exp: Experiment) -> bool:
    """The friendly pre-check; the partial unique index stays the authority."""
    return (
        Experiment.objects.filter(public_model_id=exp.public_model_id, status__in=ROUTING_STATUSES)
        .exclude(pk=exp.pk)
        .exists()
    )


def _current_versions(experiment: Experiment):
    """(slot label, current version) for every slot that has one, in creation order."""
    for variant in experiment.variants.order_by("created_at", "id"):
        version = current_version(variant)
        if version is not None:
            yield variant.label, version


def _key_in_use() -> str:
    return f"{crypto.key_fingerprint()}, from {settings.BYOK_ENCRYPTION_KEY_SOURCE}"


def key_warnings(experiment: Experiment) -> list[str]:
    """Current checkpoints whose partner key was encrypted under another key than the one
    in use here, as messages naming slot and both fingerprints. Reads no ciphertext."""
    try:
        current = crypto.key_fingerprint()
    except crypto.EncryptionKeyError as exc:
        return [str(exc)]
    return [
        f"Slot {label!r}: its checkpoint {version.internal_id!r} was encrypted under key "
        f"{version.key_fingerprint}, but the key in use here is {_key_in_use()}. A gateway "
        "running with this key cannot decrypt it (503): run every process, gateway and "
        "commands, with the same key."
        for label, version in _current_versions(experiment)
        if version.key_fingerprint and version.key_fingerprint != current
    ]


def _ciphertext_of(version: VariantVersion) -> dict:
    """Only for a version of unknown fingerprint: the one case that must try decrypting."""
    return VariantVersion.with_ciphertext.values_list("encrypted_api_key", flat=True).get(
        pk=version.pk
    )


def _key_problems(experiment: Experiment) -> list[str]:
    """Activation refuses checkpoints that the key in use here cannot decrypt."""
    try:
        current = crypto.key_fingerprint()
    except crypto.EncryptionKeyError as exc:
        return [f"the checkpoints' partner keys cannot be checked: {exc}"]
    problems = []
    for label, version in _current_versions(experiment):
        if version.key_fingerprint and version.key_fingerprint != current:
            problems.append(
                f"slot {label!r} holds a checkpoint encrypted under key "
                f"{version.key_fingerprint}, not under the key in use here ({_key_in_use()})"
            )
        elif not version.key_fingerprint and not crypto.can_decrypt(_ciphertext_of(version)):
            problems.append(
                f"slot {label!r} holds a checkpoint whose partner key the key in use here "
                f"({_key_in_use()}) cannot decrypt; the key that encrypted it is unknown"
            )
    return problems


@dataclass(frozen=True)
class ReadinessItem:
    """One condition of activation, as the checklist next to Activate shows it."""

    #: "slots", "weights", "checkpoints", "keys", "public_id", or "test:<slot label>".
    key: str
    label: str
    ok: bool
    #: Why it holds or not; for a failed blocking item, the reason activation gives.
    detail: str
    #: False for a connection test: staff may activate anyway, after a warning.
    blocking: bool = True


def _when(moment) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _test_item(label: str, version: VariantVersion, check: CheckpointCheck | None):
    title = f"Connection test of slot {label!r} ({version.internal_id})"
    if check is None:
        return ReadinessItem(f"test:{label}", title, False, "never tested", blocking=False)
    verdict = "passed" if check.ok else "failed"
    detail = f"{verdict} at {_when(check.checked_at)}: {check.summary}"
    return ReadinessItem(f"test:{label}", title, check.ok, detail, blocking=False)


def _slot_items(variants: list[Variant], current: dict[Any, VariantVersion]):
    count = len(variants)
    yield ReadinessItem(
        "slots",
        "At least two slots",
        count >= 2,
        f"{count} slots" if count >= 2 else f"needs at least two slots (has {count})",
    )
    zero = [v.label for v in variants if v.weight <= 0]
    yield ReadinessItem(
        "weights",
        "Positive weights",
        not zero,
        f"weights {', '.join(str(v.weight) for v in variants) or 'none'}"
        if not zero
        else f"every weight must be positive (not in: {', '.join(zero)})",
    )
    missing = [v.label for v in variants if v.pk not in current]
    yield ReadinessItem(
        "checkpoints",
        "A checkpoint in every slot",
        not missing,
        f"no checkpoint loaded in: {', '.join(missing)}" if missing else "every slot has one",
    )


def activation_checklist(experiment: Experiment) -> list[ReadinessItem]:
    """Every condition of activation, met or not, in the order staff read them."""
    variants = list(experiment.variants.order_by("created_at", "id"))
    current = {v.pk: version for v in variants if (version := current_version(v)) is not None}
    items = list(_slot_items(variants, current))
    checks = selectors.latest_checks([version.pk for version in current.values()])
    items += [
        _test_item(v.label, current[v.pk], checks.get(current[v.pk].pk))
        for v in variants
        if v.pk in current
    ]
    key_problems = _key_problems(experiment)
    items.append(
        ReadinessItem(
            "keys",
            "Partner keys open with the encryption key in use here",
            not key_problems,
            "; ".join(key_problems) or f"key {_key_in_use()}",
        )
    )
    holder = (
        Experiment.objects.filter(
            public_model_id=experiment.public_model_id, status__in=ROUTING_STATUSES
        )
        .exclude(pk=experiment.pk)
        .first()
    )
    items.append(
        ReadinessItem(
            "public_id",
            f"No other active or paused experiment on {experiment.public_model_id!r}",
            holder is None,
            "the id is free"
            if holder is None
            else f"{holder.name!r} is {holder.status} on it; complete it first",
        )
    )
    return items


def activation_problems(experiment: Experiment) -> list[str]:
    """What stands in the way of activating, as messages (empty list: ready).

    The public id's holder is left out: ``activate`` answers it with ActivationConflict.
    """
    variants = list(experiment.variants.order_by("created_at", "id"))
    current = {v.pk for v in variants if current_version(v) is not None}
    problems = [
        item.detail
        for item in _slot_items(variants, dict.fromkeys(current))
        if not item.ok and item.blocking
    ]
    return problems + _key_problems(experiment)


def activation_warnings(experiment: Experiment) -> list[str]:
    """Checkpoints whose last connection test failed: activation asks staff to confirm."""
    return [
        f"{item.label}: {item.detail}."
        for item in activation_checklist(experiment)
        if item.key.startswith("test:") and not item.ok and item.detail != "never tested"
    ]


def activate(*, experiment: Experiment, by=None) -> Experiment:
    with transaction.atomic():
        exp = _locked_experiment(experiment)
        if exp.status == S.ACTIVE:
            return exp
        if not exp.can_activate:
            if exp.is_archived and exp.status in (S.DRAFT, S.PAUSED):
                raise TransitionRefused(
                    f"Cannot activate: experiment is {exp.status} and archived; unarchive it first."
                )
            raise TransitionRefused(
                f"Cannot activate: experiment is {exp.status}; only draft or paused experiments "
                "can be activated."
            )
        problems = activation_problems(exp)
        if problems:
            raise TransitionRefused(f"Cannot activate: {'; '.join(problems)}.")
        if _public_id_held_by_another(exp):
            raise ActivationConflict(_conflict_message(exp))
        previous = exp.status
        exp.status = S.ACTIVE
        if exp.started_at is None:
            exp.started_at = timezone.now()
        try:
            with transaction.atomic():
                exp.save(update_fields=["status", "started_at", "updated_at"])
        except IntegrityError:
            # A concurrent activation slipped past the pre-check; the partial
            # unique index decided. Same message as the pre-check.
            raise ActivationConflict(_conflict_message(exp)) from None
        verb = "Activated" if previous == S.DRAFT else "Resumed"
        record_history(obj=exp, by=by, action=CHANGE, message=f"{verb} ({previous} → active).")
    return exp


def pause(*, experiment: Experiment, by=None) -> Experiment:
    with transaction.atomic():
        exp = _locked_experiment(experiment)
        if exp.status == S.PAUSED:
            return exp
        if not exp.can_pause:
            raise TransitionRefused(
                f"Cannot pause: experiment is {exp.status}; only active experiments can be paused."
            )
        exp.status = S.PAUSED
        exp.save(update_fields=["status", "updated_at"])
        record_history(obj=exp, by=by, action=CHANGE, message="Paused (active → paused).")
    return exp


def complete(*, experiment: Experiment, by=None) -> Experiment:
    with transaction.atomic():
        exp = _locked_experiment(experiment)
        if exp.status == S.COMPLETED:
            return exp
        if not exp.can_complete:
            raise TransitionRefused(
                f"Cannot complete: experiment is {exp.status}; only active or paused experiments "
                "can be completed."
            )
        previous = exp.status
        exp.status = S.COMPLETED
        exp.ended_at = timezone.now()
        exp.save(update_fields=["status", "ended_at", "updated_at"])
        record_history(
            obj=exp, by=by, action=CHANGE, message=f"Completed ({previous} → completed)."
        )
    return exp


def archive(*, experiment: Experiment, by=None) -> Experiment:
    with transaction.atomic():
        exp = _locked_experiment(experiment)
        if exp.is_archived:
            return exp
        if not exp.can_archive:
            raise TransitionRefused(
                "Cannot archive: experiment is active; pause or complete it first."
            )
        exp.is_archived = True
        exp.save(update_fields=["is_archived", "updated_at"])
        record_history(obj=exp, by=by, action=CHANGE, message=f"Archived (status {exp.status}).")
    return exp


def unarchive(*, experiment: Experiment, by=None) -> Experiment:
    with transaction.atomic():
        exp = _locked_experiment(experiment)
        if not exp.can_unarchive:
            return exp
        exp.is_archived = False
        exp.save(update_fields=["is_archived", "updated_at"])
        record_history(obj=exp, by=by, action=CHANGE, message="Unarchived.")
    return exp


#: Name → service, for the admin and the commands (models.TRANSITION_NAMES order).
TRANSITIONS = {
    "activate": activate,
    "pause": pause,
    "complete": complete,
    "archive": archive,
    "unarchive": unarchive,
}


# --- connection tests ---------------------------------------------------------


def _probe(experiment: Experiment, upstream: dict[str, Any], api_key: str) -> CheckOutcome:
    checker = import_string(settings.CHECKPOINT_CHECKER)
    return checker(
        CheckpointProbe(
            public_model_id=experiment.public_model_id, upstream=upstream, api_key=api_key
        )
    )


def _probe_envelope(experiment: Experiment, upstream: dict[str, Any], envelope) -> CheckOutcome:
    """Test with a stored (encrypted) key; one that cannot be opened here fails the test."""
    try:
        api_key = crypto.decrypt_api_key(envelope)
    except crypto.EncryptionKeyError as exc:
        raise EncryptionUnavailable(str(exc)) from None
    except crypto.DecryptionError:
        return CheckOutcome(
            ok=False,
            status_code=None,
            latency_ms=None,
            reason=f"its partner key cannot be decrypted with the key in use here "
            f"({_key_in_use()}); a gateway with this key answers 503",
        )
    return _probe(experiment, upstream, api_key)


def _check_row(outcome: CheckOutcome, by) -> CheckpointCheck:
    return CheckpointCheck(
        ok=outcome.ok,
        status_code=outcome.status_code,
        latency_ms=outcome.latency_ms,
        reason=outcome.reason[:2000],
        checked_by=_actor(by),
    )


def check_checkpoint(*, version: VariantVersion | Any, by=None) -> CheckpointCheck:
    """Send one small request to a checkpoint and record the outcome against its version.

    The request goes through the checker named by ``settings.CHECKPOINT_CHECKER`` (the
    gateway's upstream client, transforms and blinding). No transaction is held while it
    waits on the partner.
    """
    pk = version.pk if isinstance(version, VariantVersion) else version
    row = VariantVersion.with_ciphertext.select_related("variant__experiment").filter(pk=pk).first()
    if row is None:
        raise ExperimentError(f"No checkpoint version matches '{pk}'.")
    check = _check_row(
        _probe_envelope(row.variant.experiment, row.upstream, row.encrypted_api_key), by
    )
    _save_check(check, row)
    return check


def check_slot(*, variant: Variant | Any, by=None) -> CheckpointCheck:
    """Test the checkpoint a slot serves now."""
    pk = variant.pk if isinstance(variant, Variant) else variant
    slot = Variant.objects.filter(pk=pk).first()
    if slot is None:
        raise ExperimentError(f"No variant matches '{pk}'.")
    version = current_version(slot)
    if version is None:
        raise InvalidInput(
            f"Slot {slot.label!r} has no checkpoint to test yet; hot-swap one in first.",
            field="api_key",
        )
    return check_checkpoint(version=version, by=by)
