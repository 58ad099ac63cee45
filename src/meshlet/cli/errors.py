"""How the ``meshlet`` command fails: one clear line on stderr, never a traceback.

Exit codes follow the usual CLI convention: 2 for anything the user can fix
(bad flags, a missing file, bad YAML, config meshlet refuses), 1 for a failure
while running, 130 for Ctrl-C.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import click
import yaml

from meshlet.errors import ConfigError

EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

log = logging.getLogger("meshlet.cli")


class CliError(Exception):
    """A failure the command explains itself; ``exit_code`` defaults to usage (2)."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def print_error(message: str) -> None:
    # One line, whatever the message holds: collapse embedded newlines.
    line = " ".join(message.split())
    click.echo(f"meshlet: error: {line}", err=True)


def describe_yaml_error(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is not None:
        return f"{mark.name}: line {mark.line + 1}, column {mark.column + 1}: invalid YAML: {problem}"
    return f"invalid YAML: {problem}"


def run_command(group: click.Group, argv: Sequence[str] | None, prog_name: str = "meshlet") -> int:
    """Run the click ``group`` and turn every failure into an exit code and one line."""
    try:
        result = group.main(args=list(argv) if argv is not None else None, prog_name=prog_name,
                            standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        # ``meshlet`` alone: show the help, as a usage error (exit 2) like git does.
        click.echo(exc.ctx.get_help() if exc.ctx else str(exc), err=True)
        return EXIT_USAGE
    except click.UsageError as exc:
        print_error(_usage_message(exc))
        return EXIT_USAGE
    except click.ClickException as exc:
        print_error(exc.format_message())
        return exc.exit_code
    except CliError as exc:
        print_error(exc.message)
        return exc.exit_code
    except ConfigError as exc:
        print_error(str(exc))
        return EXIT_USAGE
    except yaml.YAMLError as exc:
        print_error(describe_yaml_error(exc))
        return EXIT_USAGE
    except (click.Abort, KeyboardInterrupt):
        # click has already ended the line on stderr.
        return EXIT_INTERRUPTED
    except Exception as exc:  # the last line of defence: a line, not a traceback
        log.debug("unexpected error", exc_info=True)
        print_error(f"unexpected {type(exc).__name__}: {exc} (run with --log-level debug for details)")
        return EXIT_RUNTIME
    return result if isinstance(result, int) else 0


def _usage_message(exc: click.UsageError) -> str:
    command = exc.ctx.command_path if exc.ctx is not None else ""
    hint = f" (see '{command} --help')" if command else ""
    return f"{exc.format_message()}{hint}"
