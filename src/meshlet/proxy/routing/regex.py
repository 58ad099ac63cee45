"""Regex engines for ``safe_regex`` matchers.

An engine compiles a pattern once, at config time, into a full-match predicate
(Envoy's ``safe_regex`` semantics: the whole string must match). A pattern the
engine cannot take is a ``ConfigError`` naming the field, never a runtime
surprise.

Engines register in the extension registry under category ``"regex_engine"``;
the registered factory takes no arguments and returns a ``RegexEngine``. The
proxy picks one by name (``ProxyConfig.settings["regex_engine"]``, default
``"re"``). Engines that need an optional library live in their own module,
``meshlet.proxy.routing.regex_<name>``, imported on first request so a missing
library is reported only when that engine is asked for.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from collections.abc import Callable
from typing import Protocol

from meshlet.errors import ConfigError
from meshlet.registry import registry

CATEGORY = "regex_engine"
DEFAULT_ENGINE = "re"
# Patterns are config, not data; a huge one is a mistake (RE2 caps program size too).
MAX_PATTERN_LENGTH = 16 * 1024

Predicate = Callable[[str], bool]


class RegexEngine(Protocol):
    name: str

    def compile(self, pattern: str, path: str) -> Predicate:
        """A full-match predicate for ``pattern``; ConfigError(path, ...) if refused."""
        ...


class StdlibRegexEngine:
    """Python's ``re``. Backtracking, so patterns come from trusted config only."""

    name = "re"

    def compile(self, pattern: str, path: str) -> Predicate:
        if len(pattern) > MAX_PATTERN_LENGTH:
            raise ConfigError(path, f"regex is longer than {MAX_PATTERN_LENGTH} characters")
        try:
            compiled = re.compile(pattern)
        except re.error as exc:
            raise ConfigError(path, f"invalid regex {pattern!r}: {exc}") from None
        full = compiled.fullmatch
        return lambda s: full(s) is not None


registry.register(CATEGORY, StdlibRegexEngine.name, StdlibRegexEngine)

_instances: dict[str, RegexEngine] = {}


def regex_engine(name: str = DEFAULT_ENGINE, path: str = "") -> RegexEngine:
    """The engine registered as ``name``; ConfigError naming ``path`` when unavailable."""
    cached = _instances.get(name)
    if cached is not None:
        return cached
    if name not in registry.names(CATEGORY):
        _import_optional_engine(name, path)
    if name not in registry.names(CATEGORY):
        available = ", ".join(registry.names(CATEGORY))
        raise ConfigError(path, f"regex engine {name!r} is not available (available: {available})")
    engine: RegexEngine = registry.lookup(CATEGORY, name=name, path=path).factory()
    if not callable(getattr(engine, "compile", None)):
        raise TypeError(f"regex engine {name!r} factory returned {engine!r}, not a RegexEngine")
    _instances[name] = engine
    return engine


def _import_optional_engine(name: str, path: str) -> None:
    if not name.isidentifier():
        return
    module = f"{__package__}.regex_{name}"
    if importlib.util.find_spec(module) is None:
        return
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(
            path, f"regex engine {name!r} is not installed ({exc}); install meshlet[accel]"
        ) from None
