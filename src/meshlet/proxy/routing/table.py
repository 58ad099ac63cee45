"""The route table: virtual host by Host, then the first matching route.

Virtual hosts are found as Envoy does: an exact domain, then the longest
``*.suffix`` wildcard, then the longest ``prefix.*`` wildcard, then ``*``.
Hosts compare case-insensitively. When the Host carries a port and no
exact/suffix/prefix domain matches it, the host without the port is tried
before falling back to ``*``. Wildcards match at least one character.

Within a virtual host the first matching route wins. When a regex engine can
compile many patterns into one set (Hyperscan), a virtual host's regex routes
share one: a single scan says which of them match the path, and the routes
are then walked in their order, taking regex routes from the scan's answer and
checking the others (prefix, path) as usual. The scan only ever skips regex
routes that cannot match; it never changes the order. Other engines check
each route in turn.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

from meshlet.config.model import PathMatchKind, Route, RouteConfiguration, VirtualHost
from meshlet.proxy.http.stream import RequestHead
from meshlet.proxy.routing.matchers import ExtraPredicate, extra_predicate, path_predicate
from meshlet.proxy.routing.regex import MultiPatternEngine, PatternSet, multi_pattern_engine

# (path predicate, header/query predicate or None, route)
_CompiledRoute = tuple[Callable[[str], bool], ExtraPredicate | None, Route]
# A route outside the pattern set: (position in the virtual host, path predicate, extra, route)
_OtherRoute = tuple[int, Callable[[str], bool], ExtraPredicate | None, Route]
# A route in the pattern set, by set id: (position in the virtual host, extra, route)
_SetMember = tuple[int, ExtraPredicate | None, Route]

# Below this many regex routes a set buys nothing over checking them in turn.
MIN_SET_SIZE = 2
_PAST_THE_END = sys.maxsize  # a position after every route


@dataclass(frozen=True, slots=True)
class _RegexSet:
    """A virtual host's regex routes in one pattern set, and its other routes."""

    patterns: PatternSet
    members: tuple[_SetMember, ...]
    others: tuple[_OtherRoute, ...]

    def first_match(self, path: str, head: RequestHead, query: str) -> Route | None:
        others = self.others
        if not others:
            return self._first_member(path, head, query)
        next_other = 0
        for set_id in self.patterns.matching(path):
            position, extra, route = self.members[set_id]
            # Routes before this regex route come first, whatever the scan said.
            found, next_other = _first_other(others, next_other, position, path, head, query)
            if found is not None:
                return found
            if extra is None or extra(head, query):
                return route
        found, _ = _first_other(others, next_other, _PAST_THE_END, path, head, query)
        return found

    def _first_member(self, path: str, head: RequestHead, query: str) -> Route | None:
        """``first_match`` when every route of the virtual host is in the set."""
        members = self.members
        for set_id in self.patterns.matching(path):
            _, extra, route = members[set_id]
            if extra is None or extra(head, query):
                return route
        return None


def _first_other(others: tuple[_OtherRoute, ...], start: int, before: int, path: str,
                 head: RequestHead, query: str) -> tuple[Route | None, int]:
    """The first route of ``others[start:]`` placed before ``before`` that matches, and
    where to carry on from."""
    index = start
    count = len(others)
    while index < count:
        position, path_matches, extra, route = others[index]
        if position >= before:
            break
        index += 1
        if path_matches(path) and (extra is None or extra(head, query)):
            return route, index
    return None, index


@dataclass(frozen=True, slots=True)
class _HostEntry:
    vhost: VirtualHost
    routes: tuple[_CompiledRoute, ...]
    # Set when the virtual host's regex routes share one pattern set.
    regex_set: _RegexSet | None = None


def _compile_routes(vhost: VirtualHost) -> tuple[_CompiledRoute, ...]:
    return tuple((path_predicate(r.match), extra_predicate(r.match), r) for r in vhost.routes)


def _host_entry(vhost: VirtualHost, path: str) -> _HostEntry:
    routes = _compile_routes(vhost)
    return _HostEntry(vhost, routes, _regex_set(routes, path))


