"""What a checkpoint connection test is given and gives back.

``experiments`` never imports ``gateway``: the services call the checker named by
``settings.CHECKPOINT_CHECKER`` (the gateway's, by default) with a ``CheckpointProbe``
and store the ``CheckOutcome`` it returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class CheckpointProbe:
    #: The id clients call: the checker blinds the partner's error text with it.
    public_model_id: str
    #: The checkpoint's validated upstream configuration (never holds a key).
    upstream: dict[str, Any]
    #: The decrypted partner key; kept out of the repr so it never reaches a log.
    api_key: str = field(repr=False)


@dataclass(frozen=True)
class CheckOutcome:
    ok: bool
    #: The partner's HTTP status; None when it never answered.
    status_code: int | None
    latency_ms: int | None
    #: Why it failed, blinded and scrubbed of the key; empty when it passed.
    reason: str = ""


class CheckpointChecker(Protocol):
    def __call__(self, probe: CheckpointProbe) -> CheckOutcome: ...
