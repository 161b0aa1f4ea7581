"""Issue, list and revoke gateway tokens. The plaintext is printed once, on create."""

from __future__ import annotations

from typing import Any

from django.core.management.base import CommandError, CommandParser

from experiments.management.output import JsonCommand, add_json_option
from gateway.models import GatewayToken
from gateway.tokens import (
    TokenError,
    create_token,
    find_token,
    list_tokens,
    revoke_token,
    token_user,
)


def _when(moment) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


def _iso(moment) -> str | None:
    return moment.isoformat(timespec="seconds") if moment else None


def token_json(token: GatewayToken) -> dict[str, Any]:
    """A token as the commands describe it: never its value or its hash."""
    return {
        "id": str(token.pk),
        "prefix": token.token_prefix,
        "name": token.name,
        "user": token.user.get_username(),
        "created_at": _iso(token.created_at),
        "last_used_at": _iso(token.last_used_at),
        "revoked_at": _iso(token.revoked_at),
    }


class Command(JsonCommand):
    help = (
        "Manage gateway tokens: create USERNAME [--name N] | list [--user U] | revoke "
        "ID_OR_PREFIX. Create and revoke are recorded in the admin history (--by USERNAME)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        create = sub.add_parser("create", help="Issue a token; it is printed once, last line.")
        create.add_argument("username")
        create.add_argument("--name", default="")
        listing = sub.add_parser("list", help="List tokens (never their value).")
        listing.add_argument("--user", default=None)
        revoke = sub.add_parser("revoke", help="Revoke a token by its id or a prefix of it.")
        revoke.add_argument("token")
        for subparser in (create, listing, revoke):
            add_json_option(subparser, after_subcommand=True)
        for subparser in (create, revoke):
            subparser.add_argument(
                "--by",
                metavar="USERNAME",
                help="Record this user in the admin history (default: the service user "
                "'manage.py').",
            )

    def handle(self, *args: Any, action: str, **options: Any) -> None:
        try:
            getattr(self, f"_{action}")(options)
        except TokenError as exc:
            raise CommandError(str(exc)) from None

    @staticmethod
    def _actor(options: dict[str, Any]):
        """The user ``--by`` names (None: the service user is recorded)."""
        if options.get("by") is None:
            return None
        try:
            return token_user(options["by"])
        except TokenError:
            raise TokenError(f"No user matches {options['by']!r} (--by).") from None

    def _create(self, options: dict[str, Any]) -> None:
        row, plaintext = create_token(
            user=token_user(options["username"]), name=options["name"], by=self._actor(options)
        )
        self.emit(
            [
                f"Created token {row.token_prefix}… (id {row.pk}) for {row.user.username}. "
                "Store it now; it is not shown again:",
                plaintext,
            ],
            {"token": plaintext, **token_json(row)},
        )

    def _list(self, options: dict[str, Any]) -> None:
        tokens = list(list_tokens(username=options["user"]))
        lines = ["id\tprefix\tname\tuser\tcreated\tlast used\trevoked"] + [
            "\t".join(
                [
                    str(token.pk),
                    token.token_prefix,
                    token.name or "-",
                    token.user.username,
                    _when(token.created_at),
                    _when(token.last_used_at),
                    _when(token.revoked_at),
                ]
            )
            for token in tokens
        ]
        self.emit(lines, {"tokens": [token_json(token) for token in tokens]})

    def _revoke(self, options: dict[str, Any]) -> None:
        token = find_token(options["token"])
        actor = self._actor(options)
        already = token.revoked_at is not None
        revoke_token(token=token, by=actor)
        self.emit(
            f"Token {token.token_prefix}… of {token.user.username} was already revoked."
            if already
            else f"Revoked token {token.token_prefix}… of {token.user.username}.",
            {"changed": not already, "token": token_json(token)},
        )
