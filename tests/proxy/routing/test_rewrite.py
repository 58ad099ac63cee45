"""prefix_rewrite for the upstream path and redirect Location headers."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from meshlet.config.loader import parse_resource
from meshlet.config.model import Route
from meshlet.config.routes import compile_route_configuration
from meshlet.proxy.http.stream import RequestHead
from meshlet.proxy.routing import redirect_location, rewrite_path


def route_of(match: dict[str, Any], action: dict[str, Any]) -> Route:
    text = yaml.safe_dump(
        {"virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [{"match": match, **action}]}]}
    )
    msg = parse_resource("type.googleapis.com/envoy.config.route.v3.RouteConfiguration", yaml.safe_load(text))
    return compile_route_configuration(msg, "rc").virtual_hosts[0].routes[0]


@pytest.mark.parametrize(
    ("match", "rewrite", "path", "expected"),
    [
        ({"prefix": "/app/"}, "/", "/app/x/y?q=1", "/x/y?q=1"),
        ({"prefix": "/app"}, "/v2", "/app/x", "/v2/x"),
        ({"prefix": "/App", "case_sensitive": False}, "/b", "/app/x", "/b/x"),
        ({"path": "/old"}, "/new", "/old?z", "/new?z"),
        ({"safe_regex": {"regex": "/r/[a-z]+"}}, "/fixed", "/r/abc?k=v", "/fixed?k=v"),
    ],
)
def test_prefix_rewrite(match: dict[str, Any], rewrite: str, path: str, expected: str) -> None:
    route = route_of(match, {"route": {"cluster": "c", "prefix_rewrite": rewrite}})
    assert rewrite_path(path, route) == expected


def test_no_rewrite_keeps_the_path() -> None:
    route = route_of({"prefix": "/"}, {"route": {"cluster": "c"}})
    assert rewrite_path("/a?b", route) == "/a?b"


def head(path: str = "/p?q=1", host: str = "example.com", scheme: str = "http") -> RequestHead:
    return RequestHead("GET", scheme, host, path)


@pytest.mark.parametrize(
    ("redirect", "request_head", "location"),
    [
        ({"https_redirect": True}, head(), "https://example.com/p?q=1"),
        ({"https_redirect": True}, head(host="example.com:80"), "https://example.com/p?q=1"),
        ({"https_redirect": True}, head(host="example.com:8080"), "https://example.com:8080/p?q=1"),
        ({"scheme_redirect": "https", "port_redirect": 8443}, head(), "https://example.com:8443/p?q=1"),
        ({"host_redirect": "new.test"}, head(host="old.test:8080"), "http://new.test:8080/p?q=1"),
        ({"path_redirect": "/moved"}, head(), "http://example.com/moved?q=1"),
        ({"path_redirect": "/moved?x=2"}, head(), "http://example.com/moved?x=2"),
        ({"prefix_rewrite": "/new/"}, head(path="/old/a?q=1"), "http://example.com/new/a?q=1"),
        ({"path_redirect": "/moved", "strip_query": True}, head(), "http://example.com/moved"),
    ],
)
def test_redirect_location(redirect: dict[str, Any], request_head: RequestHead, location: str) -> None:
    match = {"prefix": "/old/"} if "prefix_rewrite" in redirect else {"prefix": "/"}
    route = route_of(match, {"redirect": redirect})
    assert redirect_location(request_head, route) == location


def test_redirect_response_codes() -> None:
    codes = {
        "MOVED_PERMANENTLY": 301,
        "FOUND": 302,
        "SEE_OTHER": 303,
        "TEMPORARY_REDIRECT": 307,
        "PERMANENT_REDIRECT": 308,
    }
    for name, code in codes.items():
        route = route_of({"prefix": "/"}, {"redirect": {"host_redirect": "a", "response_code": name}})
        assert route.action.response_code == code  # type: ignore[union-attr]
