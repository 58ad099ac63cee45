"""Route table semantics: virtual host precedence, first-match-wins, every matcher kind."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from meshlet.config.loader import parse_resource
from meshlet.config.routes import compile_route_configuration
from meshlet.proxy.http.stream import RequestHead
from meshlet.proxy.routing import RouteTable

RC_URL = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"


def build(text: str) -> RouteTable:
    msg = parse_resource(RC_URL, yaml.safe_load(text))
    config = compile_route_configuration(msg, "route_config")
    assert isinstance(config.table, RouteTable)
    return config.table


def head(
    path: str = "/",
    host: str = "example.com",
    method: str = "GET",
    headers: list[tuple[str, str]] | None = None,
    scheme: str = "http",
) -> RequestHead:
    return RequestHead(method=method, scheme=scheme, authority=host, path=path, headers=headers or [])


def picked(table: RouteTable, request: RequestHead) -> str | None:
    found = table.select(request)
    return None if found is None else f"{found[0].name}/{found[1].name}"


def routes(*entries: dict[str, Any]) -> str:
    """One catch-all virtual host with the given routes, all to cluster c."""
    body = [{"name": e.pop("name"), "match": e, "route": {"cluster": "c"}} for e in entries]
    return yaml.safe_dump({"virtual_hosts": [{"name": "vh", "domains": ["*"], "routes": body}]})


DOMAIN_VHOSTS = [
    ("exact", "api.example.com"),
    ("long_suffix", "*.api.example.com"),
    ("suffix", "*.example.com"),
    ("dash_suffix", "*-bar.foo.com"),
    ("prefix", "api.*"),
    ("long_prefix", "api.example.*"),
    ("plain", "plain.test"),
    ("ported", "ported.test:8080"),
    ("any", "*"),
]
DOMAINS = yaml.safe_dump(
    {
        "virtual_hosts": [
            {
                "name": name,
                "domains": [domain],
                "routes": [{"name": "r", "match": {"prefix": "/"}, "direct_response": {"status": 200}}],
            }
            for name, domain in DOMAIN_VHOSTS
        ]
    }
)


@pytest.mark.parametrize(
    ("host", "vhost"),
    [
        ("api.example.com", "exact"),
        ("API.Example.COM", "exact"),
        ("v1.api.example.com", "long_suffix"),
        ("www.example.com", "suffix"),
        ("example.com", "any"),  # a wildcard matches at least one character
        ("baz-bar.foo.com", "dash_suffix"),
        ("api.example.org", "long_prefix"),
        ("api.other", "prefix"),
        ("api.example.com:8443", "long_prefix"),  # "api.example.*" matches with the port
        ("plain.test:8443", "plain"),  # nothing matches with the port: retried without it
        ("www.example.com:80", "suffix"),
        ("ported.test:8080", "ported"),
        ("ported.test:9090", "any"),
        ("unknown.test", "any"),
        ("[::1]:80", "any"),
    ],
)
def test_virtual_host_precedence(host: str, vhost: str) -> None:
    table = build(DOMAINS)
    assert picked(table, head(host=host)) == f"{vhost}/r"


def test_exact_beats_suffix_beats_prefix_regardless_of_order() -> None:
    text = """
