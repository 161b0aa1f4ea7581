"""The experiment schema (SPEC §2). Table names are part of the contract."""

from __future__ import annotations

import hashlib
import uuid
from decimal import Decimal

from django.conf import settings
from django.core.validators import (
    MaxLengthValidator,
    MaxValueValidator,
    MinLengthValidator,
    MinValueValidator,
)
from django.db import models
from django.db.models import Q
from django.utils import timezone


class ExperimentStatus(models.TextChoices):
    DRAFT = "draft", "Draft"
    ACTIVE = "active", "Active"
    PAUSED = "paused", "Paused"
    COMPLETED = "completed", "Completed"


#: Statuses in which an experiment takes part in routing for its public id.
ROUTING_STATUSES = (ExperimentStatus.ACTIVE, ExperimentStatus.PAUSED)
#: The lifecycle transitions, in the order the UI offers them.
TRANSITION_NAMES = ("activate", "pause", "complete", "archive", "unarchive")


class Experiment(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    public_model_id = models.TextField(
        help_text="The model id clients call, e.g. kilo/preview-foo. Editable only in draft."
    )
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True, default="", validators=[MaxLengthValidator(2000)])
    status = models.CharField(
        max_length=16, choices=ExperimentStatus.choices, default=ExperimentStatus.DRAFT
    )
    is_archived = models.BooleanField(default=False)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    started_at = models.DateTimeField(null=True, blank=True)
    ended_at = models.DateTimeField(null=True, blank=True)
    #: Share of requests (percent, two decimals) whose answer is captured into the prompt
    #: store next to the request (SPEC §9). Opt-in: 0 captures nothing.
    response_capture_rate = models.DecimalField(
        max_digits=5,
        decimal_places=2,
        default=Decimal(0),
        # In the database too: a process of the previous release (a rolling deploy) inserts
        # experiments without the column.
        db_default=Decimal(0),
        validators=[MinValueValidator(0), MaxValueValidator(100)],
        help_text="Percent of requests whose answer is captured (0 to 100; 0 = none).",
    )

    class Meta:
        db_table = "model_experiment"
        ordering = ["-created_at"]
        permissions = [
            ("transition_experiment", "Can activate, pause, complete and archive experiments"),
            # Prompts are user content: reading them is not implied by seeing results.
            ("view_prompt", "Can read the captured prompts of an experiment's requests"),
        ]
        constraints = [
            models.CheckConstraint(
                condition=Q(status__in=[s.value for s in ExperimentStatus]),
                name="model_experiment_status_valid",
            ),
            models.CheckConstraint(
                condition=~Q(status=ExperimentStatus.ACTIVE, is_archived=True),
                name="model_experiment_active_not_archived",
            ),
            models.UniqueConstraint(
                fields=["public_model_id"],
                condition=Q(status__in=[s.value for s in ROUTING_STATUSES]),
                name="model_experiment_one_routing_per_public_id",
            ),
            models.CheckConstraint(
                condition=Q(response_capture_rate__gte=0, response_capture_rate__lte=100),
                name="model_experiment_response_capture_rate_range",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.public_model_id})"

    @property
    def is_routing(self) -> bool:
        return self.status in ROUTING_STATUSES

    @property
    def response_capture_basis_points(self) -> int:
        """The capture rate in hundredths of a percent (0-10000), as the gateway samples."""
        return int(self.response_capture_rate * 100)

    # What the lifecycle allows (SPEC §3). The services enforce these rules and the
    # admin hides what they would refuse, both through these predicates.

    @property
    def structure_editable(self) -> bool:
        """Slots, weights and the public id move bucket boundaries: draft only."""
        return self.status == ExperimentStatus.DRAFT

    @property
    def labels_editable(self) -> bool:
        return self.status != ExperimentStatus.COMPLETED

    @property
    def checkpoints_editable(self) -> bool:
        """Hot-swap and key rotation: until the experiment is completed."""
        return self.status != ExperimentStatus.COMPLETED

    @property
    def deletable(self) -> bool:
        return self.status == ExperimentStatus.DRAFT

    @property
    def can_activate(self) -> bool:
        """Activate a draft or resume a paused experiment (readiness aside)."""
        return self.status in (ExperimentStatus.DRAFT, ExperimentStatus.PAUSED) and (
            not self.is_archived
        )

    @property
    def can_pause(self) -> bool:
        return self.status == ExperimentStatus.ACTIVE

    @property
    def can_complete(self) -> bool:
        return self.status in ROUTING_STATUSES

    @property
    def can_archive(self) -> bool:
        return not self.is_archived and self.status != ExperimentStatus.ACTIVE

    @property
    def can_unarchive(self) -> bool:
        return self.is_archived

    def available_transitions(self) -> list[str]:
        """The transitions that would change this experiment now, in lifecycle order."""
        return [name for name in TRANSITION_NAMES if getattr(self, f"can_{name}")]


