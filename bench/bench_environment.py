"""Shared set-up for the benchmarks: a dedicated PostgreSQL database and Redis DB, Django ready.

Environment (all optional): BENCH_DATABASE_URL (default postgres://postgres@127.0.0.1:5432/
mx_bench; created and migrated here), BENCH_REDIS_URL (default redis://127.0.0.1:6379/6).
"""

from __future__ import annotations

import base64
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/mx_bench"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/6"
BENCH_PUBLIC_MODEL_ID = "bench/preview"
BENCH_PARTNER_KEY = "sk-bench-partner-key-0b5e"
BENCH_VARIANTS = (("a", "bench-model-a"), ("b", "bench-model-b"))


def configure_environment() -> dict[str, str]:
    """Point this process (and the servers it starts) at the bench database and Redis DB."""
    os.environ["DATABASE_URL"] = os.environ.get("BENCH_DATABASE_URL", DEFAULT_DATABASE_URL)
    os.environ["REDIS_URL"] = os.environ.get("BENCH_REDIS_URL", DEFAULT_REDIS_URL)
    os.environ["CACHE_KEY_PREFIX"] = "mxbench"
    os.environ["DEBUG"] = "false"
    # A server with DEBUG off refuses the development SECRET_KEY (config/startup.py).
    os.environ.setdefault("SECRET_KEY", base64.b64encode(os.urandom(32)).decode())
    os.environ["LOG_LEVEL"] = "WARNING"
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    os.environ.pop("TEST_DATABASE_NAME", None)
    os.environ.pop("GATEWAY_DEFAULT_UPSTREAM_BASE_URL", None)
    if not os.environ.get("BYOK_ENCRYPTION_KEY"):
        os.environ["BYOK_ENCRYPTION_KEY"] = base64.b64encode(os.urandom(32)).decode()
    os.environ.setdefault("PROMPT_STORE_DIR", str(ROOT / "var" / "bench-prompts"))
    return dict(os.environ)


def create_database() -> None:
    """Create the bench database if missing (PostgreSQL only) and migrate it."""
    import dj_database_url

    url = os.environ["DATABASE_URL"]
    if url.startswith(("postgres://", "postgresql://")):
        import psycopg

        config = dj_database_url.parse(url)
        server = {
            "host": config["HOST"] or "127.0.0.1",
            "port": config["PORT"] or 5432,
            "user": config["USER"],
            "password": config["PASSWORD"] or None,
        }
        with psycopg.connect(dbname="postgres", autocommit=True, **server) as admin:
            exists = admin.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (config["NAME"],)
            ).fetchone()
            if not exists:
                admin.execute(f'CREATE DATABASE "{config["NAME"]}"')
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"], cwd=ROOT, check=True
    )


def setup_django() -> None:
    import django

    django.setup()


def seed_bench_experiment(upstream_base_url: str, *, response_capture_rate: str = "0"):
    """The active bench experiment (two variants on ``upstream_base_url``), fresh every run,
    capturing the answers of ``response_capture_rate`` percent of requests."""
    from experiments import services
    from experiments.models import Experiment, ExperimentStatus

    for old in Experiment.objects.filter(public_model_id=BENCH_PUBLIC_MODEL_ID).exclude(
        status=ExperimentStatus.COMPLETED
    ):
        if old.status == ExperimentStatus.DRAFT:
            services.delete_experiment(experiment=old)
        else:
            services.complete(experiment=old)
    experiment = services.create_experiment(
        public_model_id=BENCH_PUBLIC_MODEL_ID,
        name=f"bench {datetime.now(UTC):%Y-%m-%d %H:%M}",
        response_capture_rate=response_capture_rate,
    )
    for label, internal_id in BENCH_VARIANTS:
        variant = services.add_variant(experiment=experiment, label=label, weight=1)
        services.hot_swap(
            variant=variant,
            upstream={"internal_id": internal_id, "base_url": upstream_base_url},
            api_key=BENCH_PARTNER_KEY,
        )
    return services.activate(experiment=experiment)


def machine_description() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} CPUs (nproc), {model}; Python {platform.python_version()}; "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
    )


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
