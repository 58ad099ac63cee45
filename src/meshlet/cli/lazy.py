"""A click group whose subcommands are imported only when they run.

``meshlet --help`` must stay fast and must not import grpc, the TLS engine or
the proxy just to list commands; and a command whose module fails to import
must not take the others down. New commands slot in with one entry in the
group's table: ``"ca": LazyCommand("meshlet.cli.ca:ca", "Run the mesh CA ...")``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import click

from meshlet.cli.errors import EXIT_RUNTIME, CliError


@dataclass(frozen=True, slots=True)
class LazyCommand:
    target: str  # "module.path:attribute"
    short_help: str


class LazyGroup(click.Group):
    def __init__(self, *args: object, lazy_commands: dict[str, LazyCommand] | None = None,
                 **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.lazy_commands = dict(lazy_commands or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy_commands:
            return self._load(cmd_name)
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Listing uses the table's short help so no command module is imported.
        rows: list[tuple[str, str]] = []
        for name in self.list_commands(ctx):
            lazy = self.lazy_commands.get(name)
            if lazy is not None:
                rows.append((name, lazy.short_help))
                continue
            command = super().get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, command.get_short_help_str(formatter.width)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def _load(self, cmd_name: str) -> click.Command:
        module_name, attr = self.lazy_commands[cmd_name].target.split(":", 1)
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise CliError(f"'{cmd_name}' is unavailable: {exc}", EXIT_RUNTIME) from exc
        command = getattr(module, attr)
        if not isinstance(command, click.Command):
            raise TypeError(f"{module_name}:{attr} is not a click command")
        return command
