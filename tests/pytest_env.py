"""Loaded with ``-p`` before Django reads its settings: test-only environment defaults.

Subprocesses started by tests (the ASGI server) inherit these too.
"""

import atexit
import os
import shutil
import tempfile

TEST_ENCRYPTION_KEY = "q2V4cGVyaW1lbnRzLXRlc3Qta2V5LTMyLWJ5dGVzISE="
os.environ.setdefault("BYOK_ENCRYPTION_KEY", TEST_ENCRYPTION_KEY)
# Servers refuse the development SECRET_KEY with DEBUG off (config/startup.py); the
# gateway subprocesses of the tests run with DEBUG off, as in production.
os.environ.setdefault("SECRET_KEY", "test-only-secret-key-not-for-any-deployment-7c1d")
if "GATEWAY_SPOOL_DIR" not in os.environ:
    # In-process usage writers spool into a folder of this run, never the checkout's var/.
    os.environ["GATEWAY_SPOOL_DIR"] = tempfile.mkdtemp(prefix="mx-test-spool-")
    atexit.register(shutil.rmtree, os.environ["GATEWAY_SPOOL_DIR"], ignore_errors=True)
