"""Header mutation: removals first, then additions with each append_action."""

from __future__ import annotations

import pytest
import yaml

from meshlet.config.loader import parse_resource
from meshlet.config.model import AppendAction, HeaderMutation, HeaderValueOption
from meshlet.config.routes import compile_route_configuration
from meshlet.proxy.http.stream import RequestHead
from meshlet.proxy.routing import RouteTable, apply_header_mutation, request_mutations, response_mutations

Headers = list[tuple[str, str]]


def mutate(headers: Headers, *add: HeaderValueOption, remove: tuple[str, ...] = ()) -> Headers:
    copy = list(headers)
    apply_header_mutation(copy, HeaderMutation(add=add, remove=remove))
    return copy


START: Headers = [("a", "1"), ("b", "2"), ("a", "3")]


@pytest.mark.parametrize(
    ("action", "name", "expected"),
    [
        (AppendAction.APPEND_IF_EXISTS_OR_ADD, "a", [("a", "1"), ("b", "2"), ("a", "3"), ("a", "new")]),
        (AppendAction.APPEND_IF_EXISTS_OR_ADD, "c", [*START, ("c", "new")]),
        (AppendAction.ADD_IF_ABSENT, "a", START),
        (AppendAction.ADD_IF_ABSENT, "c", [*START, ("c", "new")]),
        (AppendAction.OVERWRITE_IF_EXISTS_OR_ADD, "a", [("a", "new"), ("b", "2")]),
        (AppendAction.OVERWRITE_IF_EXISTS_OR_ADD, "c", [*START, ("c", "new")]),
        (AppendAction.OVERWRITE_IF_EXISTS, "a", [("a", "new"), ("b", "2")]),
        (AppendAction.OVERWRITE_IF_EXISTS, "c", START),
    ],
)
def test_append_actions(action: AppendAction, name: str, expected: Headers) -> None:
    assert mutate(START, HeaderValueOption(name, "new", action)) == expected


def test_remove_then_add() -> None:
    result = mutate(START, HeaderValueOption("a", "x", AppendAction.ADD_IF_ABSENT), remove=("a",))
    assert result == [("b", "2"), ("a", "x")]


def test_mutation_is_in_place() -> None:
    headers = list(START)
    apply_header_mutation(headers, HeaderMutation(remove=("b",)))
    assert headers == [("a", "1"), ("a", "3")]


def test_mutations_come_from_route_vhost_and_route_config_in_envoy_order() -> None:
    text = """
request_headers_to_add: [{header: {key: x-level, value: config}}]
response_headers_to_remove: [server]
virtual_hosts:
- name: vh
  domains: ["*"]
  request_headers_to_add: [{header: {key: x-level, value: vhost}}]
  routes:
  - match: {prefix: /}
    route: {cluster: c}
    request_headers_to_add:
    - {header: {key: x-level, value: route}}
    - {header: {key: x-only, value: "100%%"}, append_action: OVERWRITE_IF_EXISTS_OR_ADD}
    - {header: {key: x-legacy, value: "1"}, append: false}
    - {header: {key: x-empty, value: ""}}
    request_headers_to_remove: [X-Remove-Me]
"""
    msg = parse_resource("type.googleapis.com/envoy.config.route.v3.RouteConfiguration", yaml.safe_load(text))
    config = compile_route_configuration(msg, "rc")
    assert isinstance(config.table, RouteTable)
    found = config.table.select(RequestHead("GET", "http", "h", "/"))
    assert found is not None
    vhost, route = found
    headers: Headers = [("x-only", "old"), ("x-remove-me", "1")]
    for mutation in request_mutations(config, vhost, route):
        apply_header_mutation(headers, mutation)
    assert headers == [
        ("x-only", "100%"),
        ("x-level", "route"),
        ("x-legacy", "1"),
        ("x-level", "vhost"),
        ("x-level", "config"),
    ]
    legacy = route.request_headers.add[2]
    assert legacy.action is AppendAction.OVERWRITE_IF_EXISTS_OR_ADD
    response = [("server", "upstream")]
    for mutation in response_mutations(config, vhost, route):
        apply_header_mutation(response, mutation)
    assert response == []