class Variant(models.Model):
    """A stable slot. Users are bucketed into slots; a slot holds checkpoints."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    experiment = models.ForeignKey(Experiment, on_delete=models.CASCADE, related_name="variants")
    label = models.CharField(max_length=64, validators=[MinLengthValidator(1)])
    weight = models.PositiveIntegerField(validators=[MinValueValidator(1)])
    #: The slot the reports compare every other slot against (SPEC §10). At most one per
    #: experiment; with none marked, the first-created slot is the control
    #: (``selectors.control_slot``). Changed only through ``services.set_control``.
    is_control = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        db_table = "model_experiment_variant"
        ordering = ["id"]  # bucket walk order (SPEC §7)
        permissions = [
            ("hotswap_variant", "Can hot-swap a variant's checkpoint"),
            ("rotate_key_variant", "Can rotate a variant's partner key"),
        ]
        constraints = [
            models.CheckConstraint(
                condition=Q(weight__gt=0), name="model_experiment_variant_weight_positive"
            ),
            models.CheckConstraint(
                condition=~Q(label=""), name="model_experiment_variant_label_not_empty"
            ),
            models.UniqueConstraint(
                fields=["experiment", "label"], name="model_experiment_variant_unique_label"
            ),
            models.UniqueConstraint(
                fields=["experiment"],
                condition=Q(is_control=True),
                name="model_experiment_variant_one_control",
            ),
        ]

    def __str__(self) -> str:
        return self.label


class VariantVersionQuerySet(models.QuerySet):
    def effective_at(self, moment=None):
        """Versions in force at ``moment`` (default now), newest first by (effective_at, id)."""
        moment = moment or timezone.now()
        return self.filter(effective_at__lte=moment).order_by("-effective_at", "-id")


class SafeVariantVersionManager(models.Manager.from_queryset(VariantVersionQuerySet)):
    """The default manager never selects the ciphertext (SPEC §6).

    Admin pages, reports and exports go through this manager; only the routing
    payload builder and the hot-swap service use ``with_ciphertext``.
    """

    def get_queryset(self):
        return super().get_queryset().defer("encrypted_api_key")


class VariantVersion(models.Model):
    """An immutable checkpoint held by a slot. Insert-only."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    variant = models.ForeignKey(Variant, on_delete=models.CASCADE, related_name="versions")
    upstream = models.JSONField()
    encrypted_api_key = models.JSONField()
    # crypto.key_fingerprint() of the key that encrypted ``encrypted_api_key``: names
    # a mismatch with the running key instead of an unexplained 503. Empty: unknown
    # (written before fingerprints were recorded, and not decryptable at migration).
    key_fingerprint = models.CharField(max_length=16, blank=True, default="")
    effective_at = models.DateTimeField(default=timezone.now)
    # The name a person says (SPEC §10): the slot's versions are numbered 1, 2, ... in
    # effective order; a key rotation (same upstream, new key) keeps its checkpoint's
    # number and counts rotations within it (``rc1 v2.1``). Set once, on insert, while
    # the services hold the slot's row lock; the unique constraint is the authority.
    version_number = models.PositiveIntegerField()
    key_rotation = models.PositiveIntegerField(default=0)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    objects = SafeVariantVersionManager()
    with_ciphertext = models.Manager.from_queryset(VariantVersionQuerySet)()

    class Meta:
        db_table = "model_experiment_variant_version"
        base_manager_name = "with_ciphertext"
        default_manager_name = "objects"
        indexes = [
            models.Index(
                fields=["variant", "-effective_at"],
                name="mx_version_variant_effective",
            )
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["variant", "version_number", "key_rotation"],
                name="model_experiment_variant_version_unique_number",
            ),
            models.CheckConstraint(
                condition=Q(version_number__gte=1),
                name="model_experiment_variant_version_number_positive",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.upstream.get('internal_id', '?')} @ {self.effective_at:%Y-%m-%d %H:%M:%S}"

    def save(self, *args, **kwargs):
        if not self._state.adding:
            raise ImmutableVersionError("Checkpoint versions are insert-only; hot-swap instead.")
        if self.version_number is None:
            self.version_number, self.key_rotation = self._next_number()
        super().save(*args, **kwargs)

    def _next_number(self) -> tuple[int, int]:
        """(version number, key rotation) after the slot's newest version.

        Callers that may race (the services) hold the slot's row lock, so the newest
        version cannot change under them; without it the unique constraint refuses.
        """
        newest = (
            VariantVersion.with_ciphertext.filter(variant_id=self.variant_id)
            .order_by("-effective_at", "-id")
            .values("upstream", "encrypted_api_key", "version_number")
            .first()
        )
        if newest is None:
            return 1, 0
        if is_key_rotation(newest, self.upstream, self.encrypted_api_key):
            rotations = VariantVersion.objects.filter(
                variant_id=self.variant_id, version_number=newest["version_number"]
            ).aggregate(models.Max("key_rotation"))["key_rotation__max"]
            return newest["version_number"], rotations + 1
        highest = VariantVersion.objects.filter(variant_id=self.variant_id).aggregate(
            models.Max("version_number")
        )["version_number__max"]
        return highest + 1, 0

    @property
    def key_rotated(self) -> bool:
        return self.key_rotation > 0

    @property
    def version_name(self) -> str:
        return version_name(self.version_number, self.key_rotation)

    @property
    def label(self) -> str:
        return checkpoint_label(self.variant.label, self.version_number, self.key_rotation)

    def delete(self, *args, **kwargs):
        raise ImmutableVersionError("Checkpoint versions are never deleted.")

    @property
    def internal_id(self) -> str:
        return str(self.upstream.get("internal_id", ""))

    @property
    def base_url_host(self) -> str:
        from urllib.parse import urlsplit

        return urlsplit(str(self.upstream.get("base_url", ""))).hostname or ""


