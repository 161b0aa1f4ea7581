import os

import uvicorn
from django.core.management.base import BaseCommand, CommandError

from gateway.demo.upstream import make_app


class Command(BaseCommand):
    help = (
        "Run the local demo partner upstream: an OpenAI- and Anthropic-compatible echo server "
        "(chat completions, responses, messages; streaming and not) for demos and benchmarks."
    )

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8001)
        parser.add_argument(
            "--api-key-env",
            metavar="VAR",
            help="Require 'Authorization: Bearer <key>' with the key read from this variable.",
        )

    def handle(self, *args, host: str, port: int, api_key_env: str | None, **options):
        expected_api_key = None
        if api_key_env:
            # The key is read from the environment so it never shows in a process listing.
            expected_api_key = os.environ.get(api_key_env)
            if not expected_api_key:
                raise CommandError(f"environment variable {api_key_env} is not set or empty")
        if not 0 <= port <= 65535:
            raise CommandError(f"--port must be between 0 and 65535, got {port}")
        self.stdout.write(f"demo upstream on http://{host}:{port}/v1")
        uvicorn.run(
            make_app(expected_api_key=expected_api_key),
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
            server_header=False,
        )
