"""Logging for meshlet processes, configured once from ``--log-level``.

Level names are Envoy's (trace, debug, info, warning/warn, error, critical,
off) so operators can reuse what they pass to Envoy.
"""

from __future__ import annotations

import logging
import sys

LEVELS: dict[str, int] = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
    "off": logging.CRITICAL + 10,
}

LEVEL_NAMES = tuple(LEVELS)
DEFAULT_LEVEL = "info"


def configure_logging(level_name: str) -> int:
    """Send meshlet's logs to stderr at ``level_name``; returns the numeric level."""
    level = LEVELS[level_name.lower()]
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(levelname)s][%(name)s] %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    return level