class ImmutableVersionError(Exception):
    pass


def is_key_rotation(previous: dict, upstream, encrypted_api_key) -> bool:
    """A new version is a key rotation of ``previous`` (the slot's newest version, with
    ``upstream`` and ``encrypted_api_key``) when it serves the same upstream under a new
    key. A reloaded upstream with the same key, or any other upstream, is a new version.
    Ciphertexts are only compared, never opened: a new key always gets a fresh IV."""
    return previous["upstream"] == upstream and previous["encrypted_api_key"] != encrypted_api_key


def version_name(version_number: int, key_rotation: int) -> str:
    """``v2``, or ``v2.1`` for the first key rotation of v2."""
    return f"v{version_number}.{key_rotation}" if key_rotation else f"v{version_number}"


#: How tables, charts, commands and exports mark a key rotation.
KEY_ROTATED = "key rotated"


def checkpoint_label(slot_label: str, version_number: int, key_rotation: int) -> str:
    """What a person calls a checkpoint: ``rc1 v2``, ``rc1 v2.1 · key rotated``."""
    name = f"{slot_label} {version_name(version_number, key_rotation)}"
    return f"{name} · {KEY_ROTATED}" if key_rotation else name


#: The primary key of the one ``RoutingState`` row.
ROUTING_STATE_ID = uuid.UUID(int=1)


