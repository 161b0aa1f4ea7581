"""``manage.py demo`` really serving: the admin (with its static files) under uvicorn and the
demo upstream, started together and stopped together.

The demo runs in a subprocess against its own database (a scratch PostgreSQL database when
DATABASE_URL is PostgreSQL, else an SQLite file), as `bash .ci/demo` would run it, from a
fresh copy of the checkout: only the files git tracks (with their working-tree contents), so
nothing ignored or untracked (var/, collected static files, keys) helps it pass.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import dj_database_url
import httpx
import psycopg
import pytest

ROOT = Path(__file__).resolve().parent.parent
READY_LINE = "demo: ready"
STARTUP_TIMEOUT_SECONDS = 180


def fresh_checkout(target: Path) -> Path:
    """What a fresh clone holds: the tracked files, copied as they are in the working tree
    (so local edits are tested, unlike a ``git clone`` of HEAD)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():  # a tracked file deleted in the working tree is not copied
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def scratch_database(tmp_path: Path) -> Iterator[str]:
    """A DATABASE_URL of an empty database that only the demo subprocess uses."""
    url = os.environ.get("DATABASE_URL", "")
    if not url.startswith(("postgres://", "postgresql://")):
        yield f"sqlite:///{tmp_path / 'demo.sqlite3'}"
        return
    config = dj_database_url.parse(url)
    name = f"{os.environ.get('TEST_DATABASE_NAME') or 'test_mx'}_demo_serving"
    server = {
        "host": config["HOST"] or "127.0.0.1",
        "port": config["PORT"] or 5432,
        "user": config["USER"],
        "password": config["PASSWORD"] or None,
    }
    with psycopg.connect(dbname="postgres", autocommit=True, **server) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield url.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(dbname="postgres", autocommit=True, **server) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class DemoProcess:
    def __init__(
        self, root: Path, env: dict[str, str], port: int, upstream_port: int, state_dir: Path
    ):
        self.port = port
        self.upstream_port = upstream_port
        #: A directory of the test's own, outside the project, to run printed snippets in.
        self.scratch_dir = state_dir.parent
        self.root_url = f"http://127.0.0.1:{port}"
        self.lines: list[str] = []
        self._ready = threading.Event()
        self.process = subprocess.Popen(
            [sys.executable, "manage.py", "demo", "--port", str(port)]
            + ["--upstream-port", str(upstream_port), "--state-dir", str(state_dir)],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            if line.startswith(READY_LINE):
                self._ready.set()
        self._ready.set()

    def wait_ready(self) -> None:
        self._ready.wait(STARTUP_TIMEOUT_SECONDS)
        if self.process.poll() is not None or not any(
            line.startswith(READY_LINE) for line in self.lines
        ):
            raise RuntimeError("demo did not start:\n" + "\n".join(self.lines[-40:]))

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Iterator[DemoProcess]:
    tmp_path = tmp_path_factory.mktemp("demo")
    root = fresh_checkout(tmp_path / "checkout")
    with scratch_database(tmp_path) as database_url:
        env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "CACHE_KEY_PREFIX": os.environ.get("CACHE_KEY_PREFIX", "mx") + "-demo-serving",
            # Without DEBUG, static files come only from collectstatic + whitenoise.
            "DEBUG": "false",
            "PROMPT_STORE_DIR": str(tmp_path / "prompts"),
            "STATIC_ROOT": str(tmp_path / "static"),
            "PYTHONUNBUFFERED": "1",
        }
        env.pop("TEST_DATABASE_NAME", None)
        subprocess.run(
            [sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"],
            cwd=root,
            env=env,
            check=True,
        )
        process = DemoProcess(root, env, free_port(), free_port(), tmp_path / "var")
        try:
            process.wait_ready()
            yield process
        finally:
            process.stop()


def test_demo_serves_the_admin_login_page(demo):
    response = httpx.get(f"{demo.root_url}/admin/login/")
    assert response.status_code == 200
    assert 'name="username"' in response.text


def test_demo_serves_admin_css_from_collected_static_files(demo):
    page = httpx.get(f"{demo.root_url}/admin/login/").text
    stylesheets = re.findall(r'href="([^"]+\.css)"', page)
    assert stylesheets
    for href in stylesheets:
        response = httpx.get(f"{demo.root_url}{href}")
        assert response.status_code == 200, href
        assert response.headers["content-type"].startswith("text/css")


def test_demo_admin_credentials_printed_by_the_demo_log_in(demo):
    [password] = [line.split(":", 1)[1].strip() for line in demo.lines if "password:" in line]
    with httpx.Client(base_url=demo.root_url) as browser:
        login_page = browser.get("/admin/login/")
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', login_page.text)[1]
        response = browser.post(
            "/admin/login/?next=/admin/",
            data={"username": "admin", "password": password, "csrfmiddlewaretoken": token},
            headers={"referer": f"{demo.root_url}/admin/login/"},
        )
        assert response.status_code == 302
        assert browser.get("/admin/").status_code == 200


def test_demo_upstream_runs_and_demands_the_partner_key(demo):
    response = httpx.get(f"http://127.0.0.1:{demo.upstream_port}/v1/models")
    assert response.status_code == 401


def test_demo_printed_curl_goes_through_the_demo_experiment(demo):
    [curl] = [line for line in demo.lines if line.startswith("curl ")]
    completed = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, check=True)
    completion = json.loads(completed.stdout)
    assert completion["model"] == "kilo/preview-demo"
    assert completion["choices"][0]["message"]["content"] == "echo: Hello from the demo"


def printed_snippets(lines: list[str]) -> dict[str, str]:
    """The SDK blocks of the banner, as printed: from a "# ... SDK" line to a blank line."""
    blocks: dict[str, str] = {}
    current: list[str] | None = None
    for line in lines:
        if re.match(r"# (OpenAI|Anthropic) SDK", line):
            current = [line]
            blocks[line] = ""
        elif current is not None and line.strip() == "":
            blocks[current[0]] = "\n".join(current) + "\n"
            current = None
        elif current is not None:
            current.append(line)
    return blocks


@pytest.mark.parametrize(
    ("header", "answer"),
    [
        ("# OpenAI SDK, chat completions (pip install openai)", "echo: Hello from the OpenAI SDK"),
        ("# OpenAI SDK, streaming (pip install openai)", "echo: Hello from a stream"),
        ("# Anthropic SDK, messages (pip install anthropic)", "echo: Hello from the Anthropic SDK"),
    ],
)
def test_demo_printed_sdk_snippets_work_as_printed(demo, header, answer):
    snippet = printed_snippets(demo.lines)[header]
    # Run the way a newcomer pastes it into python3, in a clean directory.
    completed = subprocess.run(
        [sys.executable, "-"],
        input=snippet,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=demo.scratch_dir,
        env={"PATH": os.environ.get("PATH", ""), "HOME": str(demo.scratch_dir)},
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == answer


def test_demo_stops_both_servers_on_sigterm(demo):
    # Runs last in this module: it ends the shared demo.
    assert demo.stop() == 0
    assert not port_answers(demo.port)
    assert not port_answers(demo.upstream_port)
