"""Path rewriting and redirect locations for a selected route."""

from __future__ import annotations

from meshlet.config.model import ClusterAction, PathMatchKind, RedirectAction, Route, RouteMatch
from meshlet.proxy.http.stream import RequestHead
from meshlet.proxy.routing.table import split_port

_DEFAULT_PORTS = {"http": "80", "https": "443"}


def _split_query(path: str) -> tuple[str, str]:
    """("/a/b", "?x=1") for "/a/b?x=1"; the query part keeps its "?"."""
    cut = path.find("?")
    return (path, "") if cut < 0 else (path[:cut], path[cut:])


def _replace_matched(path: str, match: RouteMatch, replacement: str) -> str:
    """Replace what the route matched: the prefix for prefix routes, else the whole path."""
    base, query = _split_query(path)
    matched = len(match.path_value) if match.path_kind is PathMatchKind.PREFIX else len(base)
    return replacement + base[matched:] + query


def rewrite_path(path: str, route: Route) -> str:
    """The upstream path for ``route``: ``prefix_rewrite`` applied, query kept."""
    action = route.action
    if not isinstance(action, ClusterAction) or action.prefix_rewrite is None:
        return path
    return _replace_matched(path, route.match, action.prefix_rewrite)


def redirect_location(head: RequestHead, route: Route) -> str:
    """The Location of a redirect route for this request."""
    action = route.action
    if not isinstance(action, RedirectAction):
        raise TypeError(f"route {route.name!r} is not a redirect")
    scheme = action.scheme or head.scheme
    host, port = split_port(head.authority)
    if action.host is not None:
        host = action.host
    if action.port is not None:
        port = str(action.port)
    elif (
        action.scheme is not None and action.scheme != head.scheme and port == _DEFAULT_PORTS.get(head.scheme)
    ):
        # http://a:80 -> https://a, not https://a:80.
        port = None
    if port is not None and port == _DEFAULT_PORTS.get(scheme):
        port = None
    path = head.path
    if action.path is not None:
        query = _split_query(path)[1]
        path = action.path if "?" in action.path else action.path + query
    elif action.prefix_rewrite is not None:
        path = _replace_matched(path, route.match, action.prefix_rewrite)
    if action.strip_query:
        path = _split_query(path)[0]
    authority = host if port is None else f"{host}:{port}"
    return f"{scheme}://{authority}{path}"
