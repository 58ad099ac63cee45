"""Filter chain selection in Envoy's order."""

from __future__ import annotations

import pytest

from meshlet.config.model import PLAINTEXT, FilterChain, FilterChainMatch, TcpProxyConfig
from meshlet.errors import ConfigError
from meshlet.proxy.listeners.filter_chain import ConnectionFacts, FilterChainSelector


def chain(name: str, **match: object) -> FilterChain:
    return FilterChain(
        name=name,
        match=FilterChainMatch(**match),  # type: ignore[arg-type]
        transport_socket=PLAINTEXT,
        filters=(TcpProxyConfig(stat_prefix=name, cluster="c"),),
    )


def pick(selector: FilterChainSelector, **facts: object) -> str | None:
    facts.setdefault("destination_port", 443)
    got = selector.select(ConnectionFacts(**facts))  # type: ignore[arg-type]
    return got.name if got else None


SNI_CHAINS = [
    chain("exact", server_names=("api.example.com",)),
    chain("wild", server_names=("*.example.com",)),
    chain("deeper-wild", server_names=("*.eu.example.com",)),
    chain("catch-all"),
]


def test_exact_server_name_beats_wildcard() -> None:
    s = FilterChainSelector(SNI_CHAINS)
    assert pick(s, server_name="api.example.com") == "exact"
    assert pick(s, server_name="API.Example.COM") == "exact"


def test_longest_wildcard_wins() -> None:
    s = FilterChainSelector(SNI_CHAINS)
    assert pick(s, server_name="web.example.com") == "wild"
    assert pick(s, server_name="web.eu.example.com") == "deeper-wild"
    assert pick(s, server_name="a.b.c.example.com") == "wild"


def test_no_server_name_or_unknown_goes_to_catch_all() -> None:
    s = FilterChainSelector(SNI_CHAINS)
    assert pick(s) == "catch-all"
    assert pick(s, server_name="example.org") == "catch-all"
    # The bare parent does not match "*.example.com".
    assert pick(s, server_name="example.com") == "catch-all"


def test_no_match_without_catch_all_uses_default_then_none() -> None:
    chains = SNI_CHAINS[:2]
    assert pick(FilterChainSelector(chains), server_name="x.org") is None
    default = chain("default")
    assert pick(FilterChainSelector(chains, default), server_name="x.org") == "default"


def test_destination_port_first() -> None:
    s = FilterChainSelector([
        chain("port-8443", destination_port=8443),
        chain("sni", server_names=("api.example.com",)),
    ])
    # Port narrows first: the SNI chain (any port) is not considered on 8443.
    assert pick(s, destination_port=8443, server_name="api.example.com") == "port-8443"
    assert pick(s, destination_port=443, server_name="api.example.com") == "sni"
    assert pick(s, destination_port=443) is None


def test_no_backtracking_after_a_specific_match() -> None:
    s = FilterChainSelector([
        chain("sni-h2", server_names=("api.example.com",), application_protocols=("h2",)),
        chain("any-http1", application_protocols=("http/1.1",)),
    ])
    # SNI matched "sni-h2" specifically; ALPN http/1.1 then fails there, and
    # Envoy does not fall back to the catch-all server name set.
    assert pick(s, server_name="api.example.com", application_protocols=("http/1.1",)) is None
    assert pick(s, server_name="api.example.com", application_protocols=("h2", "http/1.1")) == "sni-h2"
    assert pick(s, server_name="web.example.com", application_protocols=("http/1.1",)) == "any-http1"


def test_transport_protocol() -> None:
    s = FilterChainSelector([chain("tls", transport_protocol="tls"), chain("plain")])
    assert pick(s, transport_protocol="tls") == "tls"
    assert pick(s, transport_protocol="raw_buffer") == "plain"
    raw_only = FilterChainSelector([chain("raw", transport_protocol="raw_buffer")])
    assert pick(raw_only, transport_protocol="tls") is None


def test_application_protocols() -> None:
    s = FilterChainSelector([
        chain("h2", application_protocols=("h2",)),
        chain("http1", application_protocols=("http/1.1", "http/1.0")),
        chain("other"),
    ])
    assert pick(s, application_protocols=("h2", "http/1.1")) == "h2"
    assert pick(s, application_protocols=("http/1.0",)) == "http1"
    assert pick(s, application_protocols=("spdy/3",)) == "other"
    assert pick(s) == "other"


def test_duplicate_matches_are_rejected() -> None:
    with pytest.raises(ConfigError, match="same matching rules"):
        FilterChainSelector([
            chain("a", server_names=("x.com", "y.com")),
            chain("b", server_names=("Y.com", "x.com")),
        ])


def test_bad_wildcard_rejected() -> None:
    with pytest.raises(ConfigError, match="leading"):
        FilterChainSelector([chain("a", server_names=("api.*.com",))])
