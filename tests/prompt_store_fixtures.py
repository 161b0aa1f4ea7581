"""Fixtures shared by the prompt store tests: a real S3 API on loopback (moto server mode)."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from experiments.prompts.store import LocalPromptStore, PromptStore, S3PromptStore

S3_CREDENTIALS = {"access_key_id": "test-access-key", "secret_access_key": "test-secret-key"}


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def make_s3_store(endpoint: str, **options) -> S3PromptStore:
    bucket = f"prompts-{uuid.uuid4().hex[:12]}"
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=S3_CREDENTIALS["access_key_id"],
        aws_secret_access_key=S3_CREDENTIALS["secret_access_key"],
    ).create_bucket(Bucket=bucket)
    return S3PromptStore(
        bucket=bucket,
        endpoint_url=endpoint,
        region="us-east-1",
        prefix="prompts/",
        **S3_CREDENTIALS,
        **options,
    )


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path: Path) -> PromptStore:
    if request.param == "local":
        return LocalPromptStore(tmp_path / "prompts")
    return make_s3_store(request.getfixturevalue("moto_endpoint"))


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def age_local_blobs(root: Path, *, hours: float) -> None:
    """Move every blob's modification time into the past (what GC measures)."""
    past = time.time() - hours * 3600
    for path in root.rglob("*"):
        if path.is_file():
            os.utime(path, (past, past))
