"""What maintaining the rollups costs the gateway: two gateway processes under load, with
and without the rollup upkeep, in one run.

Run from the repository root (PostgreSQL and Redis as for bench_gateway.py):

    python bench/bench_rollup_cost.py [--rounds 5] [--requests 4000] [--concurrency 4 32]

"with": this checkout as it is. "without": the same code (this commit plus any uncommitted
changes, in a temporary ``git worktree``) with the one call that maintains the rollups,
``record_requests(attributions)`` in ``gateway/usage.py``, removed by the bench; production
has no such switch. Everything else (spool, usage and attribution inserts, RETURNING) is
identical, so the difference is the upkeep alone.

Each side has its own database (same schema) and two uvicorn gateway processes
(``config.asgi:application``, as bench_gateway.py starts one), both sides in front of the
same demo upstream. Rounds alternate the sides (the first side alternates too), so load
from other jobs on the machine hits both alike. In a round a side gets ``--requests``
non-streaming requests, half to each process, from ``concurrency / 2`` keep-alive
connections each. Gateway CPU = utime + stime of both processes from /proc, read after every
usage and attribution row of the round is in the database; PostgreSQL CPU likewise, of the
backends connected to the side's database (the writers' connections persist through a run).

Target (issue 8): extra gateway CPU per request for maintaining the rollups <= 0.1 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_environment import (
    BENCH_PARTNER_KEY,
    BENCH_PUBLIC_MODEL_ID,
    ROOT,
    configure_environment,
    machine_description,
    progress,
)
from bench_gateway import MESSAGES, cpu_seconds, free_port, stop, wait_listening
from http_load import run_load

TARGET_EXTRA_CPU_MS = 0.1
UPKEEP_CALL = "            record_requests(attributions)\n"
SIDES = ("with", "without")


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout


def checkout_without_upkeep(parent: Path) -> Path:
    """This commit plus the working tree's changes, minus the rollup upkeep call."""
    where = parent / "without-upkeep"
    git("worktree", "add", "--detach", str(where), "HEAD")
    diff = git("diff", "HEAD", "--binary")
    if diff.strip():
        subprocess.run(["git", "apply"], cwd=where, input=diff, text=True, check=True)
    usage = where / "gateway" / "usage.py"
    source = usage.read_text()
    if source.count(UPKEEP_CALL) != 1:
        raise SystemExit(f"cannot find the rollup upkeep call once in {usage}")
    usage.write_text(source.replace(UPKEEP_CALL, "            pass  # bench: no rollup upkeep\n"))
    return where


def remove_checkout(where: Path) -> None:
    subprocess.run(["git", "worktree", "remove", "--force", str(where)], cwd=ROOT, check=False)


def database_url(name: str) -> str:
    base = os.environ.get("BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/mx_bench")
    return base.rsplit("/", 1)[0] + "/" + name


