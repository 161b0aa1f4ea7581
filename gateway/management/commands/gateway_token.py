"""Issue, list and revoke gateway tokens. The plaintext is printed once, on create."""

from django.core.management.base import BaseCommand, CommandError

from gateway.tokens import TokenError, create_token, list_tokens, revoke_token


def _when(moment) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


class Command(BaseCommand):
    help = (
        "Manage gateway tokens: create USERNAME [--name N] | list [--user U] | revoke ID_OR_PREFIX"
    )

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        create = sub.add_parser("create", help="Issue a token; it is printed once, last line.")
        create.add_argument("username")
        create.add_argument("--name", default="")
        listing = sub.add_parser("list", help="List tokens (never their value).")
        listing.add_argument("--user", default=None)
        revoke = sub.add_parser("revoke", help="Revoke a token by id or prefix.")
        revoke.add_argument("token")

    def handle(self, *args, action: str, **options):
        try:
            if action == "create":
                row, plaintext = create_token(username=options["username"], name=options["name"])
                self.stdout.write(
                    f"Created token {row.token_prefix}… (id {row.pk}) for {row.user.username}. "
                    "Store it now; it is not shown again:"
                )
                self.stdout.write(plaintext)
            elif action == "list":
                self.stdout.write("id\tprefix\tname\tuser\tcreated\tlast used\trevoked")
                for token in list_tokens(username=options["user"]):
                    self.stdout.write(
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
                    )
            elif action == "revoke":
                token = revoke_token(id_or_prefix=options["token"])
                self.stdout.write(f"Revoked token {token.token_prefix}… of {token.user.username}.")
        except TokenError as exc:
            raise CommandError(str(exc)) from None
