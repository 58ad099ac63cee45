"""The RE2 regex engine (``google-re2``), Envoy's own choice for ``safe_regex``.

RE2 runs in time linear in the input and refuses what it cannot do in linear
time (backreferences, lookaround, possessive quantifiers): such a pattern is a
``ConfigError`` when the config is compiled.

Matching calls the extension's ``RE2.Match`` with ``ANCHOR_BOTH`` directly:
the ``re2`` module's ``fullmatch`` maps byte offsets back to ``str`` offsets
and builds a match object on every call, several times the cost of the match
itself, and a route predicate needs neither.
"""

from __future__ import annotations

import re2
from re2 import _re2

from meshlet.errors import ConfigError
from meshlet.proxy.routing.regex import CATEGORY, CompiledPattern, Predicate, RegexEngine, check_length
from meshlet.registry import registry

_ANCHOR_BOTH = _re2.RE2.Anchor.ANCHOR_BOTH


def _options() -> re2.Options:
    options = re2.Options()
    options.log_errors = False  # a refused pattern becomes a ConfigError, not stderr noise
    options.never_capture = True  # a route predicate only asks "does it match"
    return options


class Re2Pattern(CompiledPattern):
    __slots__ = ("_match",)

    def __init__(self, engine: RegexEngine, pattern: str, regexp: _re2.RE2) -> None:
        super().__init__(engine, pattern)
        self._match = regexp.Match

    def matches(self, subject: str) -> bool:
        try:
            data = subject.encode()
        except UnicodeEncodeError:
            # Lone surrogates: not text RE2 can see (the codecs never produce them).
            return False
        start: int = self._match(_ANCHOR_BOTH, data, 0, len(data))[0][0]
        return start >= 0


class Re2RegexEngine:
    name = "re2"

    def compile(self, pattern: str, path: str) -> Predicate:
        check_length(pattern, path)
        regexp = _re2.RE2(pattern.encode(errors="surrogatepass"), _options())
        if not regexp.ok():
            reason = regexp.error().decode(errors="replace")
            raise ConfigError(path, f"RE2 cannot compile {pattern!r}: {reason}")
        return Re2Pattern(self, pattern, regexp).matches


registry.register(CATEGORY, Re2RegexEngine.name, Re2RegexEngine)
