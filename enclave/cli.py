"""Operator commands.

python -m enclave migrate          apply pending schema migrations
python -m enclave token ORG_ID     print a development user token
python -m enclave check            validate the settings and exit
"""

from __future__ import annotations

import argparse
import sys

from enclave.config import Settings
from enclave.errors import ConfigurationError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="enclave")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("migrate", help="apply pending schema migrations")
    commands.add_parser("check", help="validate the settings")
    token = commands.add_parser(
        "token", help="print a user JWT signed with ENCLAVE_JWT_SECRET"
    )
    token.add_argument("org_id")
    token.add_argument("--sub", default="user_dev")
    token.add_argument("--scope", default="sessions:read sessions:write")
    token.add_argument("--ttl", type=int, default=12 * 3600, help="seconds")
    dev = commands.add_parser("dev", help="run the whole service on this machine")
    dev.add_argument("--port", type=int, default=8000)
    dev.add_argument("--workers", type=int, default=2)
    dev.add_argument("--exit-after-demo", action="store_true")
    args = parser.parse_args(argv)

    if args.command == "dev":
        from enclave import devserver

        sys.exit(devserver.main(args.port, args.workers, args.exit_after_demo))

    try:
        settings = Settings.load()
    except ConfigurationError as exc:
        sys.exit(f"enclave: {exc}")

    from enclave.logs import configure_logging

    configure_logging(settings)
    if args.command == "migrate":
        from enclave import schema
        from enclave.db import configure_database

        configure_database(settings.database_url)
        applied = schema.migrate()
        sys.stdout.write(
            f"applied {len(applied)} migration(s): {', '.join(applied) or 'none pending'}\n"
        )
    elif args.command == "token":
        from enclave.auth import mint_user_token

        value = mint_user_token(
            settings, args.sub, args.org_id, args.scope.split(), args.ttl
        )
        sys.stdout.write(value + "\n")
    elif args.command == "check":
        sys.stdout.write(
            f"settings ok: env={settings.env} backend={settings.backend}\n"
        )
