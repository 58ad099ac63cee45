"""Apply compiled header mutations (request/response_headers_to_add/_remove)."""

from __future__ import annotations

from meshlet.config.model import (
    AppendAction,
    HeaderMutation,
    HeaderValueOption,
    Route,
    RouteConfiguration,
    VirtualHost,
)
from meshlet.proxy.http.stream import Headers


def apply_header_mutation(headers: Headers, mutation: HeaderMutation) -> None:
    """Mutate ``headers`` in place: removals first, then additions (Envoy's order,
    so a header can be removed and re-added by the same mutation)."""
    if mutation.remove:
        remove = mutation.remove
        headers[:] = [h for h in headers if h[0] not in remove]
    for option in mutation.add:
        _add(headers, option)


def _add(headers: Headers, option: HeaderValueOption) -> None:
    action = option.action
    if action is AppendAction.APPEND_IF_EXISTS_OR_ADD:
        headers.append((option.name, option.value))
        return
    name = option.name
    first = next((i for i, (k, _) in enumerate(headers) if k == name), -1)
    if action is AppendAction.ADD_IF_ABSENT:
        if first < 0:
            headers.append((name, option.value))
        return
    # OVERWRITE_IF_EXISTS_OR_ADD / OVERWRITE_IF_EXISTS: one header with the new value.
    if first < 0:
        if action is AppendAction.OVERWRITE_IF_EXISTS_OR_ADD:
            headers.append((name, option.value))
        return
    headers[first] = (name, option.value)
    if any(k == name for k, _ in headers[first + 1 :]):
        headers[first + 1 :] = [h for h in headers[first + 1 :] if h[0] != name]


def request_mutations(
    config: RouteConfiguration, vhost: VirtualHost, route: Route
) -> tuple[HeaderMutation, ...]:
    """The request mutations in the order Envoy applies them: route, virtual host, route config."""
    return tuple(
        m for m in (route.request_headers, vhost.request_headers, config.request_headers) if not m.empty
    )


def response_mutations(
    config: RouteConfiguration, vhost: VirtualHost, route: Route
) -> tuple[HeaderMutation, ...]:
    """The response mutations in Envoy's order: route, virtual host, route config."""
    return tuple(
        m for m in (route.response_headers, vhost.response_headers, config.response_headers) if not m.empty
    )
