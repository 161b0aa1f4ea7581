"""Bytes stored for a simulated 50-turn agent session: whole bodies vs message-level parts.

Run: /work/venv/bin/python bench/bench_prompt_store.py

Each turn resends the whole conversation (a 100 KB system prompt, then the
growing history): a user/tool message of ~2 KB and an assistant reply of ~600
bytes per turn. Both layouts write real blobs to a temporary folder through the
store; the figures are the bytes on disk (blob sizes), each as a ratio of the
final request's canonical size. Target: message-level ≤ 1.5x.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

import django  # noqa: E402

django.setup()

from experiments.prompts.store import (  # noqa: E402
    PART_NAMESPACE,
    REQUEST_NAMESPACE,
    LocalPromptStore,
    canonical_body,
)

TURNS = 50
SYSTEM_PROMPT_BYTES = 100 * 1024


def deterministic_text(seed: str, size: int) -> str:
    """Readable-ish words from a hash chain: the same every run, not compressible to nothing."""
    words = []
    state = seed.encode()
    length = 0
    while length < size:
        state = hashlib.sha256(state).digest()
        word = state.hex()[: 3 + state[0] % 8]
        words.append(word)
        length += len(word) + 1
    return " ".join(words)[:size]


def session_bodies() -> list[dict]:
    system = deterministic_text("system", SYSTEM_PROMPT_BYTES)
    messages: list[dict] = [{"role": "system", "content": system}]
    bodies = []
    for turn in range(TURNS):
        messages.append(
            {
                "role": "user" if turn == 0 else "tool",
                "content": deterministic_text(f"tool-{turn}", 2000),
                **({} if turn == 0 else {"tool_call_id": f"call_{turn - 1}"}),
            }
        )
        bodies.append({"model": "kilo/preview-foo", "stream": True, "messages": list(messages)})
        messages.append(
            {
                "role": "assistant",
                "content": deterministic_text(f"assistant-{turn}", 400),
                "tool_calls": [
                    {
                        "id": f"call_{turn}",
                        "type": "function",
                        "function": {
                            "name": "read_file",
                            "arguments": f'{{"path":"src/{turn}.py"}}',
                        },
                    }
                ],
            }
        )
    return bodies


def stored_bytes(store: LocalPromptStore) -> tuple[int, int, int]:
    requests = sum(blob.size for blob in store.backend.list(REQUEST_NAMESPACE))
    parts = sum(blob.size for blob in store.backend.list(PART_NAMESPACE))
    count = sum(1 for _ in store.backend.list(PART_NAMESPACE))
    return requests, parts, count


def main() -> None:
    bodies = session_bodies()
    canonicals = [canonical_body(body)[0] for body in bodies]
    final_size = len(canonicals[-1])
    sent = sum(len(c) for c in canonicals)
    print(f"session: {TURNS} turns, system prompt {SYSTEM_PROMPT_BYTES // 1024} KiB")
    print(f"final request: {final_size:,} bytes; all requests sent: {sent:,} bytes")
    for label, dedupe in (("whole-body", False), ("message-level", True)):
        with tempfile.TemporaryDirectory() as root:
            store = LocalPromptStore(Path(root), dedupe_messages=dedupe)
            digests = [store.put(canonical) for canonical in canonicals]
            assert all(store.get(d) == c for d, c in zip(digests, canonicals, strict=True))
            requests, parts, part_count = stored_bytes(store)
            total = requests + parts
            print(
                f"{label:>13}: {total:>12,} bytes = {total / final_size:6.2f}x final request"
                f"  (request blobs {requests:,}, parts {parts:,} in {part_count} blobs)"
            )


if __name__ == "__main__":
    main()
