"""The Hyperscan regex engine: one pattern per database, or many in one scan.

A single pattern compiles into a one-pattern block-mode database; a virtual
host's regex routes compile into one multi-pattern database (``compile_set``)
whose ids are positions in the list, so one scan tells the route table every
regex route that can match a path.

Full-match semantics (equal to the other engines) come from anchoring each
pattern as ``\\A(?:pattern)\\z`` with ``HS_FLAG_SINGLEMATCH`` (one report per
pattern and scan at most). A pattern holding a ``)`` must compile on its own
first: one such as ``a)|(b`` would otherwise close the anchoring group early
and change meaning instead of being refused. Patterns are UTF-8 (``HS_FLAG_UTF8``,
``.`` is one code point) without ``HS_FLAG_UCP``, so ``\\d``, ``\\w``, ``\\s``
are ASCII classes, as in RE2.

Hyperscan refuses backreferences, lookaround, atomic groups and possessive
quantifiers: such a pattern is a ``ConfigError`` at config time. Compiling is
slow (milliseconds per pattern, seconds for a thousand in one database), so
compiled databases are cached by pattern text and a config update that keeps
its regexes does not compile them again. Each database gets one scratch space
per thread, allocated on that thread's first scan.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from functools import lru_cache
from typing import cast

import hyperscan

from meshlet.errors import ConfigError
from meshlet.proxy.routing.regex import CATEGORY, CompiledPattern, Predicate, RegexEngine, check_length
from meshlet.registry import registry

_FLAGS = hyperscan.HS_FLAG_SINGLEMATCH | hyperscan.HS_FLAG_ALLOWEMPTY | hyperscan.HS_FLAG_UTF8
# Distinct patterns kept compiled; a table refers to its own databases, so
# eviction only costs a later recompile.
SINGLE_CACHE_SIZE = 4096
SET_CACHE_SIZE = 64


class _ThreadScratch(threading.local):
    """Scratch space for one database, one per thread (a scratch serves one scan at a time)."""

    def __init__(self, database: hyperscan.Database) -> None:
        self.scratch = database.scratch.clone()


def _collect(pattern_id: int, start: int, end: int, flags: int, found: object) -> None:
    cast(list[int], found).append(pattern_id)


def _compiled(expressions: Sequence[bytes]) -> hyperscan.Database:
    database = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
    count = len(expressions)
    database.compile(expressions=list(expressions), ids=list(range(count)), elements=count, flags=_FLAGS)
    return database


class _Database:
    """A block-mode database over anchored patterns, ids 0..n-1 in list order."""

    __slots__ = ("_scan", "_scratch")

    def __init__(self, expressions: Sequence[bytes]) -> None:
        database = _compiled(expressions)
        self._scan = database.scan
        self._scratch = _ThreadScratch(database)

    def ids(self, data: bytes) -> list[int]:
        """Ids of the patterns matching ``data``, in report order."""
        found: list[int] = []
        self._scan(data, _collect, 0, found, self._scratch.scratch)
        return found


def _anchored(pattern: bytes) -> bytes:
    return b"\\A(?:" + pattern + b")\\z"


@lru_cache(maxsize=SINGLE_CACHE_SIZE)
def _single_database(pattern: bytes) -> _Database:
    # The bare pattern first: it must be a whole regex by itself (see the module doc).
    # Only a ")" can close the anchoring group early; without one, skip the extra compile.
    if b")" in pattern:
        _compiled([pattern])
    return _Database([_anchored(pattern)])


@lru_cache(maxsize=SET_CACHE_SIZE)
def _set_database(patterns: tuple[bytes, ...]) -> _Database:
    return _Database([_anchored(p) for p in patterns])


def _encoded(pattern: str, path: str) -> bytes:
    try:
        return pattern.encode()
    except UnicodeEncodeError as exc:
        reason = f"not valid Unicode ({exc.reason})"
        raise ConfigError(path, f"Hyperscan cannot compile {pattern!r}: {reason}") from None


class HyperscanPattern(CompiledPattern):
    __slots__ = ("_database",)

    def __init__(self, engine: RegexEngine, pattern: str, database: _Database) -> None:
        super().__init__(engine, pattern)
        self._database = database

    def matches(self, subject: str) -> bool:
        try:
            data = subject.encode()
        except UnicodeEncodeError:
            # Lone surrogates: not text (the codecs never produce them).
            return False
        return bool(self._database.ids(data))


class HyperscanPatternSet:
    """Many patterns, one scan: ``matching`` gives the positions of those that match."""

    __slots__ = ("_database",)

    def __init__(self, database: _Database) -> None:
        self._database = database

    def matching(self, subject: str) -> Sequence[int]:
        try:
            data = subject.encode()
        except UnicodeEncodeError:
            return ()
        found = self._database.ids(data)
        if len(found) > 1:
            found.sort()  # reported by match end offset; callers want list order
        return found


class HyperscanRegexEngine:
    name = "hyperscan"

    def compile(self, pattern: str, path: str) -> Predicate:
        check_length(pattern, path)
        try:
            database = _single_database(_encoded(pattern, path))
        except hyperscan.error as exc:
            raise ConfigError(path, f"Hyperscan cannot compile {pattern!r}: {exc}") from None
        return HyperscanPattern(self, pattern, database).matches

    def compile_set(self, patterns: Sequence[str], path: str) -> HyperscanPatternSet:
        encoded = tuple(_encoded(p, path) for p in patterns)
        try:
            database = _set_database(encoded)
        except hyperscan.error as exc:
            raise ConfigError(
                path, f"Hyperscan cannot compile {len(encoded)} patterns into one database: {exc}"
            ) from None
        return HyperscanPatternSet(database)


registry.register(CATEGORY, HyperscanRegexEngine.name, HyperscanRegexEngine)