class RoutingState(models.Model):
    """The routing generation: the database's word on whether a routing cache is current.

    Bumped in the same transaction as every routing-relevant write (``experiments.signals``),
    so a cache built from the database after reading it is current exactly while the row
    still holds that generation. ``token`` changes with every bump because the number alone
    can repeat (a database restored from a backup, a flushed test database); a fresh random
    token never does.
    """

    id = models.UUIDField(primary_key=True, default=ROUTING_STATE_ID, editable=False)
    generation = models.BigIntegerField(default=0)
    token = models.UUIDField(default=uuid.uuid4)

    class Meta:
        db_table = "model_experiment_routing_state"
        constraints = [
            models.CheckConstraint(
                condition=Q(id=ROUTING_STATE_ID), name="model_experiment_routing_state_one_row"
            ),
        ]

    def __str__(self) -> str:
        return f"routing generation {self.generation}"


class CheckpointCheck(models.Model):
    """One connection test of a checkpoint: a small request through the gateway's client.

    Kept per version (versions are insert-only, so results live in their own table); the
    newest row is the checkpoint's "last test". ``reason`` is blinded and never holds a key.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    version = models.ForeignKey(VariantVersion, on_delete=models.CASCADE, related_name="checks")
    checked_at = models.DateTimeField(default=timezone.now)
    ok = models.BooleanField()
    status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    latency_ms = models.PositiveIntegerField(null=True, blank=True)
    reason = models.TextField(blank=True, default="")
    checked_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )

    class Meta:
        db_table = "model_experiment_checkpoint_check"
        ordering = ["-checked_at", "-id"]
        indexes = [
            models.Index(fields=["version", "-checked_at"], name="mx_check_version_checked"),
        ]

    def __str__(self) -> str:
        return f"{'passed' if self.ok else 'failed'} {self.checked_at:%Y-%m-%d %H:%M:%S}"

    @property
    def summary(self) -> str:
        """ "HTTP 200, 84 ms" / "HTTP 401, 12 ms: Invalid API key", as staff read it."""
        parts = [f"HTTP {self.status_code}" if self.status_code else "no answer"]
        if self.latency_ms is not None:
            parts.append(f"{self.latency_ms} ms")
        text = ", ".join(parts)
        # Without a closing full stop: callers end the sentence it is part of.
        return f"{text}: {self.reason.rstrip('.')}" if self.reason and not self.ok else text


class AllocationSubject(models.TextChoices):
    USER = "user", "User"
    MACHINE = "machine", "Machine"
    IP = "ip", "IP address"


class RequestKind(models.TextChoices):
    CHAT_COMPLETIONS = "chat_completions", "Chat completions"
    RESPONSES = "responses", "Responses"
    MESSAGES = "messages", "Messages"


#: Usage-row fields copied onto the attribution row (same values, same transaction).
USAGE_MEASURES = (
    "status_code",
    "has_error",
    "error_kind",
    "error_category",
    "finish_reason",
    "is_stream",
    "input_tokens",
    "output_tokens",
    "ttfb_ms",
    "total_ms",
)


def subject_hash_of_seed(seed: str) -> uuid.UUID:
    """The stored subject pseudonym: the first 16 bytes of SHA-256(seed)."""
    return subject_hash_of_digest(hashlib.sha256(seed.encode("utf-8")).digest())


def subject_hash_of_digest(digest: bytes) -> uuid.UUID:
    return uuid.UUID(bytes=digest[:16])


PROMPT_HASH_FAILED = "__failed__"
PROMPT_HASH_DELETED = "__deleted__"


class ExperimentRequest(models.Model):
    """Attribution of one gateway request to the exact checkpoint that served it."""

    usage = models.OneToOneField(
        "gateway.GatewayUsage",
        primary_key=True,
        on_delete=models.CASCADE,
        related_name="experiment_request",
        db_column="usage_id",
    )
    variant_version = models.ForeignKey(
        VariantVersion, on_delete=models.PROTECT, related_name="requests"
    )
    allocation_subject = models.CharField(max_length=16, choices=AllocationSubject.choices)
    # The first 128 bits of the SHA-256 of the bucketing seed (SPEC §7), as a
    # uuid: tells subjects apart for distinct counts and the sample-ratio check
    # without storing who they are. 16 bytes sort and group ~2x faster than the
    # 64-char hex (measured, bench/RESULTS.md) and collide no sooner than 2^64.
    # Nullable because rows written before the gateway filled it have none.
    allocation_subject_hash = models.UUIDField(null=True, blank=True)
    client_request_id = models.TextField(null=True, blank=True)
    request_kind = models.CharField(max_length=32, choices=RequestKind.choices)
    request_body_sha256 = models.CharField(max_length=64)
    was_truncated = models.BooleanField(default=False)
    # The captured answer in the prompt store (SPEC §9), for sampled requests only:
    # NULL when the request was not sampled (or had no answer), else like
    # request_body_sha256 (a hash, or __failed__ / __deleted__).
    response_sha256 = models.CharField(max_length=64, null=True, blank=True)
    created_at = models.DateTimeField()
    # Exact copies of the usage row's measures (USAGE_MEASURES), written in the
    # same transaction: reports and the request browser then read one table
    # through covering indexes instead of joining a million usage rows.
    status_code = models.PositiveSmallIntegerField()
    has_error = models.BooleanField()
    error_kind = models.CharField(max_length=64, null=True, blank=True)
    error_category = models.CharField(max_length=32, null=True, blank=True)
    finish_reason = models.CharField(max_length=32, null=True, blank=True)
    is_stream = models.BooleanField()
    input_tokens = models.PositiveIntegerField()
    output_tokens = models.PositiveIntegerField()
    ttfb_ms = models.PositiveIntegerField(null=True, blank=True)
    total_ms = models.PositiveIntegerField(null=True, blank=True)

    class Meta:
        db_table = "model_experiment_request"
        indexes = [
            # Per-checkpoint counts, sums and percentiles, and the time series:
            # an index-only scan over a created_at range per checkpoint.
            models.Index(
                fields=["variant_version", "created_at"],
                include=[
                    "allocation_subject",
                    "has_error",
                    "input_tokens",
                    "output_tokens",
                    "ttfb_ms",
                    "total_ms",
                ],
                name="mx_request_version_measures",
            ),
            # Distinct subjects (and users) per checkpoint and slot: read in
            # (checkpoint, subject) order, so counting needs no sort or hash.
            models.Index(
                fields=["variant_version", "allocation_subject_hash"],
                include=["created_at", "allocation_subject"],
                name="mx_request_version_subject",
            ),
            # Distinct messages per checkpoint, same shape.
            models.Index(
                fields=["variant_version", "client_request_id"],
                include=["created_at", "allocation_subject"],
                name="mx_request_version_message",
                condition=Q(client_request_id__isnull=False),
            ),
            # Keyset pagination of the request browser walks this backwards per
            # checkpoint; usage_id breaks ties between equal timestamps.
            models.Index(
                fields=["variant_version", "-created_at", "-usage"],
                name="mx_request_version_keyset",
            ),
            # The browser's errors-only filter: errors are a few percent of rows,
            # so walking the full keyset index would read thousands per page.
            models.Index(
                fields=["variant_version", "-created_at", "-usage"],
                name="mx_request_version_errors",
                condition=Q(has_error=True),
            ),
            models.Index(
                fields=["client_request_id"],
                name="mx_request_client_request_id",
                condition=Q(client_request_id__isnull=False),
            ),
            # The answer compare view: captured answers to one prompt, newest first.
            # Partial: only sampled rows (an opt-in share) are in it.
            models.Index(
                fields=["request_body_sha256", "-created_at"],
                include=["variant_version", "response_sha256"],
                name="mx_request_prompt_answered",
                condition=Q(response_sha256__isnull=False),
            ),
        ]
        constraints = [
            models.CheckConstraint(
                condition=Q(request_body_sha256__regex=r"^[0-9a-f]{64}$")
                | Q(request_body_sha256__in=[PROMPT_HASH_FAILED, PROMPT_HASH_DELETED]),
                name="model_experiment_request_sha256_valid",
            ),
            models.CheckConstraint(
                condition=Q(response_sha256__isnull=True)
                | Q(response_sha256__regex=r"^[0-9a-f]{64}$")
                | Q(response_sha256__in=[PROMPT_HASH_FAILED, PROMPT_HASH_DELETED]),
                name="model_experiment_request_response_sha256_valid",
            ),
            models.CheckConstraint(
                condition=Q(allocation_subject__in=[s.value for s in AllocationSubject]),
                name="model_experiment_request_subject_valid",
            ),
        ]

    def __str__(self) -> str:
        return (
            f"{self.request_kind} {self.created_at:%Y-%m-%d %H:%M:%S} via {self.variant_version_id}"
        )


# --- rollups (SPEC §10): what reports read, maintained as records land ----------------


class RollupResolution(models.IntegerChoices):
    """Bucket sizes in seconds; ALL is one bucket holding every request."""

    MINUTE = 60, "minute"
    HOUR = 3600, "hour"
    DAY = 86400, "day"
    ALL = 0, "all time"


class LatencyMetric(models.IntegerChoices):
    TTFB = 1, "time to first byte (ms)"
    TOTAL = 2, "total latency (ms)"
    THROUGHPUT = 3, "output tokens per second after the first byte"


class RollupBucket(models.Model):
    """The key every rollup row shares: whose share (``writer``), which bucket, which
    checkpoint, which subject kind."""

    writer = models.IntegerField()
    resolution = models.IntegerField(choices=RollupResolution.choices)
    #: Start of the bucket, in seconds since the epoch (0 for RollupResolution.ALL).
    bucket = models.BigIntegerField()
    variant_version = models.ForeignKey(
        VariantVersion, on_delete=models.CASCADE, related_name="+", db_index=False
    )
    allocation_subject = models.CharField(max_length=16, choices=AllocationSubject.choices)

    class Meta:
        abstract = True


class FirstSeen(models.Model):
    """When a key was first seen, and what an earlier record arriving late (a spool
    replay) moved that from, so its writer can move the count to the right bucket."""

    allocation_subject = models.CharField(max_length=16, choices=AllocationSubject.choices)
    first_seen_at = models.DateTimeField()
    previous_first_seen_at = models.DateTimeField(null=True)
    previous_allocation_subject = models.CharField(
        max_length=16, choices=AllocationSubject.choices, null=True
    )

    class Meta:
        abstract = True


class RequestRollup(RollupBucket):
    """One writer's share of a checkpoint's figures in one time bucket, per subject kind.

    Every gateway process adds to rows of its own ``writer`` id, so writers never wait
    on each other's row locks; a report sums the writers' rows, and ``rollups compact``
    folds them into writer 0. Counts and sums are exact; ``new_*`` count the subjects
    and client request ids first seen in the bucket (experiments/reports/rollups.py).
    """

    # The writer comes last: reports read a checkpoint's range of buckets.
    pk = models.CompositePrimaryKey(
        "variant_version", "resolution", "bucket", "allocation_subject", "writer"
    )
    requests = models.BigIntegerField(default=0)
    errors = models.BigIntegerField(default=0)
    streamed = models.BigIntegerField(default=0)
    status_2xx = models.BigIntegerField(default=0)
    status_3xx = models.BigIntegerField(default=0)
    status_4xx = models.BigIntegerField(default=0)
    status_5xx = models.BigIntegerField(default=0)
    status_other = models.BigIntegerField(default=0)
    input_tokens = models.BigIntegerField(default=0)
    output_tokens = models.BigIntegerField(default=0)
    #: Exact mean and variance of total latency (Welch's interval needs both).
    total_ms_samples = models.BigIntegerField(default=0)
    total_ms_sum = models.BigIntegerField(default=0)
    total_ms_sum_squares = models.DecimalField(max_digits=38, decimal_places=0, default=0)
    new_subjects = models.BigIntegerField(default=0)
    new_slot_subjects = models.BigIntegerField(default=0)
    new_messages = models.BigIntegerField(default=0)
    #: Errors by category (experiments.quality.ERROR_CATEGORIES).
    errors_auth = models.BigIntegerField(default=0)
    errors_rate_limit = models.BigIntegerField(default=0)
    errors_upstream_5xx = models.BigIntegerField(default=0)
    errors_timeout = models.BigIntegerField(default=0)
    errors_client_disconnect = models.BigIntegerField(default=0)
    errors_bad_request = models.BigIntegerField(default=0)
    errors_other = models.BigIntegerField(default=0)
    #: Successful answers by finish reason (experiments.quality.FINISH_REASONS).
    finish_stop = models.BigIntegerField(default=0)
    finish_length = models.BigIntegerField(default=0)
    finish_tool_calls = models.BigIntegerField(default=0)
    finish_content_filter = models.BigIntegerField(default=0)
    finish_other = models.BigIntegerField(default=0)
    first_request_at = models.DateTimeField(null=True)
    last_request_at = models.DateTimeField(null=True)

    class Meta:
        db_table = "model_experiment_rollup"

    def __str__(self) -> str:
        return f"{self.variant_version_id} {self.allocation_subject} {self.bucket}"


class ErrorKindRollup(RollupBucket):
    """Errors by kind (``gateway_usage.error_kind``), bucketed like ``RequestRollup``."""

    pk = models.CompositePrimaryKey(
        "variant_version", "resolution", "bucket", "allocation_subject", "error_kind", "writer"
    )
    error_kind = models.CharField(max_length=64)
    count = models.BigIntegerField(default=0)

    class Meta:
        db_table = "model_experiment_rollup_error"

    def __str__(self) -> str:
        return f"{self.variant_version_id} {self.error_kind} x{self.count}"


class LatencyBin(RollupBucket):
    """One bin of a mergeable log-bucket histogram (DDSketch's logarithmic mapping):
    how many values of ``metric`` fell in bin ``key``, bucketed like ``RequestRollup``."""

    pk = models.CompositePrimaryKey(
        "variant_version",
        "resolution",
        "bucket",
        "allocation_subject",
        "metric",
        "key",
        "writer",
    )
    metric = models.SmallIntegerField(choices=LatencyMetric.choices)
    key = models.IntegerField()
    count = models.BigIntegerField(default=0)

    class Meta:
        db_table = "model_experiment_rollup_bin"

    def __str__(self) -> str:
        return f"{self.variant_version_id} metric {self.metric} bin {self.key} x{self.count}"


class SlotSubject(FirstSeen):
    """Each subject once per slot, with when and on which checkpoint it was first seen:
    the exact population of the sample-ratio check."""

    pk = models.CompositePrimaryKey("variant", "subject_hash")
    variant = models.ForeignKey(Variant, on_delete=models.CASCADE, related_name="+", db_index=False)
    subject_hash = models.UUIDField()
    variant_version = models.ForeignKey(
        VariantVersion, on_delete=models.CASCADE, related_name="+", db_index=False
    )
    previous_variant_version = models.ForeignKey(
        VariantVersion, on_delete=models.CASCADE, related_name="+", null=True, db_index=False
    )

    class Meta:
        db_table = "model_experiment_slot_subject"

    def __str__(self) -> str:
        return f"{self.variant_id} {self.subject_hash}"


class CheckpointSubject(FirstSeen):
    """Each subject once per checkpoint: distinct subjects and users per checkpoint."""

    pk = models.CompositePrimaryKey("variant_version", "subject_hash")
    variant_version = models.ForeignKey(
        VariantVersion, on_delete=models.CASCADE, related_name="+", db_index=False
    )
    subject_hash = models.UUIDField()

    class Meta:
        db_table = "model_experiment_checkpoint_subject"

    def __str__(self) -> str:
        return f"{self.variant_version_id} {self.subject_hash}"


class CheckpointMessage(FirstSeen):
    """Each client request id once per checkpoint and calendar month (UTC), as a hash:
    distinct messages. Per month so that it can be dropped with the raw rows it
    summarises (retention); an id reused in another month counts there again."""

    pk = models.CompositePrimaryKey("month", "variant_version", "message_hash")
    month = models.DateField()
    variant_version = models.ForeignKey(
        VariantVersion, on_delete=models.CASCADE, related_name="+", db_index=False
    )
    message_hash = models.UUIDField()

    class Meta:
        db_table = "model_experiment_checkpoint_message"

    def __str__(self) -> str:
        return f"{self.variant_version_id} {self.message_hash} ({self.month:%Y-%m})"


# --- feedback (SPEC §12) ------------------------------------------------------------


class FeedbackRating(models.TextChoices):
    UP = "up", "Thumbs up"
    DOWN = "down", "Thumbs down"


class FeedbackSource(models.TextChoices):
    API = "api", "POST /v1/feedback"
    CSV = "csv", "CSV upload"


class Feedback(models.Model):
    """What a user said about the answer to one client request id (``X-Kilo-Request``).

    Joined to the checkpoint that served that request (``experiments.feedback``): at
    insert when the attribution row is already there, else by the usage writer when it
    lands (same transaction), and again by ``rollups rebuild``. Several attribution rows
    for one id (retries): the latest successful one serves, else the latest; the
    ``request_*`` columns record which, so every path applies the same rule. Unjoined
    feedback is kept and counts nowhere. Never holds an IP.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    client_request_id = models.TextField()
    rating = models.CharField(max_length=8, choices=FeedbackRating.choices)
    comment = models.TextField(blank=True, default="")
    source = models.CharField(max_length=8, choices=FeedbackSource.choices)
    submitted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    created_at = models.DateTimeField(default=timezone.now)
    #: The checkpoint that served the request; null until its attribution row lands.
    variant_version = models.ForeignKey(
        VariantVersion,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="feedback",
    )
    #: The joined attribution row (no foreign key: raw rows are dropped by retention
    #: while the join stays), its time and whether it succeeded.
    request_usage_id = models.UUIDField(null=True, blank=True)
    request_created_at = models.DateTimeField(null=True, blank=True)
    request_allocation_subject = models.CharField(
        max_length=16, choices=AllocationSubject.choices, null=True, blank=True
    )
    request_ok = models.BooleanField(null=True, blank=True)

    class Meta:
        db_table = "model_experiment_feedback"
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["client_request_id"], name="mx_feedback_client_request_id"),
            # Reports: per checkpoint, by the served request's time.
            models.Index(
                fields=["variant_version", "request_created_at"],
                include=["rating"],
                name="mx_feedback_version_time",
            ),
            # The writers' sweep of recent feedback.
            models.Index(fields=["created_at"], name="mx_feedback_created"),
        ]
        constraints = [
            models.CheckConstraint(
                condition=Q(rating__in=[r.value for r in FeedbackRating]),
                name="model_experiment_feedback_rating_valid",
            ),
            models.CheckConstraint(
                condition=Q(source__in=[s.value for s in FeedbackSource]),
                name="model_experiment_feedback_source_valid",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.rating} on {self.client_request_id}"
