"""Errors shared across meshlet.

Config errors always name the field path they are about, e.g.
``static_resources.clusters[0].lb_policy: MAGLEV is not supported yet``.
"""

from __future__ import annotations


class MeshletError(Exception):
    """Base of every error meshlet raises on purpose."""


class ConfigError(MeshletError):
    """A configuration was rejected. ``path`` names the offending field."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)

    def under(self, prefix: str) -> ConfigError:
        """The same error re-rooted below ``prefix`` (used when compiling nested resources)."""
        path = f"{prefix}.{self.path}" if self.path and prefix else (prefix or self.path)
        return type(self)(path, self.message)


class UnsupportedConfig(ConfigError):
    """A config field or value that is valid Envoy config but that meshlet does not implement."""
