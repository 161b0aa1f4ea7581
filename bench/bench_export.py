"""Export benchmark on PostgreSQL: what ``experiment_export --samples N`` costs.

Seeds ``--rows`` attributed requests (bench_reports' seed: two slots, three
checkpoints, a hot-swap) in its own database, rebuilds the rollups, then times:

* choosing the samples: the bottom-k scan over every successful request of each
  checkpoint (the part that grows with the table);
* the whole export with ``--samples N``, after the chosen requests' prompts were put in a
  temporary prompt store (a ~20 KB conversation each, with addresses, keys and phone
  numbers for the redactor to find);
* the redactor alone, in MB of prompt text per second.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \\
        python bench/bench_export.py [--rows 1000000] [--samples 100]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_reports  # noqa: E402

BENCH_DATABASE = "mx_bench_export"


def conversation(index: int) -> dict:
    turn = (
        f"Turn {index}: please review the deploy log; ping ops-{index}@example.com or call "
        f"+1 415 555 {index % 10000:04d}; the box is 10.{index % 250}.3.7 and the token is "
        f"sk-proj-{index:08d}abcdefghijklmnopqrstuv. Version 1.2.3.4.5 shipped at "
        "2025-01-31T12:00:00Z. " + "The quick brown fox jumps over the lazy dog. " * 20
    )
    return {
        "model": "rc-alpha-1",
        "messages": [{"role": "system", "content": "You are terse. " * 40}]
        + [{"role": "user" if n % 2 else "assistant", "content": turn} for n in range(16)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--keep", action="store_true", help="keep the bench database")
    args = parser.parse_args()
    started = time.perf_counter()
    url = bench_reports.server_url()
    bench_reports.BENCH_DATABASE = BENCH_DATABASE
    os.environ["DATABASE_URL"] = bench_reports.with_database(url, BENCH_DATABASE)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    prompts = tempfile.TemporaryDirectory(prefix="bench-export-prompts-")
    os.environ["PROMPT_STORE_DIR"] = prompts.name
    os.environ["PROMPT_STORE_BACKEND"] = "local"
    from experiments import crypto

    os.environ.setdefault("BYOK_ENCRYPTION_KEY", crypto.generate_key())
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection

    from experiments.export.bundle import choose_samples
    from experiments.export.redact import Redactor
    from experiments.models import ExperimentRequest
    from experiments.prompts.store import capture_prompt
    from experiments.reports import rollups
    from experiments.reports.report import experiment_report

    bench_reports.recreate_database(url)
    try:
        call_command("migrate", verbosity=0)
        experiment = bench_reports.seed(args.rows, started)
        rollups.rebuild()
        with connection.cursor() as cursor:
            cursor.execute("VACUUM ANALYZE")
        bench_reports.say("rollups rebuilt", started)
        report = experiment_report(experiment)

        began = time.perf_counter()
        chosen = [
            choose_samples(
                c.version_id, report, args.samples, 7, with_answers=False, scanned=lambda n: None
            )
            for c in report.checkpoints
        ]
        choose_s = time.perf_counter() - began
        scanned = ExperimentRequest.objects.filter(has_error=False).count()
        bench_reports.say(f"chose samples in {choose_s:.1f} s", started)

        prompt_bytes = 0
        for index, usage_id in enumerate(u for ids in chosen for u in ids):
            sha256, _ = capture_prompt(conversation(index))
            prompt_bytes += len(json.dumps(conversation(index)))
            ExperimentRequest.objects.filter(usage_id=usage_id).update(request_body_sha256=sha256)

        with tempfile.TemporaryDirectory(prefix="bench-export-out-") as parent:
            out = Path(parent) / "bundle"
            began = time.perf_counter()
            call_command(
                "experiment_export",
                str(experiment.pk),
                "--out",
                str(out),
                "--samples",
                str(args.samples),
                "--seed",
                "7",
                stdout=io.StringIO(),
                stderr=io.StringIO(),
            )
            export_s = time.perf_counter() - began
            bundle_bytes = sum(p.stat().st_size for p in out.iterdir())

        def redactor_mb_s(text: str, rounds: int = 20) -> float:
            began = time.perf_counter()
            for _ in range(rounds):
                Redactor().text(text)
            return len(text.encode()) * rounds / (time.perf_counter() - began) / 1e6

        redact_mb_s = redactor_mb_s(
            " ".join(m["content"] for m in conversation(1)["messages"]) * 10
        )
        plain_mb_s = redactor_mb_s("The quick brown fox jumps over the lazy dog, v2.0. " * 4000)

        # Inputs shaped to make a careless pattern backtrack (long dotted, colon, digit runs).
        rates = []
        for hostile in ("a@" + "a." * 100_000, "a:/" * 100_000, "1." * 100_000, "(555) " * 30_000):
            began = time.perf_counter()
            Redactor().text(hostile)
            rates.append(len(hostile) / (time.perf_counter() - began) / 1e6)
        worst_mb_s = min(rates)

        samples = sum(len(ids) for ids in chosen)
        print()
        print(f"rows (attributed requests)              {args.rows:>14,}")
        print(f"successful rows scanned                 {scanned:>14,}")
        print(f"checkpoints                             {len(chosen):>14}")
        print(f"choose samples (bottom-k scan)          {choose_s:>12.2f} s")
        print(f"  per million rows scanned              {choose_s / scanned * 1e6:>12.2f} s")
        print(f"whole export, {samples} samples            {export_s:>12.2f} s")
        print(f"  sampled prompt text                   {prompt_bytes / 1e6:>12.1f} MB")
        print(f"  bundle size                           {bundle_bytes / 1e6:>12.1f} MB")
        print(f"redactor, text full of PII              {redact_mb_s:>12.1f} MB/s")
        print(f"redactor, plain prose                   {plain_mb_s:>12.1f} MB/s")
        print(f"redactor, slowest hostile input         {worst_mb_s:>12.1f} MB/s")
    finally:
        from django.db import connections

        connections.close_all()
        prompts.cleanup()
        if not args.keep:
            bench_reports.drop_database(url)


if __name__ == "__main__":
    main()
