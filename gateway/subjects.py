"""The allocation subject of a request (SPEC §7 step 1, §8 client IP)."""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings

from experiments.models import AllocationSubject

MAX_MACHINE_ID_LENGTH = 256


@dataclass(frozen=True)
class Subject:
    kind: str  # AllocationSubject value
    value: str


def client_ip(request) -> str | None:
    """REMOTE_ADDR, or the Nth address from the right of X-Forwarded-For behind N proxies."""
    trusted = settings.GATEWAY_TRUSTED_PROXIES
    if trusted > 0:
        forwarded = [
            part.strip()
            for part in request.headers.get("x-forwarded-for", "").split(",")
            if part.strip()
        ]
        if len(forwarded) >= trusted:
            return forwarded[-trusted]
    return request.META.get("REMOTE_ADDR") or None


def allocation_subject(request, user_id: int | None) -> Subject | None:
    """Authenticated user, then machine id header, then client IP; None if none is present."""
    if user_id is not None:
        return Subject(AllocationSubject.USER.value, str(user_id))
    machine = request.headers.get("x-kilocode-machineid", "").strip()
    if machine and len(machine) <= MAX_MACHINE_ID_LENGTH:
        return Subject(AllocationSubject.MACHINE.value, machine)
    ip = client_ip(request)
    if ip:
        return Subject(AllocationSubject.IP.value, ip)
    return None
