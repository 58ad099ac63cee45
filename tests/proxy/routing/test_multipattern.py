"""Multi-pattern route matching: first match wins exactly as with one regex at a time.

Every table here is built with each engine; Hyperscan puts a virtual host's
regex routes in one pattern set, the others check them in turn, and all must
select the same route for every request.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshlet.config.context import CompileContext, compiling
from meshlet.config.loader import parse_resource
from meshlet.config.routes import compile_route_configuration
from meshlet.errors import ConfigError
from meshlet.proxy.http.stream import RequestHead
from meshlet.proxy.routing import RouteTable
from meshlet.proxy.routing.regex import regex_engine

RC_URL = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
ENGINES = ("re", "re2", "hyperscan")
OPTIONAL = {"re2": "re2", "hyperscan": "hyperscan"}


def available(name: str) -> str:
    if name in OPTIONAL:
        pytest.importorskip(OPTIONAL[name], reason=f"{OPTIONAL[name]} is not installed (meshlet[accel])")
    return name


def build(route_list: list[dict[str, Any]], engine: str) -> RouteTable:
    """One catch-all virtual host; each route answers with its position as the status."""
    body = [
        {"name": f"r{i}", "match": match, "direct_response": {"status": 200 + i}}
        for i, match in enumerate(route_list)
    ]
    data = {"virtual_hosts": [{"name": "vh", "domains": ["*"], "routes": body}]}
    msg = parse_resource(RC_URL, yaml.safe_load(yaml.safe_dump(data)))
    with compiling(CompileContext(regex=regex_engine(engine))):
        config = compile_route_configuration(msg, "route_config")
    assert isinstance(config.table, RouteTable)
    return config.table


def tables(route_list: list[dict[str, Any]]) -> dict[str, RouteTable]:
    return {name: build(route_list, available(name)) for name in ENGINES}


def head(path: str, headers: list[tuple[str, str]] | None = None) -> RequestHead:
    return RequestHead(method="GET", scheme="http", authority="h", path=path, headers=headers or [])


def picked(table: RouteTable, request: RequestHead) -> str | None:
    found = table.select(request)
    return None if found is None else found[1].name


def picked_by_all(route_list: list[dict[str, Any]], request: RequestHead) -> str | None:
    """The route every engine picks (they must agree)."""
    answers = {name: picked(table, request) for name, table in tables(route_list).items()}
    assert len(set(answers.values())) == 1, answers
    return next(iter(answers.values()))


def regex(pattern: str, **extra: Any) -> dict[str, Any]:
    return {"safe_regex": {"regex": pattern}, **extra}


def test_hyperscan_tables_use_one_pattern_set_and_others_do_not() -> None:
    route_list = [regex("/a/[0-9]+"), {"prefix": "/b"}, regex("/c/.*")]
    for name, table in tables(route_list).items():
        entry = table._any  # the lone "*" virtual host
        assert entry is not None
        assert (entry.regex_set is not None) is (name == "hyperscan"), name


def test_a_single_regex_route_needs_no_set() -> None:
    table = build([regex("/a/[0-9]+"), {"prefix": "/"}], available("hyperscan"))
    assert table._any is not None and table._any.regex_set is None
    assert picked(table, head("/a/1")) == "r0"


def test_overlapping_regexes_first_one_wins() -> None:
    route_list = [regex("/a/.*"), regex("/a/b"), regex("/a/[a-z]")]
    assert picked_by_all(route_list, head("/a/b")) == "r0"
    route_list = [regex("/a/b"), regex("/a/.*")]
    assert picked_by_all(route_list, head("/a/b")) == "r0"
    assert picked_by_all(route_list, head("/a/c")) == "r1"
    assert picked_by_all(route_list, head("/z")) is None


def test_non_regex_routes_keep_their_place_between_regex_routes() -> None:
    route_list = [
        regex("/x/[0-9]+"),
        {"prefix": "/x/"},
        regex("/x/.*"),  # shadowed by the prefix route for every path it matches
        {"path": "/y"},
        regex("/y|/z"),
        regex("/w[0-9]"),
        {"prefix": "/w"},
    ]
    assert picked_by_all(route_list, head("/x/12")) == "r0"
    assert picked_by_all(route_list, head("/x/ab")) == "r1"
    assert picked_by_all(route_list, head("/y")) == "r3"
    assert picked_by_all(route_list, head("/z")) == "r4"
    assert picked_by_all(route_list, head("/w1")) == "r5"
    assert picked_by_all(route_list, head("/wx")) == "r6"  # after the last regex hit
    assert picked_by_all(route_list, head("/v")) is None


def test_a_prefix_route_first_shadows_every_regex() -> None:
    route_list = [{"prefix": "/"}, regex("/a"), regex("/b")]
    assert picked_by_all(route_list, head("/a")) == "r0"


def test_failing_header_condition_on_the_first_regex_hit_falls_through() -> None:
    route_list = [
        regex("/a/.*", headers=[{"name": "x-canary", "string_match": {"exact": "1"}}]),
        regex("/a/b", query_parameters=[{"name": "v", "string_match": {"exact": "2"}}]),
        {"prefix": "/a/b"},
        regex("/a/[a-z]"),
    ]
    assert picked_by_all(route_list, head("/a/b", [("x-canary", "1")])) == "r0"
    assert picked_by_all(route_list, head("/a/b?v=2")) == "r1"
    assert picked_by_all(route_list, head("/a/b?v=3")) == "r2"  # the prefix route sits before r3
    assert picked_by_all(route_list, head("/a/c")) == "r3"
    assert picked_by_all(route_list, head("/a/cc")) is None


def test_only_regex_routes_with_conditions_fall_through_in_order() -> None:
    route_list = [
        regex("/m/.*", headers=[{"name": "x-a", "present_match": True}]),
        regex("/m/[0-9]+", headers=[{"name": "x-b", "present_match": True}]),
        regex("/m/1"),
        regex("/m/[0-9]"),
    ]
    assert picked_by_all(route_list, head("/m/1", [("x-a", "")])) == "r0"
    assert picked_by_all(route_list, head("/m/1", [("x-b", "")])) == "r1"
    assert picked_by_all(route_list, head("/m/1")) == "r2"
    assert picked_by_all(route_list, head("/m/2")) == "r3"
    assert picked_by_all(route_list, head("/m/22")) is None


def test_regex_matches_the_path_without_query_or_fragment() -> None:
    route_list = [regex("/q/[0-9]+"), regex("/q/.*")]
    assert picked_by_all(route_list, head("/q/1?x=y")) == "r0"
    assert picked_by_all(route_list, head("/q/1#frag")) == "r0"


def test_a_pattern_hyperscan_refuses_fails_the_whole_config_naming_the_route() -> None:
    route_list = [regex("/ok/[0-9]+"), regex(r"/(a)\1")]
    with pytest.raises(ConfigError, match=r"^route_config\.virtual_hosts\[0\]\.routes\[1\]\.match\.safe_regex"
                                          r"\.regex: Hyperscan cannot compile"):
        build(route_list, available("hyperscan"))


def test_many_regex_routes_in_one_set() -> None:
    route_list = [regex(f"/api/v[0-9]+/svc{i}/items/[a-z0-9-]+") for i in range(200)]
    for name, table in tables(route_list).items():
        assert picked(table, head("/api/v1/svc0/items/a")) == "r0", name
        assert picked(table, head("/api/v9/svc199/items/x-1")) == "r199", name
        assert picked(table, head("/api/v9/svc200/items/x")) is None, name


# --------------------------------------------------------------------------- #
# Property: every engine selects the same route as plain sequential `re`
# --------------------------------------------------------------------------- #

PIECES = st.sampled_from(
    ["/", "a", "b", "ab", "[ab]", "[0-9]+", "[a-z]*", ".", ".*", "(a|b)", r"\d", "/?", "x"]
)
PATTERNS = st.lists(PIECES, min_size=1, max_size=5).map("".join)
LITERALS = st.lists(st.sampled_from(["/", "a", "b", "1", "x"]), min_size=1, max_size=4).map("".join)
MATCHES = st.one_of(
    PATTERNS.map(regex),
    PATTERNS.map(lambda p: regex(p, headers=[{"name": "x-h", "present_match": True}])),
    LITERALS.map(lambda v: {"prefix": v}),
    LITERALS.map(lambda v: {"path": v}),
)
PATH_PARTS = st.sampled_from(["/", "a", "b", "ab", "1", "42", "x", "z", "é", "٣"])
PATHS = st.lists(PATH_PARTS, min_size=1, max_size=8).map("".join)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(route_list=st.lists(MATCHES, min_size=1, max_size=8), paths=st.lists(PATHS, min_size=1, max_size=6),
       with_header=st.booleans())
def test_engines_agree_on_every_selection(route_list: list[dict[str, Any]], paths: list[str],
                                          with_header: bool) -> None:
    built = tables(route_list)
    headers = [("x-h", "1")] if with_header else []
    for path in paths:
        request = head(path, headers)
        expected = picked(built["re"], request)
        for name in ("re2", "hyperscan"):
            assert picked(built[name], request) == expected, (name, path)
