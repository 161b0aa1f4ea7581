"""``manage.py demo``: seed a demo admin and experiment, then serve the admin, the gateway and a
local partner upstream together (what ``bash .ci/demo`` ends with).

Seeding is idempotent: a second run finds the admin and the experiment and only repairs what
drifted (a different upstream port, a partner key that no longer decrypts).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from experiments import crypto, selectors, services
from experiments.models import ROUTING_STATUSES, Experiment, ExperimentStatus, VariantVersion
from experiments.upstream import validate_upstream
from gateway.models import GatewayToken
from gateway.tokens import create_token, hash_token

DEMO_PUBLIC_MODEL_ID = "kilo/preview-demo"
DEMO_EXPERIMENT_NAME = "Demo: preview rc1 vs rc2"
DEMO_VARIANTS = (("rc1", "demo-model-rc1"), ("rc2", "demo-model-rc2"))
ADMIN_USERNAME = "admin"
ADMIN_PASSWORD_ENV = "DEMO_ADMIN_PASSWORD"  # noqa: S105 (a variable name)
ADMIN_PASSWORD_FILE = "demo-admin-password"  # noqa: S105 (a file name)
PARTNER_KEY_FILE = "demo-partner-key"
#: The demo gateway token, kept so every run prints the same working snippets.
GATEWAY_TOKEN_FILE = "demo-gateway-token"  # noqa: S105 (a file name)
#: Who the demo token belongs to: SDK requests are recorded and bucketed as this user.
DEMO_CLIENT_USERNAME = "demo-client"
# The demo upstream reads the partner key from this variable (never from its command line).
PARTNER_KEY_ENV = "DEMO_PARTNER_API_KEY"
READY_TIMEOUT_SECONDS = 60
STOP_TIMEOUT_SECONDS = 10


def _read_or_create_secret(path: Path, make: Any) -> tuple[str, bool]:
    """The secret stored at ``path``, created (mode 600) on first use. Returns (value, created)."""
    if path.exists():
        value = path.read_text().strip()
        if value:
            return value, False
    value = make()
    _write_secret(path, value)
    return value, True


def _write_secret(path: Path, value: str) -> None:
    """Write ``value`` to ``path``, readable by this user only (mode 600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(value + "\n")


def ensure_admin(state_dir: Path) -> tuple[str, str | None]:
    """Create the demo superuser once. Returns (username, password or None when unknown)."""
    User = get_user_model()
    from_env = os.environ.get(ADMIN_PASSWORD_ENV, "").strip()
    user = User.objects.filter(username=ADMIN_USERNAME).first()
    if from_env:
        password = from_env
    elif user is None or (state_dir / ADMIN_PASSWORD_FILE).exists():
        password, _ = _read_or_create_secret(
            state_dir / ADMIN_PASSWORD_FILE, lambda: secrets.token_urlsafe(12)
        )
    else:
        # An admin made by someone else, with a password we never knew: leave it alone.
        return ADMIN_USERNAME, None
    if user is None:
        User.objects.create_superuser(ADMIN_USERNAME, "admin@example.com", password)
    elif from_env and not user.check_password(password):
        user.set_password(password)
        user.save(update_fields=["password"])
    return ADMIN_USERNAME, password


def ensure_demo_token(state_dir: Path) -> str:
    """The demo gateway token: the stored one while it still works, else a new one."""
    path = state_dir / GATEWAY_TOKEN_FILE
    stored = path.read_text().strip() if path.exists() else ""
    if (
        stored
        and GatewayToken.objects.filter(
            token_sha256=hash_token(stored), revoked_at__isnull=True, user__is_active=True
        ).exists()
    ):
        return stored
    User = get_user_model()
    user, created = User.objects.get_or_create(
        username=DEMO_CLIENT_USERNAME, defaults={"first_name": "Demo SDK client"}
    )
    if created:
        user.set_unusable_password()  # a token holder, never an admin login
        user.save(update_fields=["password"])
    _, plaintext = create_token(user=user, name="demo")
    _write_secret(path, plaintext)
    return plaintext


def sdk_snippets(root: str, token: str) -> list[str]:
    """Python the demo prints for the official SDKs, each block runnable as printed."""
    model = DEMO_PUBLIC_MODEL_ID
    return [
        "# OpenAI SDK, chat completions (pip install openai)",
        "from openai import OpenAI",
        f'client = OpenAI(base_url="{root}/v1", api_key="{token}")',
        "reply = client.chat.completions.create(",
        f'    model="{model}",',
        '    messages=[{"role": "user", "content": "Hello from the OpenAI SDK"}],',
        ")",
        "print(reply.choices[0].message.content)",
        "",
        "# OpenAI SDK, streaming (pip install openai)",
        "from openai import OpenAI",
        f'client = OpenAI(base_url="{root}/v1", api_key="{token}")',
        "stream = client.chat.completions.create(",
        f'    model="{model}",',
        '    messages=[{"role": "user", "content": "Hello from a stream"}],',
        "    stream=True,",
        ")",
        "for chunk in stream:",
        "    if chunk.choices and chunk.choices[0].delta.content:",
        '        print(chunk.choices[0].delta.content, end="", flush=True)',
        "print()",
        "",
        "# Anthropic SDK, messages (pip install anthropic)",
        "from anthropic import Anthropic",
        f'client = Anthropic(base_url="{root}", api_key="{token}")',
        "message = client.messages.create(",
        f'    model="{model}",',
        "    max_tokens=256,",
        '    messages=[{"role": "user", "content": "Hello from the Anthropic SDK"}],',
        ")",
        "print(message.content[0].text)",
    ]


def demo_upstream_config(internal_id: str, upstream_port: int) -> dict[str, Any]:
    # The demo upstream speaks every API family, so no provider/adapter hint is needed.
    return {"internal_id": internal_id, "base_url": f"http://127.0.0.1:{upstream_port}/v1"}


def _key_matches(version: VariantVersion | None, partner_key: str) -> bool:
    if version is None:
        return False
    try:
        return crypto.decrypt_api_key(version.encrypted_api_key) == partner_key
    except Exception:
        # Any decryption failure (other encryption key, damaged envelope) means: re-key.
        return False


def ensure_demo_experiment(*, upstream_port: int, partner_key: str) -> tuple[Experiment, list[str]]:
    """The demo experiment, created or repaired through the lifecycle services.

    Returns the experiment and what was done, as lines for the operator.
    """
    actions: list[str] = []
    experiment = (
        Experiment.objects.filter(public_model_id=DEMO_PUBLIC_MODEL_ID)
        .exclude(status=ExperimentStatus.COMPLETED)
        .order_by("-created_at")
        .first()
    )
    if experiment is None:
        experiment = services.create_experiment(
            public_model_id=DEMO_PUBLIC_MODEL_ID,
            name=DEMO_EXPERIMENT_NAME,
            description="Two checkpoints of the local demo upstream, weights 1:1.",
        )
        actions.append(f"created experiment {DEMO_PUBLIC_MODEL_ID}")

    variants = {variant.label: variant for variant in experiment.variants.all()}
    for label, _ in DEMO_VARIANTS:
        if label not in variants:
            if experiment.status != ExperimentStatus.DRAFT:
                raise CommandError(
                    f"The demo experiment is {experiment.status} and has no variant {label!r}; "
                    "complete it in the admin and run the demo again to get a fresh one."
                )
            variants[label] = services.add_variant(experiment=experiment, label=label, weight=1)
            actions.append(f"added variant {label}")

    for label, internal_id in DEMO_VARIANTS:
        wanted = validate_upstream(demo_upstream_config(internal_id, upstream_port))
        current = selectors.current_version(variants[label], with_ciphertext=True)
        upstream_ok = current is not None and current.upstream == wanted
        key_ok = _key_matches(current, partner_key)
        if upstream_ok and key_ok:
            continue
        services.hot_swap(
            variant=variants[label], upstream=wanted, api_key=None if key_ok else partner_key
        )
        actions.append(f"loaded checkpoint {internal_id} into {label}")

    experiment.refresh_from_db()
    if experiment.status == ExperimentStatus.DRAFT:
        experiment = services.activate(experiment=experiment)
        actions.append("activated it")
    elif experiment.status not in ROUTING_STATUSES:
        raise CommandError(f"The demo experiment is {experiment.status}; expected active.")
    return experiment, actions


def _port_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Command(BaseCommand):
    help = (
        "Seed a demo superuser and the demo experiment kilo/preview-demo (idempotent), collect "
        "static files, then serve the admin + gateway (uvicorn) and the demo upstream together."
    )

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1", help="Interface for the admin/gateway.")
        parser.add_argument("--port", type=int, default=8000, help="Admin and gateway port.")
        parser.add_argument(
            "--upstream-port", type=int, default=8001, help="Demo partner upstream port."
        )
        parser.add_argument(
            "--no-serve", action="store_true", help="Only seed (and collect static files)."
        )
        parser.add_argument(
            "--state-dir",
            default=None,
            help="Where the demo admin password and partner key live (default: var/).",
        )

    def handle(self, *args, host, port, upstream_port, no_serve, state_dir, **options):
        for name, value in (("--port", port), ("--upstream-port", upstream_port)):
            if not 1 <= value <= 65535:
                raise CommandError(f"{name} must be between 1 and 65535, got {value}")
        if port == upstream_port:
            raise CommandError("--port and --upstream-port must differ")
        try:
            crypto.check_key()
        except crypto.EncryptionKeyError as exc:
            raise CommandError(
                f"{exc} `bash .ci/demo` generates var/encryption.key and exports it."
            ) from None

        state = Path(state_dir) if state_dir else Path(settings.BASE_DIR) / "var"
        partner_key, _ = _read_or_create_secret(
            state / PARTNER_KEY_FILE, lambda: "sk-demo-" + secrets.token_urlsafe(24)
        )
        username, password = ensure_admin(state)
        token = ensure_demo_token(state)
        try:
            experiment, actions = ensure_demo_experiment(
                upstream_port=upstream_port, partner_key=partner_key
            )
        except services.ExperimentError as exc:
            raise CommandError(exc.message) from None
        for line in actions or ["demo experiment already in place"]:
            self.stdout.write(f"demo: {line}")
        call_command("collectstatic", interactive=False, verbosity=0)
        self.stdout.write("demo: static files collected")

        if no_serve:
            self._print_banner(host, port, username, password, token, experiment, serving=False)
            return
        self._serve(host, port, upstream_port, partner_key, username, password, token, experiment)

    def _print_banner(self, host, port, username, password, token, experiment, *, serving):
        shown_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # noqa: S104
        root = f"http://{shown_host}:{port}"
        if password is None:
            password_line = (
                f"(unchanged; set {ADMIN_PASSWORD_ENV} to reset it on the next demo run)"
            )
        else:
            password_line = password
        status = "" if experiment.status == ExperimentStatus.ACTIVE else f" ({experiment.status})"
        lines = [
            "",
            f"Admin:     {root}/admin/",
            f"  user:     {username}",
            f"  password: {password_line}",
            f"Gateway:   {root}/v1/  (demo experiment {DEMO_PUBLIC_MODEL_ID}{status})",
            f"  token:    {token}",
            "  (anonymous requests are allowed, so curl needs no token; the SDKs always send",
            "  a key, and the gateway refuses a key it did not issue: give them this token)",
            "Try it:",
            f"curl -sS {root}/v1/chat/completions -H 'Content-Type: application/json' "
            f'-d \'{{"model": "{DEMO_PUBLIC_MODEL_ID}", "messages": '
            '[{"role": "user", "content": "Hello from the demo"}]}\'',
            "",
            "With the SDKs (Python; paste each block into python3):",
            "",
            *sdk_snippets(root, token),
            "",
        ]
        if serving:
            lines.append("demo: ready (Ctrl-C stops everything)")
        self.stdout.write("\n".join(lines))
        self.stdout.flush()

    def _serve(self, host, port, upstream_port, partner_key, username, password, token, experiment):
        manage_py = str(Path(settings.BASE_DIR) / "manage.py")
        upstream_env = {**os.environ, PARTNER_KEY_ENV: partner_key}
        commands = {
            "demo upstream": (
                [sys.executable, manage_py, "run_demo_upstream", "--host", "127.0.0.1"]
                + ["--port", str(upstream_port), "--api-key-env", PARTNER_KEY_ENV],
                upstream_env,
            ),
            "admin + gateway": (
                [sys.executable, "-m", "uvicorn", "config.asgi:application"]
                + ["--host", host, "--port", str(port), "--no-server-header"],
                dict(os.environ),
            ),
        }
        stopping = False

        def request_stop(signum, frame):
            nonlocal stopping
            stopping = True

        previous = {
            sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        children: dict[str, subprocess.Popen] = {}
        try:
            for name, (argv, env) in commands.items():
                # Own session: a Ctrl-C reaches only this command, which then stops the
                # children in order (gateway first, so it can flush its usage writes).
                children[name] = subprocess.Popen(
                    argv, env=env, cwd=settings.BASE_DIR, start_new_session=True
                )
            self._wait_ready(children, {"demo upstream": upstream_port, "admin + gateway": port})
            self._print_banner(host, port, username, password, token, experiment, serving=True)
            while not stopping:
                for name, child in children.items():
                    if child.poll() is not None:
                        raise CommandError(f"{name} exited with code {child.returncode}")
                time.sleep(0.2)
        finally:
            for name in reversed(list(children)):
                self._stop(children[name])
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        self.stdout.write("demo: stopped")

    def _wait_ready(self, children: dict[str, subprocess.Popen], ports: dict[str, int]) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        for name, child in children.items():
            while not _port_answers(ports[name]):
                if child.poll() is not None:
                    raise CommandError(
                        f"{name} exited with code {child.returncode} before listening on port "
                        f"{ports[name]} (is the port taken?)"
                    )
                if time.monotonic() > deadline:
                    raise CommandError(f"{name} did not listen on port {ports[name]} in time")
                time.sleep(0.1)

    @staticmethod
    def _stop(child: subprocess.Popen) -> None:
        if child.poll() is not None:
            return
        child.terminate()
        try:
            child.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
