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

Multi-pattern engines (Hyperscan) can also compile an ordered list of patterns
into one ``PatternSet`` and report, in one scan, every pattern that matches.
The route table uses that to skip the regex routes of a virtual host that
cannot match; it finds out whether a route's predicate came from such an
engine through ``compiled_pattern``: those engines return the bound ``matches``
method of a ``CompiledPattern``.

Semantics are RE2's (Envoy's ``safe_regex``): ``\\d``, ``\\w``, ``\\s`` and
``\\b`` are ASCII classes in every engine, so all engines agree on a path.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

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


@runtime_checkable
class PatternSet(Protocol):
    def matching(self, subject: str) -> Sequence[int]:
        """Positions (in the list it was compiled from) of the patterns that fully
        match ``subject``, ascending."""
        ...


@runtime_checkable
class MultiPatternEngine(Protocol):
    name: str

    def compile(self, pattern: str, path: str) -> Predicate: ...

    def compile_set(self, patterns: Sequence[str], path: str) -> PatternSet:
        """One set for ``patterns`` (each already accepted by ``compile``)."""
        ...


class CompiledPattern(ABC):
    """A pattern compiled by ``engine``; its ``matches`` method is the predicate."""

    __slots__ = ("engine", "pattern")

    def __init__(self, engine: RegexEngine, pattern: str) -> None:
        self.engine = engine
        self.pattern = pattern

    @abstractmethod
    def matches(self, subject: str) -> bool:
        """Whether the whole of ``subject`` matches."""


def compiled_pattern(predicate: Callable[[str], bool]) -> CompiledPattern | None:
    """The ``CompiledPattern`` behind ``predicate`` when an engine built it that way."""
    owner = getattr(predicate, "__self__", None)
    return owner if isinstance(owner, CompiledPattern) else None


def multi_pattern_engine(predicate: Callable[[str], bool]) -> tuple[MultiPatternEngine, str] | None:
    """The multi-pattern engine and the pattern behind ``predicate``, or None."""
    compiled = compiled_pattern(predicate)
    if compiled is None or not isinstance(compiled.engine, MultiPatternEngine):
        return None
    return compiled.engine, compiled.pattern


def check_length(pattern: str, path: str) -> None:
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise ConfigError(path, f"regex is longer than {MAX_PATTERN_LENGTH} characters")


class StdlibRegexEngine:
    """Python's ``re``. Backtracking, so patterns come from trusted config only."""

    name = "re"

    def compile(self, pattern: str, path: str) -> Predicate:
        check_length(pattern, path)
        try:
            # ASCII classes, as RE2 and Hyperscan (without UCP) have them.
            compiled = re.compile(pattern, re.ASCII)
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
