"""Data-plane records: per-request usage and gateway tokens."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q

from experiments.models import RequestKind


class GatewayUsage(models.Model):
    """One row per gateway request that reached routing (SPEC §2, §9)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    created_at = models.DateTimeField()
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    public_model_id = models.TextField()
    request_kind = models.CharField(max_length=32, choices=RequestKind.choices)
    is_stream = models.BooleanField(default=False)
    status_code = models.PositiveSmallIntegerField()
    has_error = models.BooleanField(default=False)
    error_kind = models.CharField(max_length=64, null=True, blank=True)
    #: experiments.quality.error_category of status and kind (null: no error, or a row
    #: written before categories were recorded).
    error_category = models.CharField(max_length=32, null=True, blank=True)
    #: experiments.quality.FINISH_REASONS (null: the answer reported none).
    finish_reason = models.CharField(max_length=32, null=True, blank=True)
    input_tokens = models.PositiveIntegerField(default=0)
    output_tokens = models.PositiveIntegerField(default=0)
    ttfb_ms = models.PositiveIntegerField(null=True, blank=True)
    total_ms = models.PositiveIntegerField(null=True, blank=True)

    class Meta:
        db_table = "gateway_usage"
        indexes = [
            models.Index(fields=["public_model_id", "created_at"], name="gw_usage_model_created")
        ]
        constraints = [
            models.CheckConstraint(
                condition=Q(request_kind__in=[k.value for k in RequestKind]),
                name="gateway_usage_request_kind_valid",
            )
        ]

    def __str__(self) -> str:
        return f"{self.public_model_id} {self.request_kind} {self.status_code}"


class GatewayToken(models.Model):
    """A client credential for the gateway. Only a SHA-256 of the token is kept."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="gateway_tokens"
    )
    name = models.CharField(max_length=100, blank=True, default="")
    token_prefix = models.CharField(
        max_length=16, help_text="First characters, to tell tokens apart."
    )
    token_sha256 = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "gateway_token"
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.token_prefix}… ({self.user})"
