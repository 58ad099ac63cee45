"""Filter chain selection, in Envoy's order.

For a new connection, the candidates are narrowed criterion by criterion:
destination port, server name (exact, then the longest matching ``*.suffix``
wildcard), transport protocol, application protocols. At each step the
chains that name a matching value win; if none does, the chains that leave
the criterion empty stay in. No backtracking: a connection that matched a
specific server name never falls back to the catch-all chains at that step
(Envoy's ``FilterChainManagerImpl`` behaves the same). Nothing left means the
listener's ``default_filter_chain``, or no match.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from meshlet.config.model import FilterChain, FilterChainMatch
from meshlet.errors import ConfigError


@dataclass(frozen=True, slots=True)
class ConnectionFacts:
    """What the listener knows about a connection when it picks a chain."""

    destination_port: int
    server_name: str = ""
    transport_protocol: str = ""
    application_protocols: tuple[str, ...] = ()


def _validate(chains: Sequence[FilterChain]) -> None:
    seen: dict[FilterChainMatch, str] = {}
    for i, chain in enumerate(chains):
        for name in chain.match.server_names:
            if "*" in name and not (name.startswith("*.") and "*" not in name[1:]):
                raise ConfigError(
                    f"filter_chains[{i}].filter_chain_match.server_names",
                    f"{name!r}: only a leading '*.' wildcard is supported",
                )
        key = _normalised(chain.match)
        if key in seen:
            raise ConfigError(
                f"filter_chains[{i}].filter_chain_match",
                f"multiple filter chains with the same matching rules ({seen[key]!r} and {chain.name!r})",
            )
        seen[key] = chain.name


def _normalised(m: FilterChainMatch) -> FilterChainMatch:
    return FilterChainMatch(
        server_names=tuple(sorted(n.lower() for n in m.server_names)),
        application_protocols=tuple(sorted(m.application_protocols)),
        transport_protocol=m.transport_protocol,
        destination_port=m.destination_port,
    )


class FilterChainSelector:
    """Precomputed lookup over one listener's filter chains."""

    __slots__ = ("_chains", "_default", "_names")

    def __init__(self, chains: Sequence[FilterChain], default: FilterChain | None = None) -> None:
        _validate(chains)
        self._chains = tuple(chains)
        self._default = default
        # Lower-cased server names per chain, computed once.
        self._names = tuple(tuple(n.lower() for n in c.match.server_names) for c in chains)

    def select(self, facts: ConnectionFacts) -> FilterChain | None:
        candidates = list(range(len(self._chains)))
        for narrow in (self._by_port, self._by_server_name, self._by_transport, self._by_alpn):
            candidates = narrow(candidates, facts)
            if not candidates:
                return self._default
        return self._chains[candidates[0]]

    # Each step keeps the chains that match specifically, else the catch-alls.

    def _by_port(self, idx: list[int], facts: ConnectionFacts) -> list[int]:
        exact = [i for i in idx if self._chains[i].match.destination_port == facts.destination_port]
        return exact or [i for i in idx if self._chains[i].match.destination_port is None]

    def _by_server_name(self, idx: list[int], facts: ConnectionFacts) -> list[int]:
        sni = facts.server_name.lower()
        if sni:
            exact = [i for i in idx if sni in self._names[i]]
            if exact:
                return exact
            # Longest wildcard first: "*.b.example.com" before "*.example.com".
            dot = sni.find(".")
            while dot != -1:
                wildcard = "*" + sni[dot:]
                hits = [i for i in idx if wildcard in self._names[i]]
                if hits:
                    return hits
                dot = sni.find(".", dot + 1)
        return [i for i in idx if not self._names[i]]

    def _by_transport(self, idx: list[int], facts: ConnectionFacts) -> list[int]:
        tp = facts.transport_protocol
        exact = [i for i in idx if tp and self._chains[i].match.transport_protocol == tp]
        return exact or [i for i in idx if not self._chains[i].match.transport_protocol]

    def _by_alpn(self, idx: list[int], facts: ConnectionFacts) -> list[int]:
        offered = facts.application_protocols
        exact = [
            i for i in idx
            if any(p in self._chains[i].match.application_protocols for p in offered)
        ]
        return exact or [i for i in idx if not self._chains[i].match.application_protocols]
