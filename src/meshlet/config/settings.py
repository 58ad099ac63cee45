"""Process-wide settings from the bootstrap's ``layered_runtime`` static layers.

Keys live under ``meshlet.`` (``meshlet.tls_engine``, ``meshlet.regex_engine``),
written flat (``meshlet.tls_engine: openssl``) or nested
(``meshlet: {tls_engine: openssl}``), as Envoy flattens static layers. Later
layers override earlier ones; overrides from the command line win over all.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from envoy.config.bootstrap.v3 import bootstrap_pb2
from google.protobuf import json_format

from meshlet.config.fields import allow_fields, check_fields, index, join, key
from meshlet.errors import ConfigError, UnsupportedConfig
from meshlet.proxy.routing.regex import regex_engine

allow_fields(bootstrap_pb2.LayeredRuntime, "layers")
allow_fields(bootstrap_pb2.RuntimeLayer, "name", "static_layer")

PREFIX = "meshlet."
CHOICES: dict[str, tuple[str, ...]] = {
    "tls_engine": ("openssl", "meshlet"),
    "regex_engine": ("re", "re2", "hyperscan"),
}
DEFAULTS = {"tls_engine": "openssl", "regex_engine": "re"}


def compile_settings(bootstrap: Any, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """Validated settings: defaults, then runtime layers, then ``overrides``."""
    settings = dict(DEFAULTS)
    if bootstrap.HasField("layered_runtime"):
        settings.update(_from_runtime(bootstrap.layered_runtime, "layered_runtime"))
    for name, value in (overrides or {}).items():
        settings[name] = _validated(name, value, join("settings", name))
    # An engine that is not installed is a config error now, not at the first regex.
    regex_engine(settings["regex_engine"], "settings.regex_engine")
    return settings


def _from_runtime(msg: Any, path: str) -> dict[str, str]:
    check_fields(msg, path)
    found: dict[str, str] = {}
    for i, layer in enumerate(msg.layers):
        layer_path = index(join(path, "layers"), i)
        check_fields(layer, layer_path)
        if not layer.HasField("static_layer"):
            raise ConfigError(layer_path, "static_layer is required")
        static_path = join(layer_path, "static_layer")
        for name, value in _flatten(json_format.MessageToDict(layer.static_layer)).items():
            value_path = key(static_path, name)
            if not name.startswith(PREFIX):
                raise UnsupportedConfig(value_path, f"runtime key {name!r} is not supported yet")
            if not isinstance(value, str):
                raise ConfigError(value_path, f"expected a string, got {value!r}")
            found[name.removeprefix(PREFIX)] = _validated(name.removeprefix(PREFIX), value, value_path)
    return found


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in data.items():
        full = f"{prefix}{name}"
        if isinstance(value, dict):
            flat.update(_flatten(value, full + "."))
        else:
            flat[full] = value
    return flat


def _validated(name: str, value: str, path: str) -> str:
    choices = CHOICES.get(name)
    if choices is None:
        raise UnsupportedConfig(
            path, f"setting {PREFIX}{name} is not supported (known: {', '.join(CHOICES)})"
        )
    if value not in choices:
        raise ConfigError(path, f"{value!r} is not one of {', '.join(choices)}")
    return value