def _regex_set(routes: tuple[_CompiledRoute, ...], path: str) -> _RegexSet | None:
    """One pattern set for the regex routes when their engine supports it (and all
    came from the same engine), else None: routes are then checked in turn."""
    engine: MultiPatternEngine | None = None
    patterns: list[str] = []
    members: list[_SetMember] = []
    others: list[_OtherRoute] = []
    for position, (path_matches, extra, route) in enumerate(routes):
        source = multi_pattern_engine(path_matches) if route.match.path_kind is PathMatchKind.REGEX else None
        if source is None:
            others.append((position, path_matches, extra, route))
            continue
        if engine is not None and source[0] is not engine:
            return None
        engine = source[0]
        patterns.append(source[1])
        members.append((position, extra, route))
    if engine is None or len(members) < MIN_SET_SIZE:
        return None
    return _RegexSet(engine.compile_set(patterns, path), tuple(members), tuple(others))


def _by_length(table: dict[str, _HostEntry]) -> tuple[tuple[int, dict[str, _HostEntry]], ...]:
    """Group wildcard remainders by length, longest first (longest wildcard wins)."""
    groups: dict[int, dict[str, _HostEntry]] = {}
    for remainder, entry in table.items():
        groups.setdefault(len(remainder), {})[remainder] = entry
    return tuple(sorted(groups.items(), reverse=True))


def split_port(host: str) -> tuple[str, str | None]:
    """("example.com", "8080") for "example.com:8080"; IPv6 literals keep their brackets."""
    colon = host.rfind(":")
    if colon < 0 or host.rfind("]") > colon:
        return host, None
    return host[:colon], host[colon + 1 :]


class RouteTable:
    __slots__ = ("_any", "_exact", "_only_any", "_prefixes", "_suffixes", "config")

    def __init__(
        self,
        config: RouteConfiguration,
        exact: dict[str, _HostEntry],
        suffixes: dict[str, _HostEntry],
        prefixes: dict[str, _HostEntry],
        any_host: _HostEntry | None,
    ) -> None:
        self.config = config
        self._exact = exact
        self._suffixes = _by_length(suffixes)
        self._prefixes = _by_length(prefixes)
        self._any = any_host
        # A single "*" virtual host (a sidecar's usual shape): no Host parsing at all.
        self._only_any = not exact and not suffixes and not prefixes

    @classmethod
    def build(cls, route_config: RouteConfiguration) -> RouteTable:
        """Index ``route_config``. Domains must already be lower-case and unique
        (the compiler validates them)."""
        exact: dict[str, _HostEntry] = {}
        suffixes: dict[str, _HostEntry] = {}
        prefixes: dict[str, _HostEntry] = {}
        any_host: _HostEntry | None = None
        for i, vhost in enumerate(route_config.virtual_hosts):
            entry = _host_entry(vhost, f"virtual_hosts[{i}].routes")
            for domain in vhost.domains:
                if domain == "*":
                    any_host = entry
                elif domain.startswith("*"):
                    suffixes[domain[1:]] = entry
                elif domain.endswith("*"):
                    prefixes[domain[:-1]] = entry
                else:
                    exact[domain] = entry
        return cls(route_config, exact, suffixes, prefixes, any_host)

    def virtual_host(self, authority: str) -> VirtualHost | None:
        entry = self._find_host(authority)
        return entry.vhost if entry is not None else None

    def select(self, head: RequestHead) -> tuple[VirtualHost, Route] | None:
        """The virtual host and first matching route for ``head``, or None (404)."""
        entry = self._find_host(head.authority)
        if entry is None:
            return None
        path = head.path
        fragment = path.find("#")
        if fragment >= 0:
            path = path[:fragment]
        query = ""
        cut = path.find("?")
        if cut >= 0:
            query = path[cut + 1 :]
            path = path[:cut]
        if entry.regex_set is not None:
            route = entry.regex_set.first_match(path, head, query)
            return (entry.vhost, route) if route is not None else None
        for path_matches, extra_matches, route in entry.routes:
            if path_matches(path) and (extra_matches is None or extra_matches(head, query)):
                return entry.vhost, route
        return None

    def _find_host(self, authority: str) -> _HostEntry | None:
        if self._only_any:
            return self._any
        host = authority.lower()
        entry = self._find_named(host)
        if entry is None:
            bare, port = split_port(host)
            if port is not None:
                entry = self._find_named(bare)
        return entry if entry is not None else self._any

    def _find_named(self, host: str) -> _HostEntry | None:
        entry = self._exact.get(host)
        if entry is not None:
            return entry
        size = len(host)
        for length, table in self._suffixes:
            if size > length:
                entry = table.get(host[-length:])
                if entry is not None:
                    return entry
        for length, table in self._prefixes:
            if size > length:
                entry = table.get(host[:length])
                if entry is not None:
                    return entry
        return None
