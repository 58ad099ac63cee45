"""The route table: virtual host by Host, then the first matching route.

Virtual hosts are found as Envoy does: an exact domain, then the longest
``*.suffix`` wildcard, then the longest ``prefix.*`` wildcard, then ``*``.
Hosts compare case-insensitively. When the Host carries a port and no
exact/suffix/prefix domain matches it, the host without the port is tried
before falling back to ``*``. Wildcards match at least one character.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from meshlet.config.model import Route, RouteConfiguration, VirtualHost
from meshlet.proxy.http.stream import RequestHead
from meshlet.proxy.routing.matchers import ExtraPredicate, extra_predicate, path_predicate

# (path predicate, header/query predicate or None, route)
_CompiledRoute = tuple[Callable[[str], bool], ExtraPredicate | None, Route]


@dataclass(frozen=True, slots=True)
class _HostEntry:
    vhost: VirtualHost
    routes: tuple[_CompiledRoute, ...]


def _compile_routes(vhost: VirtualHost) -> tuple[_CompiledRoute, ...]:
    return tuple((path_predicate(r.match), extra_predicate(r.match), r) for r in vhost.routes)


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
        for vhost in route_config.virtual_hosts:
            entry = _HostEntry(vhost, _compile_routes(vhost))
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
