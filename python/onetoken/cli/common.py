"""What every `onetoken` command shares: exit codes, the one-line user error, settings
from the environment and the opened control DB, argument types.

Only the standard library at import time (see onetoken.cli)."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from onetoken.settings import Settings

EXIT_OK = 0
EXIT_FOUND = 1
EXIT_ERROR = 2


class CliError(Exception):
    """A user error: printed as one line, no traceback."""


def settings_from_env() -> Settings:
    from pydantic import ValidationError

    from onetoken.settings import Settings

    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"ONETOKEN_{'.'.join(str(p) for p in e['loc']).upper() or '?'}: {e['msg']}"
            for e in exc.errors(include_input=False)
        )
        raise CliError(f"invalid configuration: {problems}") from None


def open_db(settings: Settings, *, migrate: bool = True) -> Any:
    from onetoken.control import build_state
    from onetoken.kit.logging import configure_logging

    try:
        configure_logging(settings.log_dir, settings.log_level, stderr_level="WARNING")
        return build_state(settings, migrate=migrate)
    except OSError as exc:
        raise CliError(f"cannot open the data directory: {exc.strerror or exc}") from None


def instant(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError("must be an ISO 8601 date or time") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def action_group(parent: Any, name: str, help: str, *, dest: str) -> Any:
    """`onetoken NAME ACTION ...`: a command whose actions are subcommands (one required),
    as `parent.add_parser` adds it; returns what the actions are added to."""
    command = parent.add_parser(name, help=help)
    return command.add_subparsers(dest=dest, required=True, metavar="ACTION")
