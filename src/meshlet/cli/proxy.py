"""``meshlet proxy --config FILE``: run the proxy on an Envoy v3 bootstrap."""

from __future__ import annotations

from pathlib import Path

import click

from meshlet.cli.logs import DEFAULT_LEVEL, LEVEL_NAMES, configure_logging

TLS_ENGINES = ("openssl", "meshlet")
REGEX_ENGINES = ("re", "re2", "hyperscan")


@click.command()
@click.option(
    "-c", "--config", "config_path", required=True,
    type=click.Path(exists=True, dir_okay=False, readable=True, path_type=Path),
    help="Envoy v3 bootstrap (YAML or JSON).",
)
@click.option("--admin-port", type=click.IntRange(0, 65535),
              help="Serve the admin endpoint on this port (overrides admin.address in the bootstrap).")
@click.option("-l", "--log-level", type=click.Choice(LEVEL_NAMES, case_sensitive=False),
              default=DEFAULT_LEVEL, show_default=True, help="Log level (Envoy's names).")
@click.option("--tls-engine", type=click.Choice(TLS_ENGINES),
              help="TLS engine for every tls transport socket (overrides meshlet.tls_engine).")
@click.option("--regex-engine", type=click.Choice(REGEX_ENGINES),
              help="Engine for safe_regex matchers (overrides meshlet.regex_engine).")
@click.option("--drain-time", type=click.FloatRange(min=0, max=3600),
              help="Seconds in-flight requests get to finish after SIGTERM [5].")
def proxy(
    config_path: Path,
    admin_port: int | None,
    log_level: str,
    tls_engine: str | None,
    regex_engine: str | None,
    drain_time: float | None,
) -> None:
    """Run the proxy. SIGTERM drains connections, then exits.

    A config meshlet cannot load (bad YAML, an unknown or unsupported field)
    is reported as one line naming the field, with exit code 2.
    """
    configure_logging(log_level)
    # Imported here so that `meshlet --help` and other commands never pay for
    # the proxy's imports.
    from meshlet.proxy.server import run

    run(
        config_path,
        admin_port=admin_port,
        log_level=log_level.lower(),
        tls_engine=tls_engine,
        regex_engine=regex_engine,
        drain_time=drain_time,
    )
