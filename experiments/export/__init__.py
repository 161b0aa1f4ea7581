"""Provider-safe export bundles (issue 10): ``bundle`` writes a folder with the report,
redacted samples and a manifest of hashes, all or nothing; ``redact`` is the redactor
every sampled text passes through."""