virtual_hosts:
- {name: prefix, domains: ["foo.*"], routes: [{name: r, match: {prefix: /}, direct_response: {status: 200}}]}
- {name: suffix, domains: ["*.bar"], routes: [{name: r, match: {prefix: /}, direct_response: {status: 200}}]}
- {name: exact, domains: ["foo.bar"], routes: [{name: r, match: {prefix: /}, direct_response: {status: 200}}]}
"""
    table = build(text)
    assert picked(table, head(host="foo.bar")) == "exact/r"
    assert picked(table, head(host="foo.x.bar")) == "suffix/r"
    assert picked(table, head(host="foo.baz")) == "prefix/r"


def test_no_virtual_host_and_no_route_give_none() -> None:
    table = build(
        "virtual_hosts: [{name: v, domains: [a.test],"
        " routes: [{name: r, match: {path: /x}, route: {cluster: c}}]}]"
    )
    assert table.select(head(host="b.test", path="/x")) is None
    assert table.select(head(host="a.test", path="/y")) is None
    assert picked(table, head(host="a.test", path="/x")) == "v/r"


def test_first_match_wins() -> None:
    table = build(
        routes(
            {"name": "specific", "prefix": "/api/v1"},
            {"name": "api", "prefix": "/api"},
            {"name": "all", "prefix": "/"},
        )
    )
    assert picked(table, head(path="/api/v1/users")) == "vh/specific"
    assert picked(table, head(path="/api/v2")) == "vh/api"
    assert picked(table, head(path="/other")) == "vh/all"
    reversed_table = build(routes({"name": "all", "prefix": "/"}, {"name": "api", "prefix": "/api"}))
    assert picked(reversed_table, head(path="/api")) == "vh/all"


def test_path_prefix_and_regex_ignore_the_query_string() -> None:
    table = build(
        routes({"name": "exact", "path": "/a"}, {"name": "re", "safe_regex": {"regex": "/b/[0-9]+"}})
    )
    assert picked(table, head(path="/a?x=1")) == "vh/exact"
    assert picked(table, head(path="/a/")) is None
    assert picked(table, head(path="/b/12?y")) == "vh/re"
    assert picked(table, head(path="/b/12x")) is None  # safe_regex is a full match
    assert picked(table, head(path="/a#frag")) == "vh/exact"


def test_case_insensitive_prefix_and_path() -> None:
    table = build(
        routes(
            {"name": "p", "prefix": "/Foo", "case_sensitive": False},
            {"name": "x", "path": "/Bar", "case_sensitive": False},
            {"name": "cs", "prefix": "/Baz"},
        )
    )
    assert picked(table, head(path="/fOO/x")) == "vh/p"
    assert picked(table, head(path="/bar")) == "vh/x"
    assert picked(table, head(path="/bar/")) is None
    assert picked(table, head(path="/baz")) is None
    assert picked(table, head(path="/Baz")) == "vh/cs"


@pytest.mark.parametrize(
    ("matcher", "matching", "not_matching"),
    [
        ({"exact_match": "v1"}, [("x-v", "v1")], [("x-v", "v2"), ("x-v", "V1")]),
        ({"prefix_match": "ab"}, [("x-v", "abc")], [("x-v", "cab")]),
        ({"suffix_match": "yz"}, [("x-v", "xyz")], [("x-v", "yzx")]),
        ({"contains_match": "mid"}, [("x-v", "amidst")], [("x-v", "mi-d")]),
        ({"safe_regex_match": {"regex": "v[0-9]+"}}, [("x-v", "v42")], [("x-v", "v42a")]),
        ({"present_match": True}, [("x-v", "")], [("other", "1")]),
        ({"present_match": False}, [("other", "1")], [("x-v", "1")]),
        ({"string_match": {"exact": "AbC", "ignore_case": True}}, [("x-v", "abc")], [("x-v", "abcd")]),
        ({"string_match": {"prefix": "a"}}, [("x-v", "ab")], [("x-v", "ba")]),
        ({"string_match": {"safe_regex": {"regex": "a+"}}}, [("x-v", "aaa")], [("x-v", "aab")]),
        ({"exact_match": "v1", "invert_match": True}, [("x-v", "v2")], [("x-v", "v1"), ("other", "1")]),
        ({"present_match": True, "invert_match": True}, [("other", "1")], [("x-v", "1")]),
        ({"exact_match": "", "treat_missing_header_as_empty": True}, [("other", "1")], []),
        (
            {"string_match": {"exact": ""}, "treat_missing_header_as_empty": True},
            [("other", "1")],
            [("x-v", "1")],
        ),
        ({"prefix_match": "a", "treat_missing_header_as_empty": True}, [("x-v", "ab")], [("other", "1")]),
    ],
)
def test_header_matchers(
    matcher: dict[str, Any], matching: list[tuple[str, str]], not_matching: list[tuple[str, str]]
) -> None:
    table = build(routes({"name": "h", "prefix": "/", "headers": [{"name": "X-V", **matcher}]}))
    for header in matching:
        assert picked(table, head(headers=[header])) == "vh/h", header
    for header in not_matching:
        assert picked(table, head(headers=[header])) is None, header


def test_repeated_headers_are_joined_with_commas() -> None:
    table = build(routes({"name": "h", "prefix": "/", "headers": [{"name": "x-v", "exact_match": "a,b"}]}))
    assert picked(table, head(headers=[("x-v", "a"), ("x-v", "b")])) == "vh/h"
    assert picked(table, head(headers=[("x-v", "a")])) is None


def test_all_header_matchers_must_match() -> None:
    table = build(
        routes(
            {
                "name": "h",
                "prefix": "/",
                "headers": [{"name": "a", "exact_match": "1"}, {"name": "b", "exact_match": "2"}],
            }
        )
    )
    assert picked(table, head(headers=[("a", "1"), ("b", "2")])) == "vh/h"
    assert picked(table, head(headers=[("a", "1")])) is None


@pytest.mark.parametrize(
    ("name", "value", "request_kwargs"),
    [
        (":method", "POST", {"method": "POST"}),
        (":authority", "example.com", {"host": "example.com"}),
        ("host", "example.com", {"host": "example.com"}),
        (":scheme", "https", {"scheme": "https"}),
        (":path", "/p?q=1", {"path": "/p?q=1"}),
    ],
)
def test_pseudo_header_matchers(name: str, value: str, request_kwargs: dict[str, str]) -> None:
    table = build(routes({"name": "h", "prefix": "/", "headers": [{"name": name, "exact_match": value}]}))
    assert picked(table, head(**request_kwargs)) == "vh/h"
    assert picked(table, head(path="/other", host="other.test", method="PUT", scheme="http")) is None


def test_query_parameter_matchers() -> None:
    table = build(
        routes(
            {
                "name": "exact",
                "prefix": "/",
                "query_parameters": [{"name": "v", "string_match": {"exact": "a b"}}],
            },
            {
                "name": "present",
                "prefix": "/",
                "query_parameters": [{"name": "debug", "present_match": True}],
            },
            {
                "name": "insensitive",
                "prefix": "/",
                "query_parameters": [
                    {"name": "mode", "string_match": {"exact": "FAST", "ignore_case": True}}
                ],
            },
        )
    )
    assert picked(table, head(path="/x?v=a%20b")) == "vh/exact"
    assert picked(table, head(path="/x?v=a+b")) is None  # "+" is not decoded, as in Envoy
    assert picked(table, head(path="/x?first=1&debug")) == "vh/present"
    assert picked(table, head(path="/x?debug=0")) == "vh/present"
    assert picked(table, head(path="/x?mode=fast")) == "vh/insensitive"
    assert picked(table, head(path="/x?v=a&v=a%20b")) is None  # the first value counts
    assert picked(table, head(path="/x")) is None


def test_grpc_match() -> None:
    table = build(routes({"name": "grpc", "prefix": "/", "grpc": {}}, {"name": "rest", "prefix": "/"}))
    assert picked(table, head(method="POST", headers=[("content-type", "application/grpc")])) == "vh/grpc"
    assert (
        picked(table, head(method="POST", headers=[("content-type", "application/grpc+proto")])) == "vh/grpc"
    )
    assert picked(table, head(method="POST", headers=[("content-type", "application/grpc-web")])) == "vh/rest"
    assert picked(table, head(method="POST", headers=[("content-type", "application/json")])) == "vh/rest"


def test_selection_returns_compiled_route_objects() -> None:
    table = build(routes({"name": "r", "prefix": "/"}))
    found = table.select(head())
    assert found is not None
    vhost, route = found
    assert vhost.domains == ("*",)
    assert route.index == 0
    assert table.virtual_host("anything") is vhost
