"""The operator commands' one output convention.

Without ``--json`` a command prints text for people. With ``--json`` (accepted before or
after a subcommand) it prints exactly one JSON object on one line on stdout:
``{"ok": true, ...}`` on success; on a refusal ``{"ok": false, "error": "<reason>", ...}``
while the reason also goes to stderr as ``CommandError: <reason>`` and the exit status is
1. Usage errors caught by the argument parser exit with status 2 and print no JSON.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser


class CommandRefusal(CommandError):
    """A refusal that also reports what was done or found, in the JSON output."""

    def __init__(self, message: str, payload: dict[str, Any]) -> None:
        super().__init__(message)
        self.payload = payload


def add_json_option(parser: argparse.ArgumentParser, *, after_subcommand: bool = False) -> None:
    """``--json`` on a parser; on a subcommand's parser it keeps a value given before it."""
    parser.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS if after_subcommand else False,
        help="Print exactly one JSON object on one line.",
    )


class JsonCommand(BaseCommand):
    """A command following the convention above: ``emit`` for results, CommandError for
    refusals. Subclasses call ``add_json_option(subparser, after_subcommand=True)`` on
    their subcommands' parsers."""

    as_json = False

    def create_parser(self, prog_name: str, subcommand: str, **kwargs: Any) -> CommandParser:
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        add_json_option(parser)
        return parser

    def execute(self, *args: Any, **options: Any) -> Any:
        self.as_json = bool(options.get("json"))
        try:
            return super().execute(*args, **options)
        except CommandError as refused:
            if self.as_json:
                payload = getattr(refused, "payload", {})
                self.stdout.write(json.dumps({"ok": False, "error": str(refused), **payload}))
            raise

    def emit(self, text: str | list[str], payload: dict[str, Any]) -> None:
        """The result: ``text`` for people, or ``{"ok": true, **payload}``."""
        if self.as_json:
            self.stdout.write(json.dumps({"ok": True, **payload}))
        else:
            self.stdout.write("\n".join(text) if isinstance(text, list) else text)
