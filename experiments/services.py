"""Every write rule of the experiment lifecycle (SPEC §3), in one place.

Admin actions, admin views, management commands and tests call these
functions; none of them re-implements a rule. Each function takes keyword
arguments, runs in one transaction and either completes or changes nothing.
The database constraints are the final authority: an IntegrityError from them
is translated into the same domain error that the friendly pre-check raises.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib.admin.models import ADDITION, CHANGE, DELETION, LogEntry
from django.contrib.auth import get_user_model
from django.contrib.contenttypes.models import ContentType
from django.db import IntegrityError, transaction
from django.db.models import Model
from django.utils import timezone

from experiments import crypto
from experiments.models import (
    ROUTING_STATUSES,
    Experiment,
    ExperimentStatus,
    Variant,
    VariantVersion,
)
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


def _record(*, obj: Model, by, action: int, message: str) -> None:
    """Write an admin history entry (who and when) for ``obj``."""
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
        raise ExperimentError(f"Experiment {pk} does not exist.") from None


def _locked_variant(variant: Variant | Any) -> Variant:
    pk = variant.pk if isinstance(variant, Variant) else variant
    try:
        return Variant.objects.select_for_update().select_related("experiment").get(pk=pk)
    except Variant.DoesNotExist:
        raise ExperimentError(f"Variant {pk} does not exist.") from None


def _require_draft(experiment: Experiment, what: str) -> None:
    if experiment.status != S.DRAFT:
        raise StructureLocked(
            f"Cannot {what}: experiment is {experiment.status}. Structural changes are only "
            "allowed in draft, because they would move bucket boundaries; create a new "
            "experiment instead."
        )


def _clean_text(value: str | None, *, field: str, max_length: int, required: bool) -> str:
    text = (value or "").strip()
    if required and not text:
        raise InvalidInput(f"{field} is required.", field=field)
    if len(text) > max_length:
        raise InvalidInput(f"{field} must be at most {max_length} characters.", field=field)
    return text


def _clean_public_model_id(value: str | None) -> str:
    text = _clean_text(value, field="public_model_id", max_length=255, required=True)
    if any(ch.isspace() for ch in text):
        raise InvalidInput("public_model_id must not contain whitespace.", field="public_model_id")
    return text


def _clean_label(value: str | None) -> str:
    return _clean_text(value, field="label", max_length=64, required=True)


def _clean_weight(value: Any) -> int:
    if isinstance(value, bool):
        raise InvalidInput("weight must be a positive whole number.", field="weight")
    try:
        weight = int(value)
    except (TypeError, ValueError):
        raise InvalidInput("weight must be a positive whole number.", field="weight") from None
    if str(value).strip() not in (str(weight), f"+{weight}") or weight <= 0:
        raise InvalidInput("weight must be a positive whole number.", field="weight")
    if weight > 1_000_000:
        raise InvalidInput("weight must be at most 1000000.", field="weight")
    return weight


# --- experiments -------------------------------------------------------------


def create_experiment(
    *, public_model_id: str, name: str, description: str = "", by=None
) -> Experiment:
    experiment = Experiment(
        public_model_id=_clean_public_model_id(public_model_id),
        name=_clean_text(name, field="name", max_length=200, required=True),
        description=_clean_text(description, field="description", max_length=2000, required=False),
        created_by=_actor(by),
    )
    with transaction.atomic():
        experiment.save()
        _record(obj=experiment, by=by, action=ADDITION, message="Created experiment (draft).")
    return experiment


def update_experiment(
    *,
    experiment: Experiment,
    by=None,
    name: str | None = None,
    description: str | None = None,
    public_model_id: str | None = None,
) -> Experiment:
    with transaction.atomic():
        exp = _locked_experiment(experiment)
        changed: list[str] = []
        if name is not None:
            exp.name = _clean_text(name, field="name", max_length=200, required=True)
            changed.append("name")
        if description is not None:
            exp.description = _clean_text(
                description, field="description", max_length=2000, required=False
            )
            changed.append("description")
        if public_model_id is not None:
            new_id = _clean_public_model_id(public_model_id)
            if new_id != exp.public_model_id:
                _require_draft(exp, "change the public model id")
                exp.public_model_id = new_id
                changed.append("public_model_id")
        if changed:
            exp.save(update_fields=[*changed, "updated_at"])
            _record(obj=exp, by=by, action=CHANGE, message=f"Changed {', '.join(changed)}.")
    return exp


def delete_experiment(*, experiment: Experiment, by=None) -> None:
    with transaction.atomic():
        exp = _locked_experiment(experiment)
        if exp.status != S.DRAFT:
            raise TransitionRefused(
                f"Cannot delete: experiment is {exp.status}. Only draft experiments can be "
                "deleted; complete and archive it instead."
            )
        _record(obj=exp, by=by, action=DELETION, message="Deleted draft experiment.")
        # Versions are insert-only, so the draft's versions go with their slot via
        # the database cascade, not through VariantVersion.delete().
        VariantVersion.with_ciphertext.filter(variant__experiment=exp)._raw_delete(
            VariantVersion.with_ciphertext.db
        )
        exp.delete()


# --- variants ----------------------------------------------------------------


def add_variant(*, experiment: Experiment, label: str, weight: Any, by=None) -> Variant:
    label = _clean_label(label)
    weight = _clean_weight(weight)
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
        _record(
            obj=exp, by=by, action=CHANGE, message=f"Added variant {label!r} (weight {weight})."
        )
    return variant


def remove_variant(*, variant: Variant, by=None) -> None:
    with transaction.atomic():
        var = _locked_variant(variant)
        exp = _locked_experiment(var.experiment_id)
        _require_draft(exp, "remove a variant")
        _record(obj=exp, by=by, action=CHANGE, message=f"Removed variant {var.label!r}.")
        VariantVersion.with_ciphertext.filter(variant=var)._raw_delete(
            VariantVersion.with_ciphertext.db
        )
        var.delete()


def set_variant_weight(*, variant: Variant, weight: Any, by=None) -> Variant:
    weight = _clean_weight(weight)
    with transaction.atomic():
        var = _locked_variant(variant)
        exp = _locked_experiment(var.experiment_id)
        if var.weight != weight:
            _require_draft(exp, "change a weight")
            old = var.weight
            var.weight = weight
            var.save(update_fields=["weight", "updated_at"])
            _record(
                obj=exp, by=by, action=CHANGE, message=f"Weight of {var.label!r}: {old} → {weight}."
            )
    return var


def rename_variant(*, variant: Variant, label: str, by=None) -> Variant:
    label = _clean_label(label)
    with transaction.atomic():
        var = _locked_variant(variant)
        exp = _locked_experiment(var.experiment_id)
        if var.label == label:
            return var
        if exp.status == S.COMPLETED:
            raise StructureLocked("Cannot relabel: experiment is completed.")
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
        _record(obj=exp, by=by, action=CHANGE, message=f"Relabelled variant {old!r} → {label!r}.")
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


def hot_swap(
    *, variant: Variant, upstream: Any, api_key: str | None = None, by=None
) -> VariantVersion:
    """Insert a new checkpoint into a slot. Without a key the previous ciphertext is reused."""
    try:
        config = validate_upstream(upstream)
    except UpstreamInvalid as exc:
        raise InvalidInput(
            f"Invalid upstream: {exc}", field="upstream", errors=exc.errors
        ) from None
    api_key = _clean_api_key(api_key)
    # Refuse before touching anything when the server cannot encrypt.
    try:
        crypto.check_key()
    except crypto.EncryptionKeyError as exc:
        raise EncryptionUnavailable(str(exc)) from None
    with transaction.atomic():
        var = _locked_variant(variant)
        exp = var.experiment
        if exp.status == S.COMPLETED:
            raise StructureLocked("Cannot hot-swap: experiment is completed.")
        previous = current_version(var, with_ciphertext=True) or (
            VariantVersion.with_ciphertext.filter(variant=var)
            .order_by("-effective_at", "-id")
            .first()
        )
        if api_key is not None:
            envelope, fingerprint = _encrypt(api_key), crypto.key_fingerprint()
        elif previous is not None:
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
        key_note = "new key" if api_key is not None else "key reused"
        _record(
            obj=exp,
            by=by,
            action=CHANGE,
            message=f"Hot-swapped variant {var.label!r} to {config['internal_id']!r} ({key_note}).",
        )
    return version


def rotate_key(*, variant: Variant, api_key: str, by=None) -> VariantVersion:
    """A hot-swap that copies the latest upstream and takes a new key."""
    api_key = _clean_api_key(api_key)
    if api_key is None:
        raise InvalidInput("A new API key is required to rotate.", field="api_key")
    try:
        crypto.check_key()
    except crypto.EncryptionKeyError as exc:
        raise EncryptionUnavailable(str(exc)) from None
    with transaction.atomic():
        var = _locked_variant(variant)
        exp = var.experiment
        if exp.status == S.COMPLETED:
            raise StructureLocked("Cannot rotate the key: experiment is completed.")
        latest = VariantVersion.objects.filter(variant=var).order_by("-effective_at", "-id").first()
        if latest is None:
            raise InvalidInput(
                "This variant has no checkpoint yet; hot-swap one in first.", field="api_key"
            )
        version = VariantVersion(
            variant=var,
            upstream=latest.upstream,
            encrypted_api_key=_encrypt(api_key),
            key_fingerprint=crypto.key_fingerprint(),
            effective_at=_next_effective_at(var),
            created_by=_actor(by),
        )
        version.save()
        _record(obj=exp, by=by, action=CHANGE, message=f"Rotated the key of variant {var.label!r}.")
    return version


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


def _current_versions(experiment: Experiment, *, with_ciphertext: bool = False):
    """(slot label, current version) for every slot that has one, in bucket order."""
    for variant in experiment.variants.order_by("id"):
        version = current_version(variant, with_ciphertext=with_ciphertext)
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


def _key_problems(experiment: Experiment) -> list[str]:
    """Activation refuses checkpoints that the key in use here cannot decrypt."""
    try:
        current = crypto.key_fingerprint()
    except crypto.EncryptionKeyError as exc:
        return [f"the checkpoints' partner keys cannot be checked: {exc}"]
    problems = []
    for label, version in _current_versions(experiment, with_ciphertext=True):
        if version.key_fingerprint and version.key_fingerprint != current:
            problems.append(
                f"slot {label!r} holds a checkpoint encrypted under key "
                f"{version.key_fingerprint}, not under the key in use here ({_key_in_use()})"
            )
        elif not version.key_fingerprint and not crypto.can_decrypt(version.encrypted_api_key):
            problems.append(
                f"slot {label!r} holds a checkpoint whose partner key the key in use here "
                f"({_key_in_use()}) cannot decrypt; the key that encrypted it is unknown"
            )
    return problems


def activation_problems(experiment: Experiment) -> list[str]:
    """What stands in the way of activating, as messages (empty list: ready)."""
    problems: list[str] = []
    variants = list(experiment.variants.all())
    if len(variants) < 2:
        problems.append(f"needs at least two variants (has {len(variants)})")
    if any(v.weight <= 0 for v in variants):
        problems.append("every weight must be positive")
    now = timezone.now()
    with_version = set(
        VariantVersion.objects.filter(variant__experiment=experiment, effective_at__lte=now)
        .values_list("variant_id", flat=True)
        .distinct()
    )
    missing = [v.label for v in variants if v.pk not in with_version]
    if missing:
        problems.append("no checkpoint loaded in: " + ", ".join(sorted(missing)))
    return problems + _key_problems(experiment)


def activate(*, experiment: Experiment, by=None) -> Experiment:
    with transaction.atomic():
        exp = _locked_experiment(experiment)
        if exp.status == S.ACTIVE:
            return exp
        if exp.status not in (S.DRAFT, S.PAUSED):
            raise TransitionRefused(
                f"Cannot activate: experiment is {exp.status}; only draft or paused experiments "
                "can be activated."
            )
        if exp.is_archived:
            raise TransitionRefused(
                f"Cannot activate: experiment is {exp.status} and archived; unarchive it first."
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
        _record(obj=exp, by=by, action=CHANGE, message=f"{verb} ({previous} → active).")
    return exp


def pause(*, experiment: Experiment, by=None) -> Experiment:
    with transaction.atomic():
        exp = _locked_experiment(experiment)
        if exp.status == S.PAUSED:
            return exp
        if exp.status != S.ACTIVE:
            raise TransitionRefused(
                f"Cannot pause: experiment is {exp.status}; only active experiments can be paused."
            )
        exp.status = S.PAUSED
        exp.save(update_fields=["status", "updated_at"])
        _record(obj=exp, by=by, action=CHANGE, message="Paused (active → paused).")
    return exp


def complete(*, experiment: Experiment, by=None) -> Experiment:
    with transaction.atomic():
        exp = _locked_experiment(experiment)
        if exp.status == S.COMPLETED:
            return exp
        if exp.status not in (S.ACTIVE, S.PAUSED):
            raise TransitionRefused(
                f"Cannot complete: experiment is {exp.status}; only active or paused experiments "
                "can be completed."
            )
        previous = exp.status
        exp.status = S.COMPLETED
        exp.ended_at = timezone.now()
        exp.save(update_fields=["status", "ended_at", "updated_at"])
        _record(obj=exp, by=by, action=CHANGE, message=f"Completed ({previous} → completed).")
    return exp


def archive(*, experiment: Experiment, by=None) -> Experiment:
    with transaction.atomic():
        exp = _locked_experiment(experiment)
        if exp.is_archived:
            return exp
        if exp.status == S.ACTIVE:
            raise TransitionRefused(
                "Cannot archive: experiment is active; pause or complete it first."
            )
        exp.is_archived = True
        exp.save(update_fields=["is_archived", "updated_at"])
        _record(obj=exp, by=by, action=CHANGE, message=f"Archived (status {exp.status}).")
    return exp


def unarchive(*, experiment: Experiment, by=None) -> Experiment:
    with transaction.atomic():
        exp = _locked_experiment(experiment)
        if not exp.is_archived:
            return exp
        exp.is_archived = False
        exp.save(update_fields=["is_archived", "updated_at"])
        _record(obj=exp, by=by, action=CHANGE, message="Unarchived.")
    return exp


#: Name → service, for the admin actions and the commands.
TRANSITIONS = {
    "activate": activate,
    "pause": pause,
    "complete": complete,
    "archive": archive,
    "unarchive": unarchive,
}
