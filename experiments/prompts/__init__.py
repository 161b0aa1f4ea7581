"""The prompt store (SPEC §9): content-addressed blobs of the bodies sent upstream
(``store``), and their wipe and garbage collection (``maintenance``). The gateway
captures prompts through ``store.capture_prompt``; reports read them back."""