def recreate_database(url: str) -> None:
    import psycopg

    server, name = url.rsplit("/", 1)
    with psycopg.connect(server + "/postgres", autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')


def drop_database(url: str) -> None:
    import psycopg

    server, name = url.rsplit("/", 1)
    with psycopg.connect(server + "/postgres", autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


SEED = (
    "import sys; sys.path.insert(0, 'bench'); "
    "from bench_environment import setup_django, seed_bench_experiment; "
    "setup_django(); seed_bench_experiment(sys.argv[1])"
)


class Side:
    """One side: its checkout, database and two gateway processes."""

    def __init__(self, name: str, checkout: Path, env: dict[str, str], scratch: Path) -> None:
        self.name = name
        self.checkout = checkout
        self.url = database_url(f"mx_bench_rollup_cost_{name}")
        self.env = {
            **env,
            "DATABASE_URL": self.url,
            "CACHE_KEY_PREFIX": f"mxrollupcost{name}",
            "GATEWAY_SPOOL_DIR": str(scratch / f"spool-{name}"),
            "PROMPT_STORE_DIR": str(scratch / f"prompts-{name}"),
            # The writers keep their connection through the run (PostgreSQL CPU is read
            # from the backends that are there).
            "DATABASE_CONN_MAX_AGE": "3600",
        }
        self.processes: list[subprocess.Popen] = []
        self.ports: list[int] = []
        self.database = None

    def prepare(self, upstream_port: int) -> None:
        recreate_database(self.url)
        run = {"cwd": self.checkout, "env": self.env, "check": True}
        subprocess.run([sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"], **run)
        base_url = f"http://127.0.0.1:{upstream_port}/v1"
        subprocess.run([sys.executable, "-c", SEED, base_url], **run)

    def start(self, processes: int = 2) -> None:
        for _ in range(processes):
            port = free_port()
            process = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "config.asgi:application", "--host"]
                + ["127.0.0.1", "--port", str(port), "--no-access-log", "--log-level", "warning"],
                cwd=self.checkout,
                env=self.env,
            )
            self.processes.append(process)
            self.ports.append(port)
        for port, process in zip(self.ports, self.processes, strict=True):
            wait_listening(port, process, f"gateway ({self.name})")
        import psycopg

        self.database = psycopg.connect(self.url, autocommit=True)

    def stop(self) -> None:
        for process in self.processes:
            stop(process)
        if self.database is not None:
            self.database.close()

    def gateway_cpu(self) -> float:
        return sum(cpu_seconds(process.pid) for process in self.processes)

    def backend_cpu(self) -> dict[int, float]:
        pids = self.database.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()"
        ).fetchall()
        found = {}
        for (pid,) in pids:
            with contextlib.suppress(OSError):  # gone meanwhile
                found[pid] = cpu_seconds(pid)
        return found

    def rows(self) -> int:
        return self.database.execute("SELECT count(*) FROM model_experiment_request").fetchone()[0]

    def wait_rows(self, expected: int) -> None:
        deadline = time.monotonic() + 120
        while (rows := self.rows()) < expected:
            if time.monotonic() > deadline:
                raise SystemExit(f"{self.name}: attribution rows stuck at {rows} of {expected}")
            time.sleep(0.05)

    async def load(self, total: int, concurrency: int) -> float:
        def make(index: int):
            body = {"model": BENCH_PUBLIC_MODEL_ID, "messages": MESSAGES}
            return body, {"X-KiloCode-MachineId": f"bench-machine-{index % 4096}"}

        per_process = max(1, concurrency // len(self.ports))
        began = time.perf_counter()
        outcomes = await asyncio.gather(
            *(
                run_load(
                    "127.0.0.1",
                    port,
                    "/v1/chat/completions",
                    make,
                    total=total // len(self.ports),
                    concurrency=per_process,
                )
                for port in self.ports
            )
        )
        wall = time.perf_counter() - began
        failed = [r.status for results, _ in outcomes for r in results if r.status != 200]
        if failed:
            raise SystemExit(f"{self.name}: {len(failed)} non-200 answers, e.g. {failed[:5]}")
        return wall

    async def round(self, total: int, concurrency: int) -> dict[str, float]:
        """One measured round: CPU ms per request of the gateways and of PostgreSQL."""
        expected = self.rows() + total // len(self.ports) * len(self.ports)
        gateway_before = self.gateway_cpu()
        backends_before = self.backend_cpu()
        wall = await self.load(total, concurrency)
        self.wait_rows(expected)
        gateway = self.gateway_cpu() - gateway_before
        backends = self.backend_cpu()
        database = sum(cpu - backends_before.get(pid, 0.0) for pid, cpu in backends.items())
        count = total // len(self.ports) * len(self.ports)
        return {
            "gateway_ms": gateway / count * 1000,
            "database_ms": database / count * 1000,
            "rps": count / wall,
        }


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


async def measure(sides: dict[str, Side], rounds: int, total: int, concurrencies) -> list[dict]:
    results = []
    for concurrency in concurrencies:
        progress(f"concurrency {concurrency}: warm-up")
        for side in sides.values():
            await side.load(min(total, 1000), concurrency)
        per_round: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
        loads = []
        for number in range(rounds):
            order = SIDES if number % 2 == 0 else SIDES[::-1]
            for name in order:
                progress(
                    f"concurrency {concurrency}: round {number + 1}/{rounds}, {name} upkeep, "
                    f"{total} requests (load {load_average()})"
                )
                per_round[name].append(await sides[name].round(total, concurrency))
            loads.append(float(load_average().split()[0]))
        results.append(
            {"concurrency": concurrency, "rounds": per_round, "load": statistics.median(loads)}
        )
    return results


def report(results: list[dict], total: int, describe: str, loads: tuple[str, str]) -> str:
    lines = [
        f"Rollup upkeep: gateway CPU per request, two gateway processes a side  ({describe})",
        f"Load average (1, 5, 15 min) at start: {loads[0]}; at end: {loads[1]}. "
        f"{total} non-streaming requests per side per round, sides alternating.",
        "",
        "| concurrency (both processes) | side | gateway CPU/req, median (rounds) | "
        "PostgreSQL CPU/req, median | req/s, median | median load (1 min) |",
        "|---|---|---|---|---|---|",
    ]
    verdicts = []
    for row in results:
        medians = {}
        for name in SIDES:
            rounds = row["rounds"][name]
            gateway = [r["gateway_ms"] for r in rounds]
            medians[name] = statistics.median(gateway)
            lines.append(
                f"| {row['concurrency']} | {name} upkeep | {medians[name]:.3f} ms "
                f"({' '.join(f'{g:.3f}' for g in gateway)}) | "
                f"{statistics.median(r['database_ms'] for r in rounds):.3f} ms | "
                f"{statistics.median(r['rps'] for r in rounds):.0f} | {row['load']:.1f} |"
            )
        # Paired: each round's "with" against the "without" run next to it.
        paired = [
            w["gateway_ms"] - o["gateway_ms"]
            for w, o in zip(row["rounds"]["with"], row["rounds"]["without"], strict=True)
        ]
        extra = statistics.median(paired)
        database = statistics.median(
            w["database_ms"] - o["database_ms"]
            for w, o in zip(row["rounds"]["with"], row["rounds"]["without"], strict=True)
        )
        verdicts.append(
            f"Concurrency {row['concurrency']}: extra gateway CPU per request for the rollups "
            f"{extra:+.3f} ms (median of the rounds' paired differences "
            f"{' '.join(f'{p:+.3f}' for p in paired)}; difference of medians "
            f"{medians['with'] - medians['without']:+.3f} ms); target <= "
            f"{TARGET_EXTRA_CPU_MS} ms: {'meets' if extra <= TARGET_EXTRA_CPU_MS else 'MISSES'}. "
            f"Extra PostgreSQL CPU per request {database:+.3f} ms."
        )
    return "\n".join([*lines, "", *verdicts])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=4000, help="per side per round")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[4, 32])
    parser.add_argument("--keep", action="store_true", help="keep the two bench databases")
    args = parser.parse_args()
    env = configure_environment()
    loads_start = load_average()
    scratch = Path(tempfile.mkdtemp(prefix="bench-rollup-cost-"))
    without = checkout_without_upkeep(scratch)
    sides = {
        "with": Side("with", ROOT, env, scratch),
        "without": Side("without", without, env, scratch),
    }
    upstream_port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, "manage.py", "run_demo_upstream", "--port", str(upstream_port)]
        + ["--api-key-env", "BENCH_PARTNER_KEY"],
        cwd=ROOT,
        env={**env, "BENCH_PARTNER_KEY": BENCH_PARTNER_KEY},
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_listening(upstream_port, upstream, "demo upstream")
        for side in sides.values():
            progress(
                f"{side.name} upkeep: database {side.url.rsplit('/', 1)[1]}, checkout "
                f"{side.checkout}"
            )
            side.prepare(upstream_port)
            side.start()
        results = asyncio.run(measure(sides, args.rounds, args.requests, args.concurrency))
    finally:
        for side in sides.values():
            side.stop()
        stop(upstream)
        remove_checkout(without)
        if not args.keep:
            for side in sides.values():
                drop_database(side.url)
        shutil.rmtree(scratch, ignore_errors=True)
    commit = git("rev-parse", "--short", "HEAD").strip()
    dirty = " (plus uncommitted changes)" if git("status", "--porcelain").strip() else ""
    print()
    print(
        report(
            results,
            args.requests,
            f"{machine_description()}; commit {commit}{dirty}",
            (loads_start, load_average()),
        )
    )


if __name__ == "__main__":
    main()
