"""Property tests: virtual host choice agrees with a plain reading of Envoy's rules,
and no request head, however odd, makes selection raise."""

from __future__ import annotations

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from meshlet.config.loader import parse_resource
from meshlet.config.routes import compile_route_configuration
from meshlet.proxy.http.stream import RequestHead
from meshlet.proxy.routing import RouteTable
from meshlet.proxy.routing.table import split_port

LABELS = st.sampled_from(["a", "b", "ab", "api", "x-y", "example", "com", "io"])
NAMES = st.lists(LABELS, min_size=1, max_size=3).map(".".join)
DOMAINS = st.one_of(
    NAMES,
    NAMES.map(lambda n: "*." + n),
    NAMES.map(lambda n: "*-" + n),
    NAMES.map(lambda n: n + ".*"),
    st.just("*"),
    st.tuples(NAMES, st.sampled_from(["80", "8080"])).map(":".join),
)
HOSTS = st.one_of(
    NAMES,
    st.tuples(NAMES, st.sampled_from(["80", "8080", "9"])).map(":".join),
    NAMES.map(str.upper),
)


def reference(domains: list[str], host: str) -> str | None:
    """Envoy's order, written the slow and obvious way."""

    def named(candidate: str) -> str | None:
        if candidate in domains:
            return candidate
        suffixes = [
            d
            for d in domains
            if d.startswith("*") and d != "*" and candidate.endswith(d[1:]) and len(candidate) > len(d) - 1
        ]
        if suffixes:
            return max(suffixes, key=len)
        prefixes = [
            d
            for d in domains
            if d.endswith("*") and d != "*" and candidate.startswith(d[:-1]) and len(candidate) > len(d) - 1
        ]
        if prefixes:
            return max(prefixes, key=len)
        return None

    host = host.lower()
    found = named(host)
    bare, port = split_port(host)
    if found is None and port is not None:
        found = named(bare)
    if found is None and "*" in domains:
        found = "*"
    return found


def table_for(domains: list[str]) -> RouteTable:
    vhosts = [
        {
            "name": f"vh{i}",
            "domains": [d],
            "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 200}}],
        }
        for i, d in enumerate(domains)
    ]
    msg = parse_resource(
        "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
        yaml.safe_load(yaml.safe_dump({"virtual_hosts": vhosts})),
    )
    table = compile_route_configuration(msg, "rc").table
    assert isinstance(table, RouteTable)
    return table


@settings(max_examples=150, deadline=None)
@given(st.lists(DOMAINS, min_size=1, max_size=6, unique=True), HOSTS)
def test_virtual_host_choice_matches_reference(domains: list[str], host: str) -> None:
    vhost = table_for(domains).virtual_host(host)
    expected = reference(domains, host)
    assert (vhost.domains[0] if vhost is not None else None) == expected


ODD_TEXT = st.text(alphabet=st.characters(codec="latin-1"), max_size=40)
MIXED_TABLE = """
virtual_hosts:
- name: a
  domains: ["*.example.com", "api.*", "exact.test"]
  routes:
  - match:
      prefix: /api
      case_sensitive: false
      headers: [{name: x-v, string_match: {safe_regex: {regex: "v[0-9]"}}}]
    route: {cluster: c}
  - match: {safe_regex: {regex: "/r/.*"}, query_parameters: [{name: q, present_match: true}]}
    route: {cluster: c}
  - match: {path: /exact, grpc: {}}
    route: {cluster: c}
- name: any
  domains: ["*"]
  routes:
  - match: {prefix: /, headers: [{name: ":method", exact_match: GET, invert_match: true}]}
    route: {cluster: c}
"""
_MIXED = compile_route_configuration(
    parse_resource(
        "type.googleapis.com/envoy.config.route.v3.RouteConfiguration", yaml.safe_load(MIXED_TABLE)
    ),
    "rc",
).table


@settings(max_examples=300, deadline=None)
@given(ODD_TEXT, ODD_TEXT, ODD_TEXT, st.lists(st.tuples(ODD_TEXT, ODD_TEXT), max_size=4))
def test_selection_never_raises(
    authority: str, path: str, method: str, headers: list[tuple[str, str]]
) -> None:
    assert isinstance(_MIXED, RouteTable)
    result = _MIXED.select(
        RequestHead(
            method=method,
            scheme="http",
            authority=authority,
            path=path,
            headers=[(k.lower(), v) for k, v in headers],
        )
    )
    assert result is None or result[0].name in ("a", "any")
